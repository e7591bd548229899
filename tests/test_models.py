"""The ladder: exact parameter counts on every rung, the FLOP formula, configs that run."""

from __future__ import annotations

import pytest
import torch
from conftest import pulled_in
from torch.utils.flop_counter import FlopCounterMode

from engine.config import LADDER
from engine.models import (
    build_config,
    build_model,
    count_params,
    flops_per_token,
    model_inputs,
    rung_table,
    use_eager_attention,
)

VOCAB, SEQ = 45, 128


@pytest.mark.parametrize("family", ["mlm", "clm"])
@pytest.mark.parametrize("rung", list(LADDER))
def test_count_params_matches_transformers(family, rung):
    config = build_config(family, LADDER[rung], VOCAB, SEQ)
    with torch.device("meta"):  # shapes only: the 1.2B rung costs nothing
        model = build_model(config)
    n = count_params(config)
    assert n.total == model.num_parameters()
    assert n.non_embedding == model.num_parameters(exclude_embeddings=True)
    # Kaplan's N: everything but the token, position (and RoBERTa's token-type) tables
    n_types = config.type_vocab_size if family == "mlm" else 0
    tables = (VOCAB + config.max_position_embeddings + n_types) * config.hidden_size
    assert n.total - n.non_embedding == tables


def test_flops_per_token_is_kaplan():
    config = build_config("clm", LADDER["xs"], VOCAB, 32)
    n_non = count_params(config).non_embedding
    assert flops_per_token(config, 32) == 6 * n_non + 6 * 2 * 32 * 32


def test_flops_per_token_agrees_with_a_flop_counter():
    """torch's counter sees the matmuls of one forward + backward; besides 6 N it counts the logits
    (6 d V) and full (non-causal) attention 12 n_layer T d, both left out or halved by Kaplan: a few %."""
    seq = 32
    config = build_config("clm", LADDER["m"], VOCAB, seq)
    model = use_eager_attention(build_model(config))  # eager: attention shows up as plain matmuls
    ids = torch.randint(7, VOCAB, (2, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    measured = counter.get_total_flops() / ids.numel()
    assert measured == pytest.approx(flops_per_token(config, seq), rel=0.05)


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


def test_gpt2_keeps_packed_molecules_apart():
    config = build_config("clm", LADDER["xxs"], VOCAB, 16)
    model = build_model(config).eval()
    first, second = torch.randint(7, VOCAB, (1, 6)), torch.randint(7, VOCAB, (1, 7))
    ids = torch.cat([first, second, torch.zeros(1, 3, dtype=torch.long)], dim=1)  # + 3 padding
    packed = {
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "position_ids": torch.cat([torch.arange(6), torch.arange(7), torch.arange(3)]).unsqueeze(0),
    }
    logits = model(**model_inputs(packed, config)).logits
    torch.testing.assert_close(logits[:, 6:13], model(input_ids=second).logits)
    torch.testing.assert_close(logits[:, :6], model(input_ids=first).logits)


def test_eager_attention_allows_double_backward():
    config = build_config("mlm", LADDER["xxs"], VOCAB, 16)
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
    assert pulled_in("engine.models, engine.train", {"ray", "rdkit"}) == []
