"""The model ladder: a `ModelSize` becomes a transformers config, a parameter count and a FLOP rate.

mlm rungs are RoBERTa encoders (`RobertaForMaskedLM`), clm rungs GPT-2 decoders (`GPT2LMHeadModel`);
both tie the output projection to the token embedding, so every checkpoint loads with
`AutoModelForMaskedLM` / `AutoModelForCausalLM.from_pretrained(dir)`. GPT-2 rather than Llama for
clm: learned positions and LayerNorm, the same block as the RoBERTa encoder apart from the causal
mask, so the two families differ in the objective and little else.

Parameter counts follow `PreTrainedModel.num_parameters` exactly:
    N       every trainable tensor once (tied weights once);
    N_non   N minus every `nn.Embedding` table: token, position and RoBERTa's one-row token-type
            table. That is Kaplan et al. (2020)'s N; the tied output projection is the token table,
            so it is excluded too, while the MLM head's dense + LayerNorm + vocabulary bias are kept.
This module never imports ray or rdkit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedConfig,
    PreTrainedModel,
    RobertaConfig,
    RobertaForMaskedLM,
)

from engine.config import LADDER, Family, ModelSize

# Special-token ids of the tokenizer (docs/CONTRACTS.md): [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4
# [BOS]=5 [EOS]=6. An mlm sequence is [CLS] ... [SEP], a clm sequence [BOS] ... [EOS].
PAD_ID = 0
SPECIAL_IDS: dict[str, dict[str, int]] = {
    "mlm": {"pad_token_id": PAD_ID, "bos_token_id": 2, "eos_token_id": 3},
    "clm": {"pad_token_id": PAD_ID, "bos_token_id": 5, "eos_token_id": 6},
}


def build_config(
    family: Family,
    size: ModelSize,
    vocab_size: int,
    max_seq_len: int,
    *,
    pad_token_id: int = PAD_ID,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    dropout: float = 0.0,
    attn_implementation: str = "sdpa",
) -> PreTrainedConfig:
    """A `RobertaConfig` (mlm) or `GPT2Config` (clm) for one rung; bos/eos default to the family's ids."""
    bos = SPECIAL_IDS[family]["bos_token_id"] if bos_token_id is None else bos_token_id
    eos = SPECIAL_IDS[family]["eos_token_id"] if eos_token_id is None else eos_token_id
    if family == "mlm":
        return RobertaConfig(
            vocab_size=vocab_size,
            hidden_size=size.d_model,
            num_hidden_layers=size.n_layer,
            num_attention_heads=size.n_head,
            intermediate_size=size.ffn_dim,
            hidden_act="gelu",
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            # RoBERTa numbers positions from pad_token_id + 1, so the largest is max_seq_len + pad_token_id
            # (roberta-base: 512 tokens, pad 1 -> 514 positions)
            max_position_embeddings=max_seq_len + pad_token_id + 1,
            type_vocab_size=1,  # RoBERTa has no sentence-pair segments
            layer_norm_eps=1e-5,  # roberta-base's value; the class default 1e-12 is BERT's
            pad_token_id=pad_token_id,
            bos_token_id=bos,
            eos_token_id=eos,
            tie_word_embeddings=True,
            attn_implementation=attn_implementation,
        )
    if family == "clm":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_seq_len,
            n_embd=size.d_model,
            n_layer=size.n_layer,
            n_head=size.n_head,
            n_inner=size.ffn_dim,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            pad_token_id=pad_token_id,
            bos_token_id=bos,
            eos_token_id=eos,
            tie_word_embeddings=True,
            use_cache=False,  # training only; generation can turn it back on
            attn_implementation=attn_implementation,
        )
    raise ValueError(f"family must be 'mlm' or 'clm' (got {family!r})")


def family_of(config: PreTrainedConfig) -> Family:
    if config.model_type == "roberta":
        return "mlm"
    if config.model_type == "gpt2":
        return "clm"
    raise ValueError(f"expected a roberta (mlm) or gpt2 (clm) config (got model_type {config.model_type!r})")


def build_model(config: PreTrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised model; the seed drives the init without touching the caller's RNG."""
    cls = RobertaForMaskedLM if family_of(config) == "mlm" else GPT2LMHeadModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config)


def use_eager_attention(model: PreTrainedModel) -> PreTrainedModel:
    """Switch to the plain matmul attention, which supports double backward (Hessian-vector products);
    SDPA's fused kernels do not."""
    model.set_attn_implementation("eager")
    return model


def model_inputs(batch: dict[str, torch.Tensor], config: PreTrainedConfig) -> dict[str, torch.Tensor]:
    """The keyword arguments of `model(**...)` for a batch in the docs/CONTRACTS.md format.

    Packed batches carry `position_ids` that restart at 0 for every molecule (engine/data.py).
    mlm: RoBERTa numbers positions from pad_token_id + 1 (row pad_token_id of its table is the
    untrained padding row), so they are shifted by that. clm: the attention mask is dropped, because
    only with `attention_mask=None` does GPT-2 read the restarts as molecule boundaries and keep
    attention within each molecule (transformers' masking_utils.find_packed_sequence_indices);
    trailing padding becomes one more "molecule" without labels.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
    if "position_ids" in batch:
        if family_of(config) == "mlm":
            inputs["position_ids"] = batch["position_ids"] + config.pad_token_id + 1
        else:
            inputs["position_ids"] = batch["position_ids"]
            inputs.pop("attention_mask", None)
    return inputs


# ---------------------------------------------------------------------------------------------
# counting parameters and FLOPs


@dataclass(frozen=True)
class ParamCount:
    total: int  # == model.num_parameters()
    non_embedding: int  # == model.num_parameters(exclude_embeddings=True); Kaplan's N


def count_params(config: PreTrainedConfig) -> ParamCount:
    """Closed-form parameter count of the model `build_model(config)` would build (no model needed)."""
    d, n_layer, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    if family_of(config) == "mlm":
        d_ff = config.intermediate_size
        # q, k, v, out: 4 (d^2 + d); two LayerNorms: 4d; MLP: 2 d d_ff + d_ff + d
        per_layer = 4 * d * d + 2 * d * d_ff + 9 * d + d_ff
        embedding = (vocab + config.max_position_embeddings + config.type_vocab_size) * d
        # embedding LayerNorm 2d; MLM head: dense d^2 + d, LayerNorm 2d, vocabulary bias (decoder tied)
        other = 2 * d + d * d + 3 * d + vocab
    else:
        d_ff = config.n_inner or 4 * d
        per_layer = 4 * d * d + 2 * d * d_ff + 9 * d + d_ff  # the same block as RoBERTa's
        embedding = (vocab + config.n_positions) * d
        other = 2 * d  # final LayerNorm; lm_head is tied and has no bias
    non_embedding = n_layer * per_layer + other
    return ParamCount(total=non_embedding + embedding, non_embedding=non_embedding)


def flops_per_token(config: PreTrainedConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N_non + 6 n_layer seq_len d_model.

    Kaplan et al. (2020) Table 1: a forward pass costs 2 N_non + 2 n_layer n_ctx d_attn per token (the
    second term is QK^T and attention-times-V), and the backward twice that. Embedding lookups and the
    output logits (2 d vocab per token forward) are left out, as in Kaplan; with ~50-token SMILES
    vocabularies they are a few percent of C only on the smallest rungs. C = flops_per_token * tokens.
    """
    n_non = count_params(config).non_embedding
    return 6.0 * n_non + 6.0 * config.num_hidden_layers * seq_len * config.hidden_size


def rung_table(
    family: Family, vocab_size: int, max_seq_len: int, sizes: list[ModelSize] | None = None
) -> list[dict]:
    """One row per rung (default: all of `LADDER`), for `clmscale validate` and the report."""
    rows = []
    for size in sizes or list(LADDER.values()):
        config = build_config(family, size, vocab_size, max_seq_len)
        n = count_params(config)
        rows.append(
            {
                "name": size.name,
                "n_layer": size.n_layer,
                "d_model": size.d_model,
                "n_head": size.n_head,
                "d_ff": size.ffn_dim,
                "n_params": n.total,
                "n_params_non_embedding": n.non_embedding,
                "flops_per_token": flops_per_token(config, max_seq_len),
            }
        )
    return rows



def load_pretrained(checkpoint_dir) -> PreTrainedModel:
    """A checkpoint written by `engine.train` (HF `save_pretrained`), with its LM head, in fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    config = AutoConfig.from_pretrained(checkpoint_dir)
    cls = AutoModelForMaskedLM if family_of(config) == "mlm" else AutoModelForCausalLM
    return cls.from_pretrained(checkpoint_dir, dtype=torch.float32)
