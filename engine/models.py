"""The model ladder: a rung becomes a transformers config, a parameter count and a FLOP rate.

mlm rungs are RoBERTa encoders (`RobertaForMaskedLM`), clm rungs GPT-2 decoders (`GPT2LMHeadModel`):
learned positions and LayerNorm, the same block apart from the causal mask, so the two differ in the
objective and little else. llama rungs are Llama decoders (`LlamaForCausalLM`: RoPE, SwiGLU, RMSNorm, no
bias) and modernbert rungs ModernBERT encoders (`ModernBertForMaskedLM`: RoPE, GeGLU, bias-free
LayerNorms, every layer global attention: SMILES fit in any local window ModernBERT would use). llama
is trained like clm and modernbert like mlm (`ladder.objective`). Every family ties the output
projection to the token embedding, so every checkpoint loads with `AutoModelForMaskedLM` /
`AutoModelForCausalLM.from_pretrained(dir)`. The gated MLPs of llama and modernbert get an inner width
of 2/3 of the rung's d_ff, rounded up to a multiple of 8 (`glu_dim`, as LLaMA does), so their three
matrices hold about the two of a GELU MLP of the same rung.

Parameter counts follow `PreTrainedModel.num_parameters` exactly:
    N       every trainable tensor once (tied weights once);
    N_non   N minus every `nn.Embedding` table: token, position and RoBERTa's one-row token-type
            table (llama and modernbert have only the token table: RoPE has no parameters). That is
            Kaplan et al. (2020)'s N; the tied output projection is the token table, so it is excluded
            too, while the MLM heads' dense + LayerNorm + vocabulary bias are kept.
FLOPs and MFU (`flops_per_token`, `sequence_flops`, `batch_cost`, `peak_flops`, `mfu`) are here too.
This module never imports ray, rdkit, pydantic or deepspeed: the rung table comes from engine/ladder.py,
and a size is anything with `n_layer`, `d_model`, `n_head` and `ffn_dim`, so a GPU box with torch and
transformers alone can import it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    PreTrainedConfig,
    PreTrainedModel,
    RobertaConfig,
    RobertaForMaskedLM,
)

from clmscale.engine.ladder import FAMILIES, LADDER, Family, RungShape, objective

logger = logging.getLogger(__name__)

# Special-token ids of the tokenizer (docs/CONTRACTS.md): [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4
# [BOS]=5 [EOS]=6. An mlm sequence is [CLS] ... [SEP], a clm sequence [BOS] ... [EOS].
PAD_ID = 0
SPECIAL_IDS: dict[str, dict[str, int]] = {
    "mlm": {"pad_token_id": PAD_ID, "bos_token_id": 2, "eos_token_id": 3},
    "clm": {"pad_token_id": PAD_ID, "bos_token_id": 5, "eos_token_id": 6},
}
MODEL_TYPES: dict[str, Family] = {"roberta": "mlm", "gpt2": "clm", "llama": "llama", "modernbert": "modernbert"}
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "mlm": RobertaForMaskedLM,
    "clm": GPT2LMHeadModel,
    "llama": LlamaForCausalLM,
    "modernbert": ModernBertForMaskedLM,
}
ROPE_THETA = 10_000.0  # RoFormer's and Llama 2's base; SMILES are far shorter than any context it was tuned for


def glu_dim(ffn_dim: int) -> int:
    """Inner width of a gated MLP (llama, modernbert): 2/3 of the rung's d_ff rounded up to a multiple of 8, so
    its three d x d_glu matrices hold about what the two d x d_ff matrices of a GELU MLP do (LLaMA's rule)."""
    return 8 * -(-2 * ffn_dim // 24)  # ceil(2 d_ff / 3 / 8) * 8


def build_config(
    family: Family,
    size: RungShape,
    vocab_size: int,
    max_seq_len: int,
    *,
    pad_token_id: int = PAD_ID,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    dropout: float = 0.0,
    attn_implementation: str = "sdpa",
) -> PreTrainedConfig:
    """A `RobertaConfig` (mlm), `GPT2Config` (clm), `LlamaConfig` (llama) or `ModernBertConfig` (modernbert) for
    one rung; bos/eos default to the ids of the family's objective ([CLS]/[SEP] or [BOS]/[EOS])."""
    ids = SPECIAL_IDS[objective(family)]
    bos = ids["bos_token_id"] if bos_token_id is None else bos_token_id
    eos = ids["eos_token_id"] if eos_token_id is None else eos_token_id
    # what every family's config takes alike; attn_implementation is accepted at runtime (PreTrainedConfig's
    # kwargs) though absent from v5's generated signatures
    shared: dict[str, Any] = {
        "vocab_size": vocab_size,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "tie_word_embeddings": True,
        "attn_implementation": attn_implementation,
    }
    if family == "mlm":
        return RobertaConfig(
            **shared,
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
        )
    if family == "clm":
        return GPT2Config(
            **shared,
            n_positions=max_seq_len,
            n_embd=size.d_model,
            n_layer=size.n_layer,
            n_head=size.n_head,
            n_inner=size.ffn_dim,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            use_cache=False,  # training only; generation can turn it back on
        )
    if family == "llama":
        return LlamaConfig(
            **shared,
            hidden_size=size.d_model,
            intermediate_size=glu_dim(size.ffn_dim),
            num_hidden_layers=size.n_layer,
            num_attention_heads=size.n_head,
            num_key_value_heads=size.n_head,  # full multi-head attention: no grouped queries at these widths
            hidden_act="silu",  # SwiGLU
            max_position_embeddings=max_seq_len,
            rms_norm_eps=1e-5,
            attention_bias=False,
            mlp_bias=False,
            attention_dropout=dropout,
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
            use_cache=False,
        )
    if family == "modernbert":
        return ModernBertConfig(
            **shared,
            hidden_size=size.d_model,
            intermediate_size=glu_dim(size.ffn_dim),
            num_hidden_layers=size.n_layer,
            num_attention_heads=size.n_head,
            hidden_activation="gelu",  # GeGLU
            max_position_embeddings=max_seq_len,
            norm_eps=1e-5,
            norm_bias=False,
            attention_bias=False,
            mlp_bias=False,
            decoder_bias=True,  # the vocabulary bias, as RoBERTa's MLM head has
            classifier_bias=False,
            # every layer global: ModernBERT's local layers (128-token windows) exist for long documents, and a
            # local window as long as the sequence would cost the same as global attention
            layer_types=["full_attention"] * size.n_layer,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": ROPE_THETA},
                "sliding_attention": {"rope_type": "default", "rope_theta": ROPE_THETA},
            },
            attention_dropout=dropout,
            embedding_dropout=dropout,
            mlp_dropout=dropout,
            cls_token_id=bos,
            sep_token_id=eos,
        )
    raise ValueError(f"family must be one of {', '.join(map(repr, FAMILIES))} (got {family!r})")


def family_of(config: PreTrainedConfig) -> Family:
    if config.model_type not in MODEL_TYPES:
        raise ValueError(
            f"expected a {', '.join(f'{t} ({f})' for t, f in MODEL_TYPES.items())} config "
            f"(got model_type {config.model_type!r})"
        )
    return MODEL_TYPES[config.model_type]


def build_model(config: PreTrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised model; the seed drives the init without touching the caller's RNG."""
    cls = MODEL_CLASSES[family_of(config)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config)


def use_eager_attention(model: PreTrainedModel) -> PreTrainedModel:
    """Switch to the plain matmul attention, which supports double backward (Hessian-vector products);
    SDPA's fused kernels do not."""
    model.set_attn_implementation("eager")
    return model


def n_loss_tokens(labels: torch.Tensor, family: Family) -> torch.Tensor:
    """Positions that carry loss (the denominator of the model's mean loss): clm and llama models shift labels
    left by one inside the model, so the first position never counts."""
    if objective(family) == "clm":
        labels = labels[:, 1:]
    return (labels != -100).sum()


def model_inputs(batch: dict[str, torch.Tensor], config: PreTrainedConfig) -> dict[str, torch.Tensor]:
    """The keyword arguments of `model(**...)` for a batch in the docs/CONTRACTS.md format.

    Packed batches carry `position_ids` that restart at 0 for every molecule (engine/data.py).
    mlm: RoBERTa numbers positions from pad_token_id + 1 (row pad_token_id of its table is the
    untrained padding row), so they are shifted by that; modernbert's RoPE takes them as they are.
    clm and llama: the attention mask is dropped, because only with `attention_mask=None` does a
    transformers decoder read the restarts as molecule boundaries and keep attention within each
    molecule (transformers' masking_utils.find_packed_sequence_indices); trailing padding becomes one
    more "molecule" without labels.
    """
    inputs: dict[str, torch.Tensor] = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
    if "position_ids" in batch:
        family = family_of(config)
        if family == "mlm":
            inputs["position_ids"] = batch["position_ids"] + config.pad_token_id + 1
        else:
            inputs["position_ids"] = batch["position_ids"]
        if objective(family) == "clm":
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
    family = family_of(config)
    if family == "llama":
        # q, k, v, o without bias: 4 d^2; SwiGLU gate, up, down: 3 d d_glu; two RMSNorm weights: 2d
        per_layer = 4 * d * d + 3 * d * config.intermediate_size + 2 * d
        non_embedding = n_layer * per_layer + d  # + the final RMSNorm; lm_head is tied
        return ParamCount(total=non_embedding + vocab * d, non_embedding=non_embedding)
    if family == "modernbert":
        # Wqkv and Wo without bias: 4 d^2; GeGLU Wi (d -> 2 d_glu) and Wo: 3 d d_glu; bias-free LayerNorms
        # before attention (none in layer 0, which reads the normed embeddings) and before the MLP: d each
        per_layer = 4 * d * d + 3 * d * config.intermediate_size + 2 * d
        # embedding norm d, final norm d; head: dense d^2 (no bias), norm d; decoder: tied weight + vocabulary bias
        other = d + d + d * d + d + vocab - d  # - d: layer 0 has no attention norm
        non_embedding = n_layer * per_layer + other
        return ParamCount(total=non_embedding + vocab * d, non_embedding=non_embedding)
    if family == "mlm":
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
    """Training FLOPs per token in a sequence of `seq_len` tokens: 6 N_non + 12 n_layer seq_len d_model.

    A forward pass costs 2 N_non per token for the weight matmuls, plus 2 seq_len d_model per layer
    for QK^T and as much again for attention-times-V; the backward twice the forward. Kaplan et al.
    (2020) Table 1 counts only the first of the two attention products (2 n_layer n_ctx d_attn
    forward); the 12 n_layer T d of PaLM (Chowdhery et al. 2022, appendix B) counts both, for full
    (non-causal) attention, which is what eager and SDPA math kernels compute. Embedding lookups and
    the output logits (6 d vocab per token, forward and backward) are left out, as in Kaplan; with
    ~50-token SMILES vocabularies they are a few percent of C only on the smallest rungs.
    C = flops_per_token * tokens.
    """
    n_non = count_params(config).non_embedding
    return 6.0 * n_non + 12.0 * config.num_hidden_layers * seq_len * config.hidden_size


def sequence_flops(config: PreTrainedConfig, lengths: Sequence[int] | np.ndarray) -> float:
    """Training FLOPs of sequences of these lengths, each attending to itself only:
    sum over sequences of l * flops_per_token(config, l)."""
    n = np.asarray(lengths, dtype=np.float64)
    n_non = count_params(config).non_embedding
    return float(6.0 * n_non * n.sum() + 12.0 * config.num_hidden_layers * config.hidden_size * (n * n).sum())


def molecule_lengths(batch: dict[str, torch.Tensor]) -> np.ndarray:
    """Tokens of each molecule in a batch (docs/CONTRACTS.md), specials included, padding not.

    Unpacked rows hold one molecule each; packed rows (with `position_ids`) hold several, each
    starting where its position id is 0. Read on the CPU, before the batch moves to a device.
    """
    real = batch["attention_mask"].bool().cpu().numpy()
    if "position_ids" not in batch:
        return real.sum(axis=1)
    starts = batch["position_ids"].cpu().numpy()[real] == 0  # row-major: the molecules in order
    return np.bincount(np.cumsum(starts) - 1, minlength=int(starts.sum()))


@dataclass(frozen=True)
class BatchCost:
    """What one micro-batch asks of the model, counted on the CPU before it runs."""

    n_tokens_padded: int  # B * T positions the model computes on
    n_tokens_real: int  # non-padding tokens
    flops_padded: float  # flops_per_token at the row length T, for every position
    flops_real: float  # sequence_flops of the molecules alone: what the real tokens need

    def __add__(self, other: BatchCost) -> BatchCost:
        return BatchCost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def batch_cost(batch: dict[str, torch.Tensor], config: PreTrainedConfig) -> BatchCost:
    """Padded and real FLOPs of one micro-batch, so MFU can be quoted against both.

    The padded count is what the kernels execute (padding and cross-molecule attention in packed mlm
    rows included); the real count is the model FLOPs proper: padding is waste, and so is attention
    between packed molecules. sum(batch_cost(b) for b in batches, start=ZERO_COST).
    """
    n_rows, width = batch["input_ids"].shape
    lengths = molecule_lengths(batch)
    return BatchCost(
        n_tokens_padded=n_rows * width,
        n_tokens_real=int(lengths.sum()),
        flops_padded=n_rows * width * flops_per_token(config, width),
        flops_real=sequence_flops(config, lengths),
    )


ZERO_COST = BatchCost(0, 0, 0.0, 0.0)


# Dense (no sparsity) peak FLOP/s per GPU as (bf16, fp32), from NVIDIA's datasheets; the sparse
# figures printed beside them are twice these. fp32 is the plain CUDA-core rate, not TF32 (torch's
# default float32 matmul precision is "highest"). Keys are model names as torch.cuda.get_device_name
# spells them after "NVIDIA " (e.g. "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA A100-SXM4-80GB");
# `peak_flops_of` matches whole words, longest key first, so "H200 NVL" is not an "H200" and "L40" not an "L4".
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H100": (989e12, 67e12),  # H100 SXM datasheet: BF16 1,979 TF sparse, FP32 67 TF
    "H100 PCIe": (756e12, 51e12),  # H100 PCIe: BF16 1,513 TF sparse, FP32 51 TF
    "H100 NVL": (835e12, 60e12),  # H100 NVL (94 GB, one card): BF16 1,671 TF sparse, FP32 60 TF
    "GH200": (989e12, 67e12),  # GH200 Grace Hopper superchip: its H100/H200 GPU, as the SXM part
    "H200": (989e12, 67e12),  # H200 SXM: BF16 1,979 TF sparse, FP32 67 TF
    "H200 NVL": (835e12, 60e12),  # H200 NVL: BF16 1,671 TF sparse, FP32 60 TF
    "A100": (312e12, 19.5e12),  # A100 SXM and PCIe, 40 and 80 GB: BF16 312 TF dense, FP32 19.5 TF
    "L40S": (362e12, 91.6e12),  # L40S: BF16 362.05 TF dense (733 sparse), FP32 91.6 TF
    "L40": (181e12, 90.5e12),  # L40: BF16 181.05 TF dense (362.1 sparse), FP32 90.5 TF
    "L4": (121e12, 30.3e12),  # L4: BF16 121 TF dense (242 sparse), FP32 30.3 TF
    "A10": (125e12, 31.2e12),  # A10 (not the A10G): BF16 125 TF dense (250 sparse), FP32 31.2 TF
}


def _words(name: str) -> list[str]:
    return name.upper().replace("-", " ").split()


def peak_flops_of(device_name: str, bf16: bool) -> float:
    """Datasheet peak FLOP/s of a GPU by its `torch.cuda.get_device_name`; NaN when not in `PEAK_FLOPS`.

    A key matches when its words appear consecutively among the name's words (split on spaces and
    hyphens); of several matches the one with the most words wins ("H200 NVL" over "H200").
    """
    words = _words(device_name)
    matches = [
        key
        for key in PEAK_FLOPS
        if any(words[i : i + len(k)] == k for k in [_words(key)] for i in range(len(words) - len(k) + 1))
    ]
    if not matches:
        return math.nan
    bf16_peak, fp32_peak = PEAK_FLOPS[max(matches, key=lambda key: len(_words(key)))]
    return bf16_peak if bf16 else fp32_peak


def peak_flops(device: torch.device, bf16: bool) -> float:
    """Peak FLOP/s of one device from `PEAK_FLOPS`; NaN on CPU and on GPUs not in the table, so MFU
    is NaN there rather than a made-up number."""
    if device.type != "cuda":
        return math.nan
    name = torch.cuda.get_device_name(device)
    peak = peak_flops_of(name, bf16)
    if math.isnan(peak):
        logger.warning("no peak FLOP/s known for %r; MFU will be NaN (add it to PEAK_FLOPS)", name)
    return peak


def mfu(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: FLOPs done per second over the peak (per device times devices);
    NaN when the peak is unknown or no time passed."""
    if not seconds > 0 or not peak_flops_per_s > 0:
        return math.nan
    return flops / seconds / peak_flops_per_s


def rung_table(
    family: Family, vocab_size: int, max_seq_len: int, sizes: Sequence[RungShape] | None = None
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
    cls = AutoModelForMaskedLM if objective(family_of(config)) == "mlm" else AutoModelForCausalLM
    return cls.from_pretrained(checkpoint_dir, dtype=torch.float32)
