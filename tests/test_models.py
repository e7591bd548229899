"""The ladder: exact parameter counts on every rung, the FLOP formula, configs that run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import pulled_in
from torch.utils.flop_counter import FlopCounterMode

from clmscale.engine.config import LADDER
from clmscale.engine.data import collate
from clmscale.engine.models import (
    ZERO_COST,
    batch_cost,
    build_config,
    build_model,
    count_params,
    flops_per_token,
    mfu,
    model_inputs,
    molecule_lengths,
    peak_flops,
    peak_flops_of,
    rung_table,
    use_eager_attention,
)

VOCAB, SEQ = 45, 128


FAMILIES = ["mlm", "clm", "llama", "modernbert"]
CLASSES = {"mlm": "RobertaForMaskedLM", "clm": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
           "modernbert": "ModernBertForMaskedLM"}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rung", list(LADDER))
def test_count_params_matches_transformers(family, rung):
    config = build_config(family, LADDER[rung], VOCAB, SEQ)
    with torch.device("meta"):  # shapes only: the 1.2B rung costs nothing
        model = build_model(config)
    assert type(model).__name__ == CLASSES[family]
    n = count_params(config)
    assert n.total == model.num_parameters()
    assert n.non_embedding == model.num_parameters(exclude_embeddings=True)
    # Kaplan's N: everything but the token, position (and RoBERTa's token-type) tables; RoPE has no table
    positions = {"mlm": config.max_position_embeddings + 1, "clm": config.max_position_embeddings}.get(family, 0)
    assert n.total - n.non_embedding == (VOCAB + positions) * config.hidden_size


@pytest.mark.parametrize("family", ["llama", "modernbert"])
def test_gated_families_keep_the_rung_shape_and_match_its_mlp_size(family):
    """Same depth, width and heads as the rung; the gated MLP's three matrices about the GELU MLP's two."""
    for rung in LADDER.values():
        config = build_config(family, rung, VOCAB, SEQ)
        assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (
            rung.n_layer, rung.d_model, rung.n_head)  # fmt: skip
        assert config.intermediate_size % 8 == 0 and 0 <= 3 * config.intermediate_size - 2 * rung.ffn_dim < 24
        assert config.tie_word_embeddings and config.max_position_embeddings == SEQ
    llama = build_config("llama", LADDER["m"], VOCAB, SEQ)
    assert (llama.hidden_act, llama.attention_bias, llama.mlp_bias, llama.num_key_value_heads) == ("silu", False, False, 4)
    bert = build_config("modernbert", LADDER["m"], VOCAB, SEQ)
    assert set(bert.layer_types) == {"full_attention"} and (bert.cls_token_id, bert.sep_token_id) == (2, 3)


def test_flops_per_token_counts_both_attention_products():
    config = build_config("clm", LADDER["xs"], VOCAB, 32)
    n_non = count_params(config).non_embedding
    # 6 N_non + 12 n_layer T d: QK^T and AV, forward and backward
    assert flops_per_token(config, 32) == 6 * n_non + 12 * 2 * 32 * 32


def _counted_flops_per_token(config, seq: int) -> float:
    model = use_eager_attention(build_model(config))  # eager: attention shows up as plain matmuls
    ids = torch.randint(7, VOCAB, (2, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops() / ids.numel()


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_per_token_agrees_with_a_flop_counter(family):
    """torch's counter sees the matmuls of one forward + backward. Its count is our formula with the
    terms the formula leaves out put back: the tied output logits (6 d V) in, the parameters that are
    no matmul's weight (biases, LayerNorms and RMSNorms, the MLM heads' vocabulary bias) out."""
    size = LADDER["m"]
    d, n_layer = size.d_model, size.n_layer
    for seq in (16, 32):
        config = build_config(family, size, VOCAB, seq)
        # a GELU MLP has two d x d_ff matrices, a gated one three d x d_glu; + the MLM heads' dense d x d
        mlp = 2 * d * size.ffn_dim if family in ("mlm", "clm") else 3 * d * config.intermediate_size
        matmul_weights = n_layer * (4 * d * d + mlp) + (d * d if family in ("mlm", "modernbert") else 0)
        not_matmul = count_params(config).non_embedding - matmul_weights
        measured = _counted_flops_per_token(config, seq)
        assert measured == flops_per_token(config, seq) + 6 * d * VOCAB - 6 * not_matmul
        assert measured == pytest.approx(flops_per_token(config, seq), rel=0.01)


def test_attention_term_grows_with_sequence_length_as_counted():
    """The part of the count that depends on T is attention alone: 12 n_layer d per extra token of context
    (Kaplan's 6 would be half of it)."""
    config16, config32 = (build_config("mlm", LADDER["m"], VOCAB, t) for t in (16, 32))
    counted = _counted_flops_per_token(config32, 32) - _counted_flops_per_token(config16, 16)
    formula = flops_per_token(config32, 32) - flops_per_token(config16, 16)
    assert counted == formula == 12 * LADDER["m"].n_layer * LADDER["m"].d_model * 16


def _collated(lengths: list[int], family: str, packing: bool, max_seq_len: int = 16) -> dict:
    rng = np.random.default_rng(0)
    ids = [[2, *rng.integers(7, VOCAB, n - 2).tolist(), 3] for n in lengths]
    return collate(ids, family, pad_id=0, mask_id=4, vocab_size=VOCAB, special_ids=list(range(7)),
                   mlm_probability=0.15, mask_seed=0, packing=packing, max_seq_len=max_seq_len)  # fmt: skip


@pytest.mark.parametrize("family", ["mlm", "clm"])
def test_batch_cost_padded_and_real(family):
    lengths = [5, 9, 3, 12, 7]
    config = build_config(family, LADDER["xs"], VOCAB, 16)
    for packing in (False, True):
        batch = _collated(lengths, family, packing)
        assert molecule_lengths(batch).tolist() == lengths
        cost = batch_cost(batch, config)
        n_rows, width = batch["input_ids"].shape
        assert (cost.n_tokens_padded, cost.n_tokens_real) == (n_rows * width, sum(lengths))
        assert cost.flops_padded == n_rows * width * flops_per_token(config, width)
        assert cost.flops_real == pytest.approx(sum(n * flops_per_token(config, n) for n in lengths), rel=1e-12)
        assert cost.flops_real < cost.flops_padded
    unpacked, packed = (batch_cost(_collated(lengths, family, p), config) for p in (False, True))
    assert packed.flops_real == unpacked.flops_real  # the same molecules need the same work
    assert packed.n_tokens_padded < unpacked.n_tokens_padded  # 3 rows of 16 instead of 5 rows of 16
    total = sum([unpacked, packed], start=ZERO_COST)
    assert total.n_tokens_real == 2 * sum(lengths) and total.flops_padded == unpacked.flops_padded + packed.flops_padded


@pytest.mark.parametrize(
    "name, bf16_tflops, fp32_tflops",
    [
        ("NVIDIA H200", 989, 67),
        ("NVIDIA H200 NVL", 835, 60),  # a substring match would give the SXM part's 989
        ("NVIDIA H100 80GB HBM3", 989, 67),  # the SXM part's name
        ("NVIDIA H100 PCIe", 756, 51),
        ("NVIDIA H100 NVL", 835, 60),
        ("NVIDIA GH200 480GB", 989, 67),
        ("NVIDIA A100-SXM4-80GB", 312, 19.5),
        ("NVIDIA A100 80GB PCIe", 312, 19.5),
        ("NVIDIA L40S", 362, 91.6),
        ("NVIDIA L40", 181, 90.5),  # a substring match would give the L4's 121
        ("NVIDIA L4", 121, 30.3),
        ("NVIDIA A10", 125, 31.2),
    ],
)
def test_peak_flops_by_device_name(name, bf16_tflops, fp32_tflops):
    assert peak_flops_of(name, bf16=True) == bf16_tflops * 1e12
    assert peak_flops_of(name, bf16=False) == fp32_tflops * 1e12


@pytest.mark.parametrize("name", ["NVIDIA A10G", "Tesla V100-SXM2-16GB", "NVIDIA GeForce RTX 4090", ""])
def test_unknown_gpus_have_no_peak(name):
    assert math.isnan(peak_flops_of(name, bf16=True))


def test_mfu_and_its_unknowns():
    assert mfu(5e14, 2.0, 1e15) == 0.25
    assert math.isnan(mfu(5e14, 2.0, math.nan))  # CPU, or a GPU not in PEAK_FLOPS
    assert math.isnan(mfu(5e14, 0.0, 1e15))
    assert math.isnan(peak_flops(torch.device("cpu"), bf16=True))


def test_rung_table_covers_the_ladder():
    rows = rung_table("mlm", VOCAB, SEQ)
    assert [r["name"] for r in rows] == list(LADDER)
    assert all(a["n_params"] < b["n_params"] for a, b in zip(rows, rows[1:]))
    assert rows[0]["d_ff"] == 4 * rows[0]["d_model"]
    assert rows[0]["n_params"] == count_params(build_config("mlm", LADDER["xxs"], VOCAB, SEQ)).total


def test_roberta_takes_full_length_and_packed_positions():
    config = build_config("mlm", LADDER["xxs"], VOCAB, 16)
    model = build_model(config).eval()
    ids = torch.randint(7, VOCAB, (2, 16))  # no padding: positions run up to max_seq_len + pad_id
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    assert torch.isfinite(model(**model_inputs(batch, config)).loss)
    packed = {**batch, "position_ids": torch.arange(16).repeat(2, 1)}  # 0-based, as data.py packs
    shifted = model_inputs(packed, config)["position_ids"]
    assert shifted.min() == config.pad_token_id + 1 and shifted.max() < config.max_position_embeddings
    logits = model(**model_inputs(batch, config)).logits
    torch.testing.assert_close(model(**model_inputs(packed, config)).logits, logits)


def packed_pair() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Two molecules (6 and 7 tokens) packed in one row with 3 padding positions, positions restarted."""
    first, second = torch.randint(7, VOCAB, (1, 6)), torch.randint(7, VOCAB, (1, 7))
    ids = torch.cat([first, second, torch.zeros(1, 3, dtype=torch.long)], dim=1)  # + 3 padding
    packed = {
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "position_ids": torch.cat([torch.arange(6), torch.arange(7), torch.arange(3)]).unsqueeze(0),
    }
    return first, second, packed


def test_gpt2_keeps_packed_molecules_apart():
    config = build_config("clm", LADDER["xxs"], VOCAB, 16)
    model = build_model(config).eval()
    first, second, packed = packed_pair()
    logits = model(**model_inputs(packed, config)).logits
    torch.testing.assert_close(logits[:, 6:13], model(input_ids=second).logits)
    torch.testing.assert_close(logits[:, :6], model(input_ids=first).logits)


def test_llama_keeps_packed_molecules_apart_and_modernbert_reads_restarted_positions():
    first, second, packed = packed_pair()
    config = build_config("llama", LADDER["xxs"], VOCAB, 16)
    model = build_model(config).eval()
    inputs = model_inputs(packed, config)
    assert "attention_mask" not in inputs  # the decoder finds the molecules from the position restarts
    logits = model(**inputs).logits
    torch.testing.assert_close(logits[:, 6:13], model(input_ids=second).logits)
    torch.testing.assert_close(logits[:, :6], model(input_ids=first).logits)
    config = build_config("modernbert", LADDER["xxs"], VOCAB, 16)
    inputs = model_inputs(packed, config)  # bidirectional: the mask stays, positions are RoPE's as given
    assert torch.equal(inputs["position_ids"], packed["position_ids"]) and "attention_mask" in inputs
    assert torch.isfinite(build_model(config).eval()(**inputs).logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_attention_allows_double_backward(family):
    config = build_config(family, LADDER["xxs"], VOCAB, 16)
    model = use_eager_attention(build_model(config))
    assert model.config._attn_implementation == "eager"
    ids = torch.randint(7, VOCAB, (2, 16))
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, params, create_graph=True)
    vector = [torch.ones_like(g) for g in grads]
    hvp = torch.autograd.grad(grads, params, grad_outputs=vector, allow_unused=True)
    assert any(h is not None and h.abs().sum() > 0 for h in hvp)


def test_seeded_init_leaves_global_rng_alone():
    config = build_config("clm", LADDER["xxs"], VOCAB, 16)
    before = torch.get_rng_state()
    a, b, c = build_model(config, seed=1), build_model(config, seed=1), build_model(config, seed=2)
    assert torch.equal(torch.get_rng_state(), before)
    wa, wb, wc = (m.transformer.h[0].attn.c_attn.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_models_and_train_import_without_ray_or_rdkit():
    """A GPU box may have neither: the training core must not pull them in."""
    assert pulled_in("clmscale.engine.models, clmscale.engine.train", {"ray", "rdkit"}) == []


def test_ladder_and_flop_formulas_import_without_pydantic_ray_deepspeed_or_rdkit():
    """The GPU image has torch and transformers only (benchmarks/gpu_readiness.py runs there)."""
    assert pulled_in("clmscale.engine.ladder, clmscale.engine.models", {"pydantic", "ray", "deepspeed", "rdkit"}) == []


def test_config_ladder_is_the_plain_table_validated():
    from clmscale.engine import ladder

    assert list(LADDER) == list(ladder.LADDER)
    for name, rung in ladder.LADDER.items():
        size = LADDER[name]
        assert (size.name, size.n_layer, size.d_model, size.n_head, size.ffn_dim) == (
            rung.name, rung.n_layer, rung.d_model, rung.n_head, rung.ffn_dim)  # fmt: skip
        assert build_config("mlm", rung, VOCAB, SEQ).to_dict() == build_config("mlm", size, VOCAB, SEQ).to_dict()
    with pytest.raises(ValueError, match="d_model must be divisible by n_head"):
        ladder.Rung("bad", 2, 30, 4)
