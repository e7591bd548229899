"""The grid's new axes: model.family (llama, modernbert besides mlm and clm) and train.mlm_probability.

Grids expand with the axis values in the trial ids (and keep the old ids with one value); a two-family grid
trains on CPU, each checkpoint reloads with from_pretrained and fine-tunes; pretrain rows record the axes; and
the fits are split by family, never pooled."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures.make_run import make_run
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from clmscale.engine.config import SweepFileError, expand_grid, load_sweep
from clmscale.engine.finetune import FinetuneData, finetune
from clmscale.engine.ladder import objective
from clmscale.engine.models import build_config, model_inputs
from clmscale.engine.rundir import RunDir, TrialDir
from clmscale.engine.tokenizer import build_tokenizer
from clmscale.engine.train import synthetic_batches, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = Path(__file__).resolve().parents[1] / "data"
MINIMAL = """\
name: t
data:
  corpus: [x.csv]
model:
  family: FAMILY
  sizes: [xxs, xs]
budget:
  tokens: [1e5]
seeds: [0]
train:
  mlm_probability: RATIO
"""


def grid(tmp_path: Path, family: str = "mlm", ratio: str = "0.15"):
    path = tmp_path / "s.yaml"
    path.write_text(MINIMAL.replace("FAMILY", family).replace("RATIO", ratio))
    return load_sweep(path)


# ---------------------------------------------------------------------------------------------
# the grid


def test_one_value_keeps_the_trial_ids(tmp_path):
    for family, ratio in [("mlm", "0.15"), ("llama", "0.15"), ("[modernbert]", "[0.3]")]:
        trials = expand_grid(grid(tmp_path, family, ratio))
        assert [t.trial_id for t in trials] == ["xxs_100ktok_s0", "xs_100ktok_s0"]


def test_family_list_is_an_axis(tmp_path):
    trials = expand_grid(grid(tmp_path, "[mlm, llama, modernbert]"))
    assert [t.trial_id for t in trials] == [
        "xxs_100ktok_s0_mlm", "xs_100ktok_s0_mlm",
        "xxs_100ktok_s0_llama", "xs_100ktok_s0_llama",
        "xxs_100ktok_s0_modernbert", "xs_100ktok_s0_modernbert",
    ]  # fmt: skip
    assert [t.family for t in trials[::2]] == ["mlm", "llama", "modernbert"]
    assert [t.mlm_probability for t in trials[::2]] == [0.15, None, 0.15]  # clm families mask nothing


def test_masking_ratio_list_is_an_axis_of_the_mlm_families_only(tmp_path):
    trials = expand_grid(grid(tmp_path, "[modernbert, llama]", "[0.15, 0.3, 0.5]"))
    ids = [t.trial_id for t in trials]
    assert ids[:3] == ["xxs_100ktok_s0_modernbert_m0.15", "xxs_100ktok_s0_modernbert_m0.3",
                       "xxs_100ktok_s0_modernbert_m0.5"]  # fmt: skip
    assert [t.train.mlm_probability for t in trials[:3]] == [0.15, 0.3, 0.5]
    assert [i for i in ids if "llama" in i] == ["xxs_100ktok_s0_llama", "xs_100ktok_s0_llama"]  # one run each
    assert len(ids) == len(set(ids)) == 2 * 3 + 2
    alone = expand_grid(grid(tmp_path, "mlm", "[0.2, 0.4]"))
    assert [t.trial_id for t in alone] == ["xxs_100ktok_s0_m0.2", "xxs_100ktok_s0_m0.4", "xs_100ktok_s0_m0.2",
                                           "xs_100ktok_s0_m0.4"]  # fmt: skip


@pytest.mark.parametrize("family", ["clm", "llama", "[clm, llama]"])
def test_masking_ratio_list_without_an_mlm_family_is_refused(tmp_path, family):
    with pytest.raises(SweepFileError) as err:
        grid(tmp_path, family, "[0.15, 0.3]")
    assert "s.yaml:11: train.mlm_probability" in str(err.value) and "mlm families only" in str(err.value)
    # the same grid built in code is refused by expand_grid, naming the field
    cfg = grid(tmp_path, family, "0.15")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"mlm_probability": [0.15, 0.3]})})
    with pytest.raises(ValueError, match="train.mlm_probability"):
        expand_grid(cfg)


@pytest.mark.parametrize(
    "family, ratio, expected",
    [
        ("gpt3", "0.15", "s.yaml:5: model.family"),
        ("[mlm, mlm]", "0.15", "values repeat"),
        ("mlm", "[0.15, 1.5]", "s.yaml:11: train.mlm_probability"),
        ("mlm", "[0.3, 0.3]", "values repeat"),
        ("[]", "0.15", "at least one value"),
    ],
)
def test_bad_axis_values_name_the_field(tmp_path, family, ratio, expected):
    with pytest.raises(SweepFileError, match=expected.replace(".", r"\.")):
        grid(tmp_path, family, ratio)


# ---------------------------------------------------------------------------------------------
# a two-family grid trains on CPU; its checkpoints reload, fine-tune, and are rows of pretrain.parquet

SEQ, MICRO = 32, 4
AUTO = {"mlm": AutoModelForMaskedLM, "clm": AutoModelForCausalLM}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(pd.read_csv(DATA / "solubility.csv")["smiles"].tolist(), out)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
    """[modernbert, llama] x xxs: two optimizer steps each, one checkpoint at the end."""
    tmp = tmp_path_factory.mktemp("axes")
    sweep = tmp / "s.yaml"
    sweep.write_text(
        MINIMAL.replace("FAMILY", "[modernbert, llama]").replace("RATIO", "[0.15, 0.4]").replace("[xxs, xs]", "[xxs]")
        + "  batch_size: 8\n  micro_batch_size: 4\n  zero_stage: 0\n  precision: fp32\n  checkpoints: 1\n"
        "  warmup_fraction: 0.0\n"
    )
    cfg = load_sweep(sweep)
    trials = expand_grid(cfg)
    assert [t.trial_id for t in trials] == ["xxs_100ktok_s0_modernbert_m0.15", "xxs_100ktok_s0_modernbert_m0.4",
                                            "xxs_100ktok_s0_llama"]  # fmt: skip
    trials = trials[1:]  # the 0.4 modernbert and the llama run
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    rd = RunDir(tmp / "run")
    results = {}
    for trial in trials:
        trial = trial.model_copy(update={"budget_tokens": 2 * 8 * (SEQ - 2)})  # two steps of 8 full-ish rows
        config = build_config(trial.family, trial.size, vocab, SEQ)
        data = dict(micro_batch_size=MICRO, seq_len=SEQ, vocab_size=vocab,
                    mlm_probability=trial.mlm_probability or 0.15)  # fmt: skip
        val = synthetic_batches(trial.family, -1, n_batches=2, **data)
        folder = rd.trial(trial.trial_id).path
        result = train(trial, folder, lambda epoch, t=trial, d=data: synthetic_batches(t.family, epoch, n_batches=4, **d),
                       val, config, tokenizer_dir=tokenizer_dir, report=lambda r: None, device="cpu")  # fmt: skip
        results[trial.trial_id] = (trial, result, val)
    return rd, results


def test_two_families_train_and_their_checkpoints_load(trained):
    rd, results = trained
    assert len(results) == 2
    for trial, result, val in results.values():
        assert result.status == "finished" and result.n_steps >= 2, trial.trial_id
        [path] = TrialDir(rd.trial(trial.trial_id).path).checkpoints()
        model = AUTO[objective(trial.family)].from_pretrained(path)
        assert type(model).__name__ == {"llama": "LlamaForCausalLM", "modernbert": "ModernBertForMaskedLM"}[trial.family]
        assert model.num_parameters() == result.n_params
        assert model.num_parameters(exclude_embeddings=True) == result.n_params_non_embedding
        total, n = 0.0, 0  # the validation loss the trainer recorded, recomputed from the reloaded weights
        with torch.no_grad():
            for batch in val:
                labels = batch["labels"][:, 1:] if objective(trial.family) == "clm" else batch["labels"]
                k = int((labels != -100).sum())
                total += float(model(**model_inputs(batch, model.config)).loss) * k
                n += k
        assert total / n == pytest.approx(result.val_loss, rel=1e-4)


def test_pretrain_rows_record_family_and_masking_ratio(trained):
    from clmscale.engine.sweep import pretrain_rows

    rd, results = trained
    # unique_molecules given, as budget.unique_molecules would: otherwise the row reads prepare's manifest
    rows = pd.DataFrame([row for trial, result, _ in results.values()
                         for row in pretrain_rows(rd, trial.model_copy(update={"unique_molecules": 1000}), result)])
    rd.write_table("pretrain", rows)  # the schema accepts the columns
    table = rd.read_table("pretrain").set_index("trial_id")
    assert table.loc["xxs_100ktok_s0_modernbert_m0.4", "family"] == "modernbert"
    assert table.loc["xxs_100ktok_s0_modernbert_m0.4", "mlm_probability"] == 0.4
    assert table.loc["xxs_100ktok_s0_llama", "family"] == "llama"
    assert math.isnan(table.loc["xxs_100ktok_s0_llama", "mlm_probability"])


def test_new_families_have_a_hessian_spectrum(trained):
    """What analyze's pretrain-loss Hessian job does: the checkpoint (sdpa, as saved), eager attention for
    double backward, top eigenvalues by Lanczos on its validation batches, weighted by labelled tokens."""
    from clmscale.engine.analyze import pretraining_loss
    from clmscale.engine.hessian import spectrum
    from clmscale.engine.models import family_of, load_pretrained, n_loss_tokens, use_eager_attention

    rd, results = trained
    for trial, _, val in results.values():
        [path] = TrialDir(rd.trial(trial.trial_id).path).checkpoints()
        model = use_eager_attention(load_pretrained(path)).eval()
        family = family_of(model.config)
        result = spectrum(model, pretraining_loss, val, top_k=2, count_fn=lambda b: float(n_loss_tokens(b["labels"], family)),
                          max_iter=20, trace_matvecs=3, density_runs=0)  # fmt: skip
        assert np.isfinite(result.eigenvalues).all() and result.eigenvalues[0] > 0, trial.family
        assert result.eigenvalues[0] >= result.eigenvalues[1]


@pytest.mark.parametrize("task_type", ["regression", "classification"])
def test_new_families_fine_tune_and_probe(trained, task_type):
    rd, results = trained
    smiles = pd.read_csv(DATA / "solubility.csv")["smiles"].tolist()[:60]
    labels = (
        np.arange(60, dtype=np.float32)[:, None] / 10 if task_type == "regression" else (np.arange(60) % 2).astype(np.float32)[:, None]
    )
    split = (np.arange(0, 40), np.arange(40, 50), np.arange(50, 60))
    data = FinetuneData(smiles, labels, task_type, split, name="t")
    for trial, _, _ in results.values():
        [path] = TrialDir(rd.trial(trial.trial_id).path).checkpoints()
        for mode in ("finetune", "probe"):
            row = finetune(path, data, mode=mode, epochs=2, patience=2, lr=1e-3, batch_size=16, seed=0, device="cpu")
            assert row["mode"] == mode and math.isfinite(row["test"]), (trial.family, mode)
            assert all(math.isfinite(m["test"]) for m in row["metrics"].values()), (trial.family, mode, row)


# ---------------------------------------------------------------------------------------------
# the fits: one law per family, never pooled


def test_fit_with_two_families_gives_two_laws(tmp_path):
    from clmscale.fits.fit import _excluded_findings, fit_run

    llama_truth = {"A": 30.0, "alpha": 0.25}
    root = make_run(tmp_path / "run", families={"mlm": {}, "llama": llama_truth})
    fits = fit_run(root, n_bootstrap=0, n_jobs=1, n_starts=20)
    assert "loss_law" not in fits  # nothing pooled across families
    assert fits["axes"] == {"family": ["llama", "mlm"], "mlm_probability": [0.15, None]}
    assert [arm["arm"] for arm in fits["arms"]] == ["family=llama", "family=mlm, mlm_probability=0.15"]
    laws = {arm["axes"]["family"]: arm["loss_law"] for arm in fits["arms"]}
    assert all(law["status"] == "ok" for law in laws.values())
    assert laws["llama"]["params"]["alpha"] < laws["mlm"]["params"]["alpha"]  # 0.25 against 0.34
    # every downstream trend belongs to one arm, all corrected together
    trends = [entry for arm in fits["arms"] for entry in arm["downstream"]]
    assert {entry["arm"] for entry in trends} == {arm["arm"] for arm in fits["arms"]}
    assert {e["n_runs"] for e in trends} == {5}  # 6 trials per family, one diverged: never the other family's
    assert fits["trend_tests"]["n_tests"] == sum(
        v.get("status", "ok") == "ok" and v["p_verdict"] is not None for e in trends for v in e["verdicts"].values()
    )
    unlabelled = [text for text in fits["findings"] if not text.startswith("[family=")]
    assert unlabelled == [text for text, _ in _excluded_findings(fits["excluded"])]  # the run's, not an arm's
    table = RunDir(root).read_table("fits")
    assert set(table.loc[table["what"] == "loss_law", "arm"]) == {"family=llama", "family=mlm, mlm_probability=0.15"}


def test_one_family_fits_as_before(tmp_path):
    from clmscale.fits.fit import fit_run

    fits = fit_run(make_run(tmp_path / "run", only_pretrain=True), n_bootstrap=0, n_jobs=1, n_starts=20)
    assert "arms" not in fits and fits["loss_law"]["status"] == "ok"
    assert set(RunDir(tmp_path / "run").read_table("fits")["arm"]) == {""}


def test_report_shows_a_facet_per_family(tmp_path):
    from clmscale.fits.report import build_report

    root = make_run(tmp_path / "run", families={"mlm": {}, "llama": {"A": 30.0, "alpha": 0.25}})
    page = build_report(root, n_bootstrap=0, n_jobs=1, n_starts=20).read_text()
    assert '<section id="axes">' in page
    for slug in ("family-llama", "family-mlm-mlm_probability-0.15"):
        assert f'id="pretraining--{slug}"' in page and f'id="loss_vs_compute--{slug}"' in page
        assert (root / "report" / f"loss_vs_compute--{slug}.png").is_file()
    links = set(__import__("re").findall(r'href="#([^"]+)"', page))
    ids = set(__import__("re").findall(r'id="([^"]+)"', page))
    assert links <= ids, links - ids  # every finding's link lands on its arm's figure or table
