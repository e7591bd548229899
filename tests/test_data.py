"""data: encoding, MLM masking statistics, CLM labels, packing, determinism, and the Ray Train split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import first_moses

from clmscale.engine import data
from clmscale.engine.config import TrainConfig
from clmscale.engine.tokenizer import build_tokenizer, smiles_tokens

MAX_SEQ_LEN = 64
N_TRAIN = 640  # 20 batches of 32: divisible by 2 workers, so the equal split drops nothing


@pytest.fixture(scope="module")
def moses() -> list[str]:
    return first_moses(3_000)


@pytest.fixture(scope="module")
def tokenizer(moses):
    return build_tokenizer(moses)


def write_shard(path: Path, smiles: list[str]) -> Path:
    n_tokens = pa.array([len(smiles_tokens(s)) for s in smiles], pa.int32())
    pq.write_table(pa.table({"smiles": smiles, "n_tokens": n_tokens}), path, row_group_size=128)
    return path


@pytest.fixture(scope="module")
def shards(moses, tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("shards")
    half = N_TRAIN // 2
    return {
        "train": [write_shard(root / "train-00000.parquet", moses[:half]),
                  write_shard(root / "train-00001.parquet", moses[half:N_TRAIN])],  # fmt: skip
        "val": [write_shard(root / "val-00000.parquet", moses[2_000:2_300])],
    }


def collate(ids, tokenizer, family, seed=0, **kwargs):
    args = {**data.collate_args(tokenizer), "mlm_probability": 0.15, **kwargs}
    return data.collate(ids, family, mask_seed=seed, **args)


def real_rows(batch) -> list[tuple[int, ...]]:
    """The unpadded rows of a batch."""
    return [tuple(row[: int(m.sum())]) for row, m in zip(batch["input_ids"].tolist(), batch["attention_mask"])]


def original_rows(batches) -> list[tuple[int, ...]]:
    """The unpadded rows of masked batches, with the masked targets put back."""
    rows = []
    for batch in batches:
        ids = torch.where(batch["labels"] != data.IGNORE_INDEX, batch["labels"], batch["input_ids"])
        rows += real_rows({**batch, "input_ids": ids})
    return rows


# ---------------------------------------------------------------------------------------------
# encode


@pytest.mark.parametrize("family, wrap", [("mlm", ("[CLS]", "[SEP]")), ("clm", ("[BOS]", "[EOS]"))])
def test_encode_wraps_per_family_and_keeps_the_closing_token(tokenizer, moses, family, wrap):
    open_id, close_id = tokenizer.convert_tokens_to_ids(list(wrap))
    ids = data.encode(moses[:50], tokenizer, family, max_seq_len=20)
    plain = tokenizer(moses[:50], add_special_tokens=False)["input_ids"]
    for seq, body in zip(ids, plain):
        assert seq[0] == open_id and seq[-1] == close_id
        assert seq[1:-1] == body[:18] and len(seq) == min(len(body) + 2, 20)
    assert any(len(body) > 18 for body in plain)  # truncation was exercised
    tokenizer(moses[:4], padding="max_length", truncation=True, max_length=80)  # sets state in the Rust core
    assert data.encode(moses[:50], tokenizer, family, max_seq_len=20) == ids


# ---------------------------------------------------------------------------------------------
# collate: MLM masking, CLM labels


def test_mlm_masking_is_15_percent_split_80_10_10_and_never_touches_specials(tokenizer, moses):
    ids = data.encode(moses[:2_000], tokenizer, "mlm", MAX_SEQ_LEN)
    batch = collate(ids, tokenizer, "mlm")
    original = collate(ids, tokenizer, "clm")["input_ids"]  # unmasked, same padding
    picked = batch["labels"] != data.IGNORE_INDEX
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    candidates = (batch["attention_mask"] == 1) & ~special

    assert not (picked & ~candidates).any()  # no [CLS]/[SEP]/[PAD] is ever a target
    assert torch.equal(batch["labels"][picked], original[picked])
    assert batch["input_ids"].shape[1] % data.PAD_MULTIPLE == 0
    n = int(picked.sum())
    assert abs(n / int(candidates.sum()) - 0.15) < 0.01, n  # ~67k candidates: sd of the rate ~0.0014
    to_mask = picked & (batch["input_ids"] == tokenizer.mask_token_id)
    unchanged = picked & (batch["input_ids"] == original)
    replaced = picked & ~to_mask & ~unchanged
    assert abs(int(to_mask.sum()) / n - 0.8) < 0.02
    assert abs(int(replaced.sum()) / n - 0.1) < 0.02  # random token (a few collide with the original)
    assert abs(int(unchanged.sum()) / n - 0.1) < 0.02
    assert not torch.isin(batch["input_ids"][replaced], torch.tensor(tokenizer.all_special_ids)).any()
    assert torch.equal(batch["input_ids"][~picked], original[~picked])


def test_mlm_masks_at_least_one_token_per_batch(tokenizer, moses):
    ids = data.encode(moses[:2], tokenizer, "mlm", MAX_SEQ_LEN)
    for seed in range(20):
        batch = collate(ids, tokenizer, "mlm", seed=seed, mlm_probability=1e-6)
        assert int((batch["labels"] != data.IGNORE_INDEX).sum()) == 1


def test_clm_labels_are_the_inputs_with_padding_ignored(tokenizer, moses):
    ids = data.encode(moses[:33], tokenizer, "clm", MAX_SEQ_LEN)
    batch = collate(ids, tokenizer, "clm")
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.int64 for v in batch.values())
    width = batch["input_ids"].shape[1]
    assert width % data.PAD_MULTIPLE == 0 and width - max(map(len, ids)) < data.PAD_MULTIPLE
    pad = batch["attention_mask"] == 0
    assert torch.equal(batch["labels"][~pad], batch["input_ids"][~pad])
    assert (batch["labels"][pad] == data.IGNORE_INDEX).all()
    assert (batch["input_ids"][pad] == tokenizer.pad_token_id).all()
    assert real_rows(batch) == [tuple(seq) for seq in ids]


# ---------------------------------------------------------------------------------------------
# packing


@pytest.mark.parametrize("family", ["mlm", "clm"])
def test_packing_keeps_every_token_once_and_restarts_positions(tokenizer, moses, family):
    ids = data.encode(moses[:100], tokenizer, family, MAX_SEQ_LEN)
    batch = collate(ids, tokenizer, family, packing=True, max_seq_len=2 * MAX_SEQ_LEN)
    plain = collate(ids, tokenizer, "clm", packing=True, max_seq_len=2 * MAX_SEQ_LEN)  # unmasked ids
    real = plain["attention_mask"] == 1
    assert plain["input_ids"][real].tolist() == [t for seq in ids for t in seq]  # in order, once each
    assert batch["input_ids"].shape[1] <= 2 * MAX_SEQ_LEN
    assert len(ids) / batch["input_ids"].shape[0] > 2  # rows really hold several molecules

    positions = batch["position_ids"][real].tolist()
    assert positions == [p for seq in ids for p in range(len(seq))]
    open_id = ids[0][0]
    starts = (plain["input_ids"] == open_id) & real
    assert (batch["position_ids"][starts] == 0).all() and int((batch["position_ids"][real] == 0).sum()) == len(ids)
    labelled = batch["labels"] != data.IGNORE_INDEX
    assert not (labelled & ~real).any()
    if family == "mlm":  # each molecule's [CLS]/[SEP] stay visible and are never targets
        assert not (labelled & torch.isin(plain["input_ids"], torch.tensor(tokenizer.all_special_ids))).any()
    else:  # no loss on guessing a molecule's [BOS] from the molecule before it
        assert torch.equal(labelled, real & ~starts)


def test_packed_stream_fills_micro_batches_of_rows(shards, tokenizer):
    batches = list(data.local_batches(shards["train"], tokenizer, "mlm", 8, 2 * MAX_SEQ_LEN, 0, 0, packing=True))
    assert [b["input_ids"].shape[0] for b in batches[:-1]] == [8] * (len(batches) - 1)
    assert 0 < batches[-1]["input_ids"].shape[0] <= 8
    n_molecules = sum(int((b["position_ids"][b["attention_mask"] == 1] == 0).sum()) for b in batches)
    assert n_molecules == N_TRAIN


def test_packed_clm_rows_do_not_mix_molecules_in_gpt2(tokenizer, moses):
    """The claim in `collate`'s docstring: attention_mask=None + restarting position_ids isolate molecules."""
    from transformers import GPT2Config, GPT2LMHeadModel

    ids = data.encode(moses[:8], tokenizer, "clm", MAX_SEQ_LEN)
    packed = collate(ids, tokenizer, "clm", packing=True, max_seq_len=2 * MAX_SEQ_LEN)
    plain = collate(ids, tokenizer, "clm")
    assert packed["input_ids"].shape[0] < len(ids) / 2
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=2 * MAX_SEQ_LEN, n_embd=16, n_layer=1, n_head=2,
                        use_cache=False)  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        plain_logits = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
        packed_loss = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                            labels=packed["labels"]).loss  # fmt: skip
        plain_loss = model(**plain).loss
    real = packed["attention_mask"] == 1
    per_molecule = torch.cat([plain_logits[i, : len(seq)] for i, seq in enumerate(ids)])
    torch.testing.assert_close(packed_logits[real], per_molecule)
    torch.testing.assert_close(packed_loss, plain_loss)


# ---------------------------------------------------------------------------------------------
# the plain path: determinism, ranks, validation


def test_local_batches_repeat_per_seed_and_epoch_and_differ_across_epochs(shards, tokenizer):
    def run(seed, epoch):
        return list(data.local_batches(shards["train"], tokenizer, "mlm", 32, MAX_SEQ_LEN, seed, epoch))

    first = run(seed=1, epoch=0)
    again = run(seed=1, epoch=0)
    assert len(first) == N_TRAIN // 32
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again) for k in a)
    later = run(seed=1, epoch=1)
    assert not torch.equal(first[0]["labels"], later[0]["labels"])
    assert original_rows(first) != original_rows(later)
    assert sorted(original_rows(first)) == sorted(original_rows(later))


def test_masks_depend_on_seed_epoch_and_content_only(tokenizer, moses):
    ids = data.encode(moses[:32], tokenizer, "mlm", MAX_SEQ_LEN)
    args = {**data.collate_args(tokenizer), "mlm_probability": 0.15}

    def masked(seed, epoch, seqs):
        return data.collate(seqs, "mlm", mask_seed=data.batch_seed(seed, epoch, seqs), **args)["labels"]

    assert torch.equal(masked(0, 0, ids), masked(0, 0, [list(s) for s in ids]))
    assert not torch.equal(masked(0, 0, ids), masked(0, 1, ids))
    assert not torch.equal(masked(0, 0, ids), masked(1, 0, ids))


def test_ranks_get_disjoint_equal_parts_of_the_epoch(shards, tokenizer):
    world = 3
    parts = [
        [r for b in data.local_batches(shards["train"], tokenizer, "clm", 32, MAX_SEQ_LEN, 0, 0,
                                       rank=rank, world_size=world) for r in real_rows(b)]  # fmt: skip
        for rank in range(world)
    ]
    assert len({len(p) for p in parts}) == 1 and sum(map(len, parts)) == N_TRAIN - N_TRAIN % world
    all_rows = data.encode(data.read_smiles(shards["train"]), tokenizer, "clm", MAX_SEQ_LEN)
    index = {}
    for i, seq in enumerate(all_rows):
        index.setdefault(tuple(seq), []).append(i)
    taken = [index[row].pop() for part in parts for row in part]
    assert len(set(taken)) == len(taken)  # disjoint (duplicates in MOSES are told apart by index)


def test_validation_batches_are_fixed_and_come_first_in_file_order(shards, tokenizer):
    def val(**kw):
        return data.validation_batches(shards["val"], tokenizer, "mlm", 4, 16, MAX_SEQ_LEN, **kw)

    first, second = val(), val()
    assert len(first) == 4
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, second) for k in a)
    expected = data.encode(data.read_smiles(shards["val"])[:64], tokenizer, "mlm", MAX_SEQ_LEN)
    assert original_rows(first) == [tuple(s) for s in expected]


def test_a_shard_without_smiles_is_named(tmp_path, tokenizer):
    bad = tmp_path / "train-00000.parquet"
    pq.write_table(pa.table({"SMILES": ["CCO"]}), bad)
    with pytest.raises(ValueError, match=r"train-00000.parquet: no 'smiles' column"):
        list(data.local_batches([bad], tokenizer, "mlm", 4, MAX_SEQ_LEN, 0, 0))


# ---------------------------------------------------------------------------------------------
# the Ray path


@pytest.mark.timeout(180)
def test_ray_dataset_reshuffles_per_pass_and_repeats_per_run(ray_cluster, shards, tokenizer):
    """Driver-side passes over the dataset (what a worker's shard does, without the split)."""

    def passes(n):
        ds = data.train_dataset(shards["train"], tokenizer, "mlm", 32, MAX_SEQ_LEN, seed=3)
        return [list(data.worker_batches(ds, epoch, data.Masking.of(tokenizer, 0.15))) for epoch in range(n)]

    run = passes(2)
    epoch0, epoch1 = original_rows(run[0]), original_rows(run[1])
    expected = data.encode(data.read_smiles(shards["train"]), tokenizer, "mlm", MAX_SEQ_LEN)
    assert sorted(epoch0) == sorted(epoch1) == sorted(tuple(s) for s in expected)
    assert epoch0 != epoch1
    assert [b["input_ids"].shape[0] for b in run[0]] == [32] * (N_TRAIN // 32)
    rerun = passes(1)[0]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(run[0], rerun) for k in a)


@pytest.mark.timeout(180)
def test_a_unique_data_budget_reads_the_first_molecules_of_the_split_at_every_pass(ray_cluster, shards, tokenizer):
    """budget.unique_molecules: both paths draw from the first n molecules in shard order (across the
    shard boundary here), every pass, reshuffled; a smaller budget is a prefix of a larger."""
    n = N_TRAIN // 2 + 100
    first = sorted(tuple(s) for s in data.encode(data.read_smiles(shards["train"])[:n], tokenizer, "clm", MAX_SEQ_LEN))
    ds = data.train_dataset(shards["train"], tokenizer, "clm", 16, MAX_SEQ_LEN, seed=1, n_molecules=n)
    passes = [real_rows_of(data.worker_batches(ds, epoch)) for epoch in range(2)]
    assert sorted(passes[0]) == sorted(passes[1]) == first and passes[0] != passes[1]
    local = real_rows_of(data.local_batches(shards["train"], tokenizer, "clm", 16, MAX_SEQ_LEN, 1, 0, n_molecules=n))
    assert sorted(local) == first


def real_rows_of(batches) -> list[tuple[int, ...]]:
    return [row for batch in batches for row in real_rows(batch)]


@pytest.mark.timeout(120)
def test_ray_dataset_packs_like_the_plain_path(ray_cluster, shards, tokenizer):
    common = {"family": "clm", "micro_batch_size": 8, "max_seq_len": 2 * MAX_SEQ_LEN, "seed": 0, "packing": True}
    ds = data.train_dataset(shards["train"], tokenizer, shuffle=False, **common)
    through_ray = list(data.worker_batches(ds, epoch=0))
    plain = list(data.local_batches(shards["train"], tokenizer, epoch=0, shuffle=False, **common))
    assert len(through_ray) == len(plain)  # 640 molecules: one Ray map call, so the same grouping
    assert all(set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(through_ray, plain))


def real_fraction(batches) -> float:
    return sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["attention_mask"].numel() for b in batches)


def test_length_buckets_cut_the_padding_and_keep_every_molecule_once(shards, tokenizer):
    """train.length_buckets: the same molecules, each once per epoch, in batches of about one length; the
    batch order is seeded (the same run repeats it, another epoch deals it differently)."""
    def run(epoch, buckets):
        return list(data.local_batches(shards["train"], tokenizer, "mlm", 32, MAX_SEQ_LEN, 1, epoch,
                                       length_buckets=buckets))  # fmt: skip

    plain, bucketed = run(0, False), run(0, True)
    assert len(bucketed) == len(plain) == N_TRAIN // 32
    assert sorted(original_rows(bucketed)) == sorted(original_rows(plain))
    # 77 % real tokens -> 90 % (what is left: widths rounded up to a multiple of 8)
    assert real_fraction(plain) < 0.80 < 0.88 < real_fraction(bucketed)
    assert same_batches(bucketed, run(0, True))
    later = run(1, True)
    assert original_rows(later) != original_rows(bucketed) and sorted(original_rows(later)) == sorted(original_rows(plain))
    lengths = [len(r) for r in original_rows(bucketed)]
    assert lengths[:32] != sorted(lengths)[:32]  # the window's batches are dealt in a shuffled order, not short first
    with pytest.raises(ValueError, match="length_buckets"):
        TrainConfig(packing=True, length_buckets=True)


@pytest.mark.timeout(120)
def test_ray_dataset_buckets_like_the_plain_path(ray_cluster, shards, tokenizer):
    common = {"family": "mlm", "micro_batch_size": 32, "max_seq_len": MAX_SEQ_LEN, "seed": 0, "length_buckets": True}
    probe = data.train_dataset(shards["train"], tokenizer, shuffle=False, **common)
    [row] = probe.take(1)  # the data CPUs only pad: an mlm row is unmasked, without labels, with its masking seed
    assert "labels" not in row and "mask_seed" in row and tokenizer.mask_token_id not in row["input_ids"]
    with pytest.raises(ValueError, match="masked by the worker"):
        next(data.worker_batches(probe, 0))
    ds = data.train_dataset(shards["train"], tokenizer, shuffle=False, **common)  # a fresh one: passes from 0
    through_ray = list(data.worker_batches(ds, 0, data.Masking.of(tokenizer, 0.15), device="cpu"))
    plain = list(data.local_batches(shards["train"], tokenizer, epoch=0, shuffle=False, **common))
    assert same_batches(through_ray, plain)  # 640 molecules: one window, one Ray map call; the same masks
    assert real_fraction(plain) > 0.88


@pytest.mark.timeout(300)  # ~30 s on an idle 2-core machine; shared machines are slower
def test_ray_train_workers_get_disjoint_streams_covering_the_data(ray_cluster, shards, tokenizer, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def record_worker_stream(config: dict) -> None:
        """Ray Train loop: write the real rows this worker sees, per epoch. Defined here so that it is
        pickled by value: workers cannot import this test module."""
        import ray.train

        from clmscale.engine import data

        shard = ray.train.get_dataset_shard("train")
        epochs = []
        for epoch in range(2):
            epochs.append([row[: int(m.sum())] for b in data.worker_batches(shard, epoch)
                           for row, m in zip(b["input_ids"].tolist(), b["attention_mask"])])  # fmt: skip
        rank = ray.train.get_context().get_world_rank()
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps(epochs))

    ds = data.train_dataset(shards["train"], tokenizer, "clm", 32, MAX_SEQ_LEN, seed=0)
    TorchTrainer(
        record_worker_stream,
        train_loop_config={"out": str(tmp_path)},
        # 0.5 CPU each leaves one of the 2 CPUs to Ray Data; 1 + 1 stalls the pipeline silently
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"train": ds},
        run_config=RunConfig(storage_path=str(tmp_path / "ray")),
    ).fit()
    streams = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = sorted(map(tuple, data.encode(data.read_smiles(shards["train"]), tokenizer, "clm", MAX_SEQ_LEN)))
    for epoch in range(2):
        rank0, rank1 = (list(map(tuple, s[epoch])) for s in streams)
        assert len(rank0) == len(rank1) == N_TRAIN // 2  # the equal split
        assert sorted(rank0 + rank1) == expected  # disjoint and complete (the counts match exactly)
    assert streams[0][0] != streams[0][1]  # reshuffled between epochs


def test_the_stream_s_scheduling_loop_backs_off_instead_of_spinning():
    """engine.raydata.IdleBackoff: a step right after the last one sleeps; one after a wait does not."""
    import time

    from ray.data import DataContext

    from clmscale.engine import raydata

    assert raydata.IdleBackoff in raydata.configure(DataContext()).custom_execution_callback_classes
    backoff = raydata.IdleBackoff()
    start = time.perf_counter()
    backoff.on_execution_step(None)  # returns at once after __init__: a spinning loop
    assert time.perf_counter() - start >= raydata.BACKOFF_S
    time.sleep(2 * raydata.FAST_STEP_S)  # a step that waited on a task
    start = time.perf_counter()
    backoff.on_execution_step(None)
    assert time.perf_counter() - start < raydata.BACKOFF_S


# ---------------------------------------------------------------------------------------------
# pre-tokenised shards (prepare's `ids` column): a read instead of an encode, the same batches


@pytest.fixture(scope="module")
def id_shards(shards, tokenizer, tmp_path_factory) -> dict[str, list[Path]]:
    """The same molecules as `shards`, written as prepare writes them: smiles, n_tokens and the tokenizer's ids."""
    from clmscale.engine.prepare import shard_table

    root = tmp_path_factory.mktemp("id_shards")
    out: dict[str, list[Path]] = {}
    for split, paths in shards.items():
        out[split] = []
        for path in paths:
            table = pq.read_table(path)
            pq.write_table(shard_table(table["smiles"].to_pylist(), table["n_tokens"], tokenizer.get_vocab()),
                           root / path.name, row_group_size=128)  # fmt: skip
            out[split].append(root / path.name)
    return out


def same_batches(a, b) -> bool:
    a, b = list(a), list(b)
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b, strict=True))  # fmt: skip


@pytest.mark.parametrize("family, packing, max_seq_len", [("mlm", False, 24), ("clm", True, 2 * MAX_SEQ_LEN)])
def test_pre_tokenised_shards_give_the_batches_encoding_gives(shards, id_shards, tokenizer, family, packing,
                                                              max_seq_len, monkeypatch):  # fmt: skip
    """Ids read from the shards, wrapped and cut as `encode` does (24 tokens cuts long molecules): the same batches,
    masks included (they are seeded by the ids), epoch by epoch and rank by rank; a unique-data prefix too."""
    assert pq.read_schema(id_shards["train"][0]).field("ids").type == pa.list_(pa.uint8())
    common = {"family": family, "micro_batch_size": 16, "max_seq_len": max_seq_len, "seed": 3, "packing": packing}
    cases = ({"epoch": 0}, {"epoch": 1, "rank": 1, "world_size": 2}, {"epoch": 2, "n_molecules": 333})
    encoded = [list(data.local_batches(shards["train"], tokenizer, **common, **kwargs)) for kwargs in cases]
    val = list(data.validation_batches(shards["val"], tokenizer, n_batches=5, **{**common, "seed": 0}))

    def no_encoding(*args, **kwargs):
        raise AssertionError("pre-tokenised shards were encoded again")

    monkeypatch.setattr(data, "encode", no_encoding)
    for kwargs, expected in zip(cases, encoded, strict=True):
        assert same_batches(data.local_batches(id_shards["train"], tokenizer, **common, **kwargs), expected), kwargs
    assert same_batches(data.validation_batches(id_shards["val"], tokenizer, n_batches=5, **{**common, "seed": 0}), val)


@pytest.mark.timeout(180)
def test_ray_stream_reads_ids_and_gives_the_same_batches(ray_cluster, shards, id_shards, tokenizer):
    common = {"family": "mlm", "micro_batch_size": 16, "max_seq_len": 24, "seed": 5}
    from_ids = data.train_dataset(id_shards["train"], tokenizer, **common)
    from_smiles = data.train_dataset(shards["train"], tokenizer, **common)
    for epoch in range(2):
        masking = data.Masking.of(tokenizer, 0.15)
        assert same_batches(data.worker_batches(from_ids, epoch, masking), data.worker_batches(from_smiles, epoch, masking))


def test_ids_from_another_vocabulary_are_refused(id_shards):
    small = build_tokenizer(["CC"])  # 9 ids: MOSES shards hold larger ones
    with pytest.raises(ValueError, match=r"train-00000.parquet: token id \d+ is not in the tokenizer"):
        list(data.local_batches(id_shards["train"], small, "mlm", 16, MAX_SEQ_LEN, seed=0, epoch=0))
