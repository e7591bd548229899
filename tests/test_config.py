"""The sweep file: shipped sweeps validate, the grid expands, and bad files name line and field."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from clmscale.engine.cli import app
from clmscale.engine.config import LADDER, SweepFileError, expand_grid, load_sweep

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


MINIMAL = """\
name: t
data:
  corpus: [x.csv]
model:
  sizes: [xxs, xs]
budget:
  tokens: [1e5, 2e5]
seeds: [0, 1]
"""


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml", "small.yaml"])
def test_shipped_sweeps_validate(name):
    cfg = load_sweep(SWEEPS / name)
    trials = expand_grid(cfg)
    assert len(trials) == len(cfg.model.sizes) * len(cfg.budget.tokens) * len(cfg.seeds)
    assert len({t.trial_id for t in trials}) == len(trials)


def test_axes_demo_makes_the_representation_an_axis():
    """sweeps/axes-demo.yaml (issue 20): every rung once per representation, D of the laws in molecules."""
    cfg = load_sweep(SWEEPS / "axes-demo.yaml")
    trials = expand_grid(cfg)
    assert cfg.data.representations() == ["smiles", "selfies", "safe"] and cfg.fits.data_measure == "molecules"
    assert len(trials) == 3 * len(cfg.model.sizes) * len(cfg.budget.tokens) * len(cfg.seeds)
    assert {(t.size.name, t.representation) for t in trials} == {
        (size, r) for size in ("xxs", "xs", "s") for r in ("smiles", "selfies", "safe")
    }
    assert all(t.trial_id.endswith(f"_{t.representation}") for t in trials)


def test_small_study_is_laid_out_to_identify_its_law():
    """sweeps/small.yaml (issue 14): >= 5 rungs from ~1e4 to a few 1e6 non-embedding parameters, wsd with >= 4
    milestones, the 100k shipped MOSES molecules, two downstream tasks."""
    from clmscale.engine.models import build_config, count_params

    cfg = load_sweep(SWEEPS / "small.yaml")
    sizes = [count_params(build_config("mlm", s, 64, cfg.model.max_seq_len)).non_embedding for s in cfg.model.rungs()]
    assert len(sizes) >= 5 and 5e3 <= min(sizes) <= 2e4 and 1e6 <= max(sizes) <= 1e7
    assert cfg.train.schedule == "wsd" and cfg.train.checkpoints >= 4
    assert cfg.data.max_molecules is None and [p.name for p in cfg.data.corpus] == ["moses_100k.csv.gz"]
    assert len(cfg.downstream.tasks) == 2


def test_unique_data_is_a_grid_axis_with_tagged_ids(tmp_path):
    text = MINIMAL.replace("tokens: [1e5, 2e5]", "epochs: [1, 4]\n  unique_molecules: [3e4, 1e4]").replace(
        "seeds: [0, 1]", "seeds: [0]"
    )
    trials = expand_grid(load_sweep(write(tmp_path, text)))
    assert [t.trial_id for t in trials[:4]] == ["xxs_u10k_1ep_s0", "xxs_u10k_4ep_s0", "xxs_u30k_1ep_s0", "xxs_u30k_4ep_s0"]
    assert [t.unique_molecules for t in trials[:4]] == [10_000, 10_000, 30_000, 30_000]
    assert all(t.unique_molecules is None for t in expand_grid(load_sweep(write(tmp_path, MINIMAL))))
    for bad in ("[1e4, 1e4]", "[0]", "[]"):
        with pytest.raises(SweepFileError, match="unique_molecules"):
            load_sweep(write(tmp_path, MINIMAL.replace("tokens: [1e5, 2e5]", f"tokens: [1e5]\n  unique_molecules: {bad}")))


def test_demo_corpus_path_is_relative_to_the_sweep_file():
    cfg = load_sweep(SWEEPS / "demo.yaml")
    assert all(p.exists() for p in cfg.data.corpus)


def test_paper_grid_spans_the_scales_of_the_study():
    cfg = load_sweep(SWEEPS / "paper.yaml")
    budgets = cfg.budget.tokens
    assert max(budgets) / min(budgets) >= 1e3
    assert len(cfg.downstream.seeds) == 3
    trials = {t.size.name: t for t in expand_grid(cfg)}
    assert trials["m"].resources.gpus_per_worker == 0.25  # tiny rungs share a GPU
    assert trials["6xl"].resources.workers == 8 and trials["6xl"].train.zero_stage == "auto"  # engine.plan chooses


def test_grid_order_and_overrides(tmp_path):
    text = MINIMAL.replace("sizes: [xxs, xs]", "sizes: [xxs, xs]\n  overrides: {xs: {lr: 0.5}}")
    cfg = load_sweep(write(tmp_path, text))
    trials = expand_grid(cfg)
    assert [t.trial_id for t in trials][:2] == ["xxs_100ktok_s0", "xxs_100ktok_s1"]
    assert {t.train.lr for t in trials if t.size.name == "xs"} == {0.5}
    assert {t.train.lr for t in trials if t.size.name == "xxs"} == {cfg.train.lr}
    assert trials[0].size == LADDER["xxs"] and trials[0].budget_tokens == 100_000


def test_a_rung_may_have_its_own_token_budgets(tmp_path):
    text = MINIMAL.replace("sizes: [xxs, xs]", "sizes: [xxs, xs]\n  overrides: {xxs: {tokens: [4e5, 8e5, 1.6e6]}}")
    trials = expand_grid(load_sweep(write(tmp_path, text.replace("seeds: [0, 1]", "seeds: [0]"))))
    assert [t.trial_id for t in trials] == ["xxs_400ktok_s0", "xxs_800ktok_s0", "xxs_1.6Mtok_s0", "xs_100ktok_s0",
                                            "xs_200ktok_s0"]  # fmt: skip
    assert [t.budget_tokens for t in trials][:3] == [400_000, 800_000, 1_600_000]
    assert trials[0].train == load_sweep(write(tmp_path, MINIMAL)).train  # tokens is no training setting
    epochs = text.replace("tokens: [1e5, 2e5]", "epochs: [1]")
    with pytest.raises(SweepFileError, match=r"model.overrides.xxs.tokens.*budgets are in epochs"):
        load_sweep(write(tmp_path, epochs))
    with pytest.raises(SweepFileError, match="distinct positive"):
        load_sweep(write(tmp_path, text.replace("[4e5, 8e5, 1.6e6]", "[4e5, 4e5]")))


def test_explicit_dims_and_epoch_budgets(tmp_path):
    text = MINIMAL.replace("[xxs, xs]", "[{name: tiny, n_layer: 1, d_model: 8, n_head: 2}]").replace(
        "tokens: [1e5, 2e5]", "epochs: [0.5, 2]"
    )
    trials = expand_grid(load_sweep(write(tmp_path, text)))
    assert trials[0].size.ffn_dim == 32 and trials[0].budget_epochs == 0.5 and trials[0].budget_tokens is None
    assert trials[-1].trial_id == "tiny_2ep_s1"


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("data:\n", "data:\n  val_fraktion: 0.1\n"), ["s.yaml:3", "data.val_fraktion", "did you mean 'val_fraction'"]),
        (("[xxs, xs]", "[xxs, xsm]"), ["s.yaml:5", "model.sizes", "unknown rung sizes[1] 'xsm'; did you mean 'xs'"]),
        (("seeds: [0, 1]", "seeds: zero"), ["s.yaml:8", "seeds"]),
        (("tokens: [1e5, 2e5]", "tokens: [1e5, -3]"), ["s.yaml:6", "budget", "positive"]),
        (("name: t\n", ""), ["name: required field is missing"]),
        (("budget:\n", "budgets:\n"), ["budgets", "did you mean 'budget'"]),
        (("model:\n", "model:\n  max_seq_len: ten\n"), ["s.yaml:5", "model.max_seq_len"]),
        (("name: t\n", "name: t\nanalysis: {trace_matvecs: 2}\n"), ["analysis.trace_matvecs", "at least 3"]),
        (("name: t\n", "name: t\nanalysis: {hessian_workers: 4, hessian_batches: 2}\n"),
         ["analysis", "hessian_workers (4) must not exceed hessian_batches (2)"]),
        (("data:\n", "data:\n  decontaminate: [bbbp, solubilty]\n"),
         ["s.yaml:3", "data.decontaminate.1", "unknown task 'solubilty'; did you mean 'solubility'"]),
        (("data:\n", "data:\n  decontaminate: [bbbp, bbbp]\n"), ["s.yaml:3", "data.decontaminate", "repeat"]),
        (("data:\n", "data:\n  decontaminate: everything\n"), ["s.yaml:3", "data.decontaminate"]),
        (("data:\n", "data:\n  decontaminate_key: smiles\n"), ["s.yaml:3", "data.decontaminate_key", "'inchikey'"]),
    ],
)
def test_errors_name_line_and_field(tmp_path, edit, expected):
    path = write(tmp_path, MINIMAL.replace(*edit))
    with pytest.raises(SweepFileError) as err:
        load_sweep(path)
    for piece in expected:
        assert piece in str(err.value)


def test_batch_must_split_over_workers(tmp_path):
    text = MINIMAL + "train: {batch_size: 32, micro_batch_size: 16}\nresources: {workers: 4}\n"
    with pytest.raises(ValueError, match="multiple of micro_batch_size x workers"):
        expand_grid(load_sweep(write(tmp_path, text)))


def test_malformed_yaml_names_the_line(tmp_path):
    with pytest.raises(SweepFileError, match=r"s.yaml:3: malformed YAML"):
        load_sweep(write(tmp_path, "name: t\ndata: [\n"))


def test_cli_validate_prints_one_line_per_trial_and_fails_cleanly(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(SWEEPS / "demo.yaml")])
    assert ok.exit_code == 0, ok.output
    assert sum(line.startswith(("xxs_", "xs_", "s_")) for line in ok.output.splitlines()) == 6
    bad = runner.invoke(app, ["validate", str(write(tmp_path, MINIMAL.replace("seeds", "seedz")))])
    assert bad.exit_code == 2
    assert "did you mean 'seeds'" in bad.output
    missing = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "no such sweep file" in missing.output


def test_decontaminate_defaults_and_custom_names(tmp_path):
    cfg = load_sweep(write(tmp_path, MINIMAL))
    assert cfg.data.decontaminate is True and cfg.data.decontaminate_key == "inchikey"
    (tmp_path / "mine.csv").write_text("smiles,y\nCCO,1\n")
    text = MINIMAL.replace("data:\n", "data:\n  decontaminate: [mine, hiv]\n  decontaminate_key: connectivity\n")
    text += "downstream:\n  custom: [{name: mine, path: mine.csv, label_columns: [y], task_type: regression}]\n"
    cfg = load_sweep(write(tmp_path, text))
    assert cfg.data.decontaminate == ["mine", "hiv"] and cfg.data.decontaminate_key == "connectivity"
    off = load_sweep(write(tmp_path, MINIMAL.replace("data:\n", "data:\n  decontaminate: false\n")))
    assert off.data.decontaminate is False
