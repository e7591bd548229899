"""data.representation: SMILES, SELFIES, DeepSMILES and SAFE as an axis of the grid.

Round trips on the shipped MOSES molecules (each accepted text decodes, with its own package, to the canonical SMILES;
a rejected molecule is counted with its reason); prepare writes each representation's shards and tokenizer from
the same molecules, split and order, rejecting what a representation cannot write; a grid of two representations
and two families prepares, trains two steps per trial on CPU, reloads with from_pretrained and decodes its own
shards; the analysis writes task molecules in the checkpoint's representation; the fits split by representation."""

from __future__ import annotations

import csv
import gzip
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fixtures.make_run import make_run
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from clmscale.engine.config import DataConfig, SweepFileError, expand_grid, load_sweep
from clmscale.engine.ladder import objective
from clmscale.engine.models import build_config
from clmscale.engine.prepare import canonical_smiles, prepare
from clmscale.engine.representations import REPRESENTATIONS, codec, convert_with_reasons
from clmscale.engine.rundir import DataDir, RunDir, TrialDir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = Path(__file__).resolve().parents[1] / "data"
MOSES = DATA / "moses_100k.csv.gz"
# SELFIES refuses a hypervalent iodine under its default constraints; '*' (a dummy atom) it cannot parse at all
REFUSED = {"FI(F)(F)(F)F": "selfies: EncoderError", "*C": "selfies: EncoderError"}
OTHERS = [r for r in REPRESENTATIONS if r != "smiles"]


def moses(n: int | None) -> list[str]:
    with gzip.open(MOSES, "rt") as f:
        rows = itertools.islice(csv.reader(f), 1, None if n is None else n + 1)
        return canonical_smiles([row[0] for row in rows])


def round_trip(smiles: list[str]) -> dict[str, int]:
    """Per representation: how many it refused; every text it accepted decodes (with its package) to the SMILES."""
    refused = {}
    for r in OTHERS:
        _, decode = codec(r)
        out = convert_with_reasons(smiles, r)
        for s, (text, why) in zip(smiles, out, strict=True):
            if text is not None:
                assert canonical_smiles([decode(text)]) == [s], (r, s, text)
            else:
                assert why.startswith(f"{r}: "), why
        refused[r] = sum(text is None for text, _ in out)
    return refused


def test_accepted_molecules_round_trip_and_refusals_are_counted():
    smiles = moses(300) + canonical_smiles(list(REFUSED))
    refused = round_trip(smiles)
    assert refused["selfies"] == 2 and refused["deepsmiles"] == 0
    reasons = dict(zip(smiles[-2:], [w for _, w in convert_with_reasons(smiles[-2:], "selfies")], strict=True))
    assert all(reasons[s].startswith(REFUSED[s]) for s in canonical_smiles(list(REFUSED)))
    # SAFE: a molecule without a BRICS bond is one fragment, not a refusal; '*' decodes to another molecule
    assert convert_with_reasons(["c1ccccc1", "*C"], "safe")[0] == ("c1ccccc1", None)
    assert "decodes to" in convert_with_reasons(["*C"], "safe")[0][1]



# ---------------------------------------------------------------------------------------------
# prepare


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "c.csv"
    path.write_text("smiles\n" + "\n".join(moses(600) + list(REFUSED) + ["CCO", "CCO", "not_a_smiles"]) + "\n")
    return path


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> DataDir:
    data = DataDir(tmp_path_factory.mktemp("data"))
    cfg = DataConfig(corpus=[corpus], representation=["smiles", "selfies", "deepsmiles", "safe"], decontaminate=False,
                     shard_rows=200)  # fmt: skip
    prepare(cfg, data, parallel=False)
    return data


def test_prepare_writes_each_representation_of_the_same_molecules(prepared):
    m = prepared.manifest()
    c = m.counts
    assert m.representations == OTHERS and m.options["representations"] == OTHERS
    assert (c.n_in, c.n_invalid, c.n_duplicate, c.n_unconverted, c.unconverted) == (605, 1, 1, 2, {"selfies": 2})
    assert c.n_in == c.n_invalid + c.n_duplicate + c.n_decontaminated + c.n_filtered + c.n_unconverted + c.n_kept
    rejects = pd.read_csv(prepared.rejects_path)
    assert sorted(rejects.loc[rejects["reason"].str.startswith("selfies:"), "smiles"]) == sorted(REFUSED)
    smiles_train = pd.concat(pq.read_table(p).to_pandas() for p in prepared.shard_paths("train"))
    for r in OTHERS:
        other = prepared.representation(r)
        assert other.path == prepared.path / r
        om = other.manifest()
        assert om.representation == r and om.counts.n_kept == c.n_kept
        assert om.tokenizer.vocab_size == len(AutoTokenizer.from_pretrained(other.tokenizer))
        for split in ("train", "val"):
            rows = pd.concat(pq.read_table(p).to_pandas() for p in other.shard_paths(split))
            assert len(rows) == getattr(om.counts, split).n_molecules
            assert rows["n_tokens"].sum() == getattr(om.counts, split).n_tokens
            if split == "train":  # the same molecules in the same order as data/'s SMILES shards
                assert rows["smiles"].tolist() == smiles_train["smiles"].tolist()
        texts = rows["text"].tolist()
        assert convert_with_reasons(rows["smiles"].tolist(), r) == [(t, None) for t in texts]
        assert om.tokenizer.n_unk == 0
    # SELFIES tokens are its symbols; a SELFIES vocabulary holds no bare atom letters
    vocab = AutoTokenizer.from_pretrained(prepared.representation("selfies").tokenizer).get_vocab()
    assert "[C]" in vocab and "C" not in vocab


def test_a_rerun_is_a_no_op_and_a_missing_representation_is_noticed(prepared, corpus):
    cfg = DataConfig(corpus=[corpus], representation=["smiles", "selfies", "deepsmiles", "safe"], decontaminate=False,
                     shard_rows=200)  # fmt: skip
    before = prepared.manifest_path.stat().st_mtime_ns
    prepare(cfg, prepared, parallel=False)
    assert prepared.manifest_path.stat().st_mtime_ns == before
    from clmscale.engine.prepare import _damage

    safe_dir = prepared.representation("safe")
    shard = safe_dir.shard_paths("val")[0]
    kept = shard.read_bytes()
    shard.write_bytes(b"x")
    try:
        assert _damage(prepared.manifest(), prepared).startswith("safe/: val-00000.parquet has sha256")
    finally:
        shard.write_bytes(kept)


def test_smiles_only_options_are_unchanged(corpus, tmp_path):
    """A grid without the axis records no `representations` option: data prepared before it still matches."""
    m = prepare(DataConfig(corpus=[corpus], decontaminate=False), DataDir(tmp_path / "d"), parallel=False)
    assert "representations" not in m.options and "representation" not in m.options and m.representations == []
    assert m.counts.n_unconverted == 0 and m.counts.n_kept == 603


# ---------------------------------------------------------------------------------------------
# the grid: two representations x two families, prepared, trained, reloaded

SWEEP = """\
name: reps
data:
  corpus: [CORPUS]
  representation: [selfies, safe]
  decontaminate: false
  shard_rows: 200
model:
  family: [mlm, llama]
  sizes: [xxs]
  max_seq_len: 64
budget:
  tokens: [2000]
seeds: [0]
train:
  batch_size: 8
  micro_batch_size: 8
  zero_stage: 0
  precision: fp32
  checkpoints: 1
  warmup_fraction: 0.0
  val_batches: 1
"""


def test_representation_list_is_an_axis(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP.replace("CORPUS", "x.csv"))
    trials = expand_grid(load_sweep(path))
    assert [(t.trial_id, t.representation, t.family) for t in trials] == [
        ("xxs_2ktok_s0_selfies_mlm", "selfies", "mlm"), ("xxs_2ktok_s0_selfies_llama", "selfies", "llama"),
        ("xxs_2ktok_s0_safe_mlm", "safe", "mlm"), ("xxs_2ktok_s0_safe_llama", "safe", "llama"),
    ]  # fmt: skip
    path.write_text(SWEEP.replace("CORPUS", "x.csv").replace("[selfies, safe]", "selfies"))
    assert [t.trial_id for t in expand_grid(load_sweep(path))] == ["xxs_2ktok_s0_mlm", "xxs_2ktok_s0_llama"]
    for bad, expected in [("[selfies, selfies]", "values repeat"), ("[smiles, inchi]", "inchi")]:
        path.write_text(SWEEP.replace("CORPUS", "x.csv").replace("[selfies, safe]", bad))
        with pytest.raises(SweepFileError, match=expected) as err:
            load_sweep(path)
        assert "data.representation" in str(err.value)


def test_two_representations_two_families_prepare_train_and_reload(tmp_path, corpus):
    from clmscale.engine.data import local_batches, trial_validation_batches
    from clmscale.engine.sweep import pretrain_rows
    from clmscale.engine.train import train

    path = tmp_path / "s.yaml"
    path.write_text(SWEEP.replace("CORPUS", str(corpus)).replace("name: reps", f"name: reps\nstorage:\n  root: {tmp_path}"))
    cfg = load_sweep(path)
    rd = RunDir(cfg.run_dir)
    rd.write_config(cfg)
    prepare(cfg.data, rd.data, parallel=False)
    rows = []
    for trial in expand_grid(cfg):
        data = rd.data_of(trial)
        assert data.path == rd.data.path / trial.representation
        tokenizer = AutoTokenizer.from_pretrained(data.tokenizer)
        config = build_config(trial.family, trial.size, len(tokenizer), 64)
        val = trial_validation_batches(rd, trial, 64)

        def batches(epoch, t=trial, d=data, tok=tokenizer):
            return local_batches(d.shard_paths("train"), tok, t.family, 8, 64, seed=0, epoch=epoch)

        result = train(trial, rd.trial(trial.trial_id).path, batches, val, config, budget_tokens=2000,
                       tokenizer_dir=data.tokenizer, report=lambda r: None, device="cpu")  # fmt: skip
        assert result.status == "finished" and result.n_steps >= 2, trial.trial_id
        [checkpoint] = TrialDir(rd.trial(trial.trial_id).path).checkpoints()
        auto = AutoModelForMaskedLM if objective(trial.family) == "mlm" else AutoModelForCausalLM
        assert auto.from_pretrained(checkpoint).num_parameters() == result.n_params
        saved = AutoTokenizer.from_pretrained(checkpoint)  # the checkpoint's own tokenizer reads its own shards
        shard = pq.read_table(data.shard_paths("val")[0]).to_pandas()
        decoded = [saved.decode(ids.tolist()) for ids in shard["ids"]]
        assert decoded == shard["text"].tolist()
        rows += pretrain_rows(rd, trial, result)
    table = pd.DataFrame(rows)
    rd.write_table("pretrain", table)
    table = rd.read_table("pretrain")
    assert set(table["representation"]) == {"selfies", "safe"}
    for r, rows in table.groupby("representation"):  # D in units no tokenizer changes: molecules, characters
        data = rd.data.representation(r)
        n, tokens = data.manifest().counts.train.n_molecules, data.pass_tokens()
        np.testing.assert_allclose(rows["molecules_seen"], rows["tokens"] * n / tokens)
        np.testing.assert_allclose(rows["characters_seen"], rows["tokens"] * data.pass_characters() / tokens)
    safe_chars = data.pass_characters()  # SAFE texts are longer than the SMILES
    assert safe_chars > sum(len(s) for p in rd.data.shard_paths("train") for s in pq.read_table(p)["smiles"].to_pylist())


def test_the_analysis_writes_task_molecules_in_the_checkpoints_representation(tmp_path):
    """`_task_split` as each checkpoint sees a task; a task molecule one representation of the grid cannot write
    is left out for every arm (same molecules, same splits), and recorded."""
    from clmscale.engine.analyze import CheckpointRef, Context, _loaded_split, _task_split

    task = tmp_path / "t.csv"
    task.write_text("smiles,y\n" + "\n".join(f"{s},{i % 3}" for i, s in enumerate(moses(40) + ["FI(F)(F)(F)F"])))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(SWEEP.replace("CORPUS", "x.csv") + f"downstream:\n  tasks: []\n  custom:\n    - name: t\n"
                     f"      path: {task}\n      task_type: regression\n      label_columns: [y]\n  seeds: [0]\n"
                     f"storage:\n  root: {tmp_path}\n")  # fmt: skip
    cfg = load_sweep(sweep)
    rd = RunDir(cfg.run_dir)
    rd.write_config(cfg)
    ctx = Context.of(rd)
    loaded, _ = _loaded_split(ctx, "t", 0)
    assert len(loaded) == 40 and [(row, s) for row, s, _ in loaded.unconverted] == [(40, "FI(F)(F)(F)F")]
    ck = {t.representation: CheckpointRef(path="x", trial_id=t.trial_id, tokens=1, rung="xxs") for t in expand_grid(cfg)}
    selfies, safe, plain = (_task_split(ctx, "t", 0, ck["selfies"]), _task_split(ctx, "t", 0, ck["safe"]),
                            _task_split(ctx, "t", 0))  # fmt: skip
    assert all(s.startswith("[") for s in selfies.smiles) and plain.smiles == canonical_smiles(loaded.smiles)
    assert [codec("safe")[1](t) for t in safe.smiles[:5]] == plain.smiles[:5]
    for a, b in zip(selfies.split, plain.split, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fits_give_one_law_per_representation(tmp_path):
    from clmscale.fits.fit import fit_run

    root = make_run(tmp_path / "run", only_pretrain=True,
                    representations={"smiles": {}, "selfies": {"B": 80.0, "beta": 0.25}})  # fmt: skip
    fits = fit_run(root, n_bootstrap=0, n_jobs=1, n_starts=20)
    assert "loss_law" not in fits and fits["axes"]["representation"] == ["selfies", "smiles"]
    laws = {arm["axes"]["representation"]: arm["loss_law"] for arm in fits["arms"]}
    assert laws["selfies"]["params"]["beta"] < laws["smiles"]["params"]["beta"]  # 0.25 against 0.3


def test_the_loss_law_can_count_d_in_molecules(tmp_path):
    """fits.data_measure: molecules. D = tokens / 35 rescales B by 35^-β and changes nothing else; a run without
    molecules_seen is skipped with the reason."""
    from clmscale.fits.fit import fit_run

    reps = {"smiles": {}, "selfies": {"B": 80.0, "beta": 0.25}}
    by = {}
    for measure in ("tokens", "molecules"):
        root = make_run(tmp_path / measure, only_pretrain=True, representations=reps, fits={"data_measure": measure})
        fits = fit_run(root, n_bootstrap=0, n_jobs=1, n_starts=20)
        by[measure] = {arm["axes"]["representation"]: arm["loss_law"] for arm in fits["arms"]}
    for r in reps:
        tok, mol = by["tokens"][r], by["molecules"][r]
        assert mol["data_measure"] == "molecules" and tok["data_measure"] == "tokens"
        beta = tok["params"]["beta"]
        assert mol["params"]["beta"] == pytest.approx(beta, rel=1e-3)
        assert mol["params"]["B"] == pytest.approx(tok["params"]["B"] * 35**-beta, rel=1e-2)
    plain = make_run(tmp_path / "plain", only_pretrain=True, fits={"data_measure": "characters"})
    law = fit_run(plain, n_bootstrap=0, n_jobs=1, n_starts=20)["loss_law"]
    assert law["status"] == "skipped" and "characters_seen" in law["reason"]


# ---------------------------------------------------------------------------------------------
# data.randomized_smiles: k random atom orders per molecule per pass


def _decoded_molecules(batches, tokenizer) -> list[str]:
    """The canonical SMILES of every sequence of clm batches (the labels hold the whole text)."""
    texts = []
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            texts.append(tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True))
    return canonical_smiles(texts)


def test_randomized_smiles_are_k_new_spellings_per_molecule_per_pass(tmp_path, corpus):
    from clmscale.engine.data import local_batches
    from clmscale.engine.train import data_use

    data = DataDir(tmp_path / "d")
    m = prepare(DataConfig(corpus=[corpus], decontaminate=False, randomized_smiles=2), data, parallel=False)
    assert m.options["randomized_smiles"] == 2
    plain = prepare(DataConfig(corpus=[corpus], decontaminate=False), DataDir(tmp_path / "plain"), parallel=False)
    vocab, plain_vocab = (AutoTokenizer.from_pretrained(d).get_vocab() for d in (data.tokenizer, tmp_path / "plain" /
                                                                                 "tokenizer"))  # fmt: skip
    assert plain_vocab.items() <= vocab.items()  # the canonical ids unchanged; a random order's tokens added after
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer)
    molecules = pd.concat(pq.read_table(p).to_pandas() for p in data.shard_paths("train"))["smiles"].tolist()

    def one_pass(epoch):
        return list(local_batches(data.shard_paths("train"), tokenizer, "clm", 16, 128, seed=3, epoch=epoch,
                                  randomized=2))  # fmt: skip

    first, again, second = one_pass(0), one_pass(0), one_pass(1)
    assert sorted(_decoded_molecules(first, tokenizer)) == sorted(molecules * 2)  # each molecule twice
    texts = [tokenizer.decode(ids) for b in first for ids in b["input_ids"]]
    assert texts == [tokenizer.decode(ids) for b in again for ids in b["input_ids"]]  # a pass repeats exactly
    assert texts != [tokenizer.decode(ids) for b in second for ids in b["input_ids"]]  # the next is new
    canonical = set(molecules)
    spelled = {t.replace("[BOS]", "").replace("[EOS]", "").replace("[PAD]", "") for t in texts}
    assert len(spelled - canonical) > len(spelled) / 2  # mostly not the canonical spelling
    unk = sum(int((b["input_ids"] == tokenizer.unk_token_id).sum()) for b in first)
    assert unk == 0
    # epochs count passes; a molecule's tokens count once in the unique tokens, however spelled
    assert data_use(3000, 2000, views=2) == (1.5, 1000.0, "")


def test_randomized_smiles_only_with_smiles(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP.replace("CORPUS", "x.csv").replace("  decontaminate: false\n",
                                                             "  decontaminate: false\n  randomized_smiles: 2\n"))  # fmt: skip
    with pytest.raises(SweepFileError, match="random atom orderings are written as SMILES"):
        load_sweep(path)


@pytest.mark.timeout(180)
def test_randomized_smiles_on_the_ray_stream(ray_cluster, prepared):
    from clmscale.engine.data import train_dataset, worker_batches

    tokenizer = AutoTokenizer.from_pretrained(prepared.tokenizer)
    molecules = pd.concat(pq.read_table(p).to_pandas() for p in prepared.shard_paths("train"))["smiles"].tolist()
    ds = train_dataset(prepared.shard_paths("train"), tokenizer, "clm", 16, 128, seed=3, randomized_smiles=3)
    batches = list(worker_batches(ds, 0))
    assert sorted(_decoded_molecules(batches, tokenizer)) == sorted(molecules * 3)
