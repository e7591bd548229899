"""engine.train's wsd schedule, the annealed / epochs / unique_tokens bookkeeping, and losses in fp32.

CPU, one process (gloo), fp32 unless a test says bf16: one wsd run (3 milestones, a cooldown branch
each) is the reference several tests read; a constant-lr run checks that the branches leave the
stable trajectory alone; crashes mid-branch and mid-stable-phase resume to the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_train import BUDGET, MICRO, SEQ, VOCAB, batches, hf_val_loss, records, tokenizer_dir, val_batches  # noqa: F401
from transformers import AutoModelForMaskedLM

from clmscale.engine.config import TrainConfig
from clmscale.engine.models import build_config, build_model, model_inputs
from clmscale.engine.rundir import RunDir, TrialDir, counted_checkpoints
from clmscale.engine.sweep import pretrain_rows
from clmscale.engine.train import (MAX_EPOCHS, anneals, branch_start, cooldown_lr, data_use, lm_loss, lr_at, milestones,
                          smoke_trial, synthetic_batches, train)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# every step logged; cooldown 0.4 so that the first branch (400 tokens) spans more than one step (<= 256 tokens)
WSD = dict(schedule="wsd", checkpoints=3, cooldown_fraction=0.4, warmup_fraction=0.0, log_every_steps=1)
CLOCK = {"wall_s", "step_s", "tokens_per_s", "mfu", "mfu_padded"}  # what two runs of the same steps may differ in


def run(trial_dir: Path, *, budget: int = BUDGET, make=None, train_split_tokens: int | None = None,
        tokenizer_dir: Path | None = None, report=None, precision: str = "fp32", **overrides):  # noqa: F811
    """One mlm xxs run on the test_train batches, returning (result, reports)."""
    trial = smoke_trial("mlm", "xxs", budget, batch_size=2 * MICRO, micro_batch_size=MICRO, precision=precision,
                        **overrides)
    config = build_config("mlm", trial.size, VOCAB, SEQ)
    reports: list[dict] = []
    result = train(trial, trial_dir, make or batches("mlm"), val_batches("mlm"), config,
                   train_split_tokens=train_split_tokens, tokenizer_dir=tokenizer_dir,
                   report=report or reports.append, device="cpu")
    return result, reports


def timeless(trial_dir: Path) -> list[dict]:
    """metrics.jsonl without its events and clock readings: what an exact rerun reproduces."""
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in records(trial_dir) if "event" not in r]


def stable_points(trial_dir: Path) -> list[dict]:
    """The log records of the steps where a stable state was saved (one per milestone)."""
    return [r for r in records(trial_dir) if "stable_state" in r]


@pytest.fixture(scope="module")
def wsd(tmp_path_factory, tokenizer_dir):  # noqa: F811
    trial_dir = tmp_path_factory.mktemp("wsd")
    result, reports = run(trial_dir, tokenizer_dir=tokenizer_dir, **WSD)
    return trial_dir, result, reports


# ---------------------------------------------------------------------------------------------
# plain functions


def test_wsd_schedule_functions():
    cfg = TrainConfig(lr=1.0, lr_min_ratio=0.1, warmup_fraction=0.05, schedule="wsd", cooldown_fraction=0.2)
    assert lr_at(0.025, cfg) == pytest.approx(0.5)  # warmup as in the other schedules
    assert [lr_at(f, cfg) for f in (0.05, 0.5, 0.99, 1.0)] == [1.0] * 4  # the main run never decays
    assert [cooldown_lr(p, 1.0, cfg) for p in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 0.55, 0.1])
    root = cfg.model_copy(update={"cooldown_shape": "1-sqrt"})
    assert [cooldown_lr(p, 1.0, root) for p in (0.0, 0.25, 1.0)] == pytest.approx([1.0, 0.55, 0.1])
    assert [branch_start(m, cfg) for m in milestones(8_000, 4)] == [800, 1_600, 3_200, 6_400]
    assert anneals(cfg) and not anneals(TrainConfig(schedule="constant_cooldown", cooldown_fraction=0.0))
    assert not anneals(TrainConfig(lr_min_ratio=1.0))
    with pytest.raises(ValueError, match=r"first wsd cooldown branch is 200 tokens .* = 256\); use fewer"):
        run(Path("/nonexistent"), schedule="wsd", checkpoints=3, cooldown_fraction=0.2, warmup_fraction=0.0)
    with pytest.raises(ValueError, match=r"first cooldown branch starts at 0\.025 .*warmup_fraction: 0\.05"):
        TrainConfig(schedule="wsd", checkpoints=6, warmup_fraction=0.05)
    with pytest.raises(ValueError, match="wsd needs cooldown_fraction > 0"):
        TrainConfig(schedule="wsd", cooldown_fraction=0.0)


def test_data_use_counts_epochs_and_unique_tokens():
    assert data_use(500, 1_000) == (0.5, 500.0, "")
    epochs, unique, warning = data_use(4_500, 1_000)
    assert (epochs, unique) == (4.5, 1_000.0) and "4.50 epochs" in warning and "Muennighoff" in warning
    assert data_use(4_000, 1_000)[2] == ""  # 4 epochs is the limit, not past it
    assert all(math.isnan(v) for v in data_use(10, None)[:2]) and data_use(10, None)[2] == ""


# ---------------------------------------------------------------------------------------------
# losses in fp32


def _hand_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean of -log softmax(logits)[label] over labelled positions, in float64, one position at a time."""
    total, n = 0.0, 0
    for row, targets in zip(logits.double(), labels):
        for position, target in zip(row, targets.tolist()):
            if target != -100:
                total += float(torch.logsumexp(position, 0) - position[target])
                n += 1
    return total / n


@pytest.mark.parametrize("family", ["mlm", "clm"])
def test_lm_loss_is_the_cross_entropy_of_the_labelled_positions(family):
    config = build_config(family, smoke_trial(family).size, VOCAB, SEQ)
    model = build_model(config, seed=0).eval()
    batch = synthetic_batches(family, 0, n_batches=1, micro_batch_size=MICRO, seq_len=SEQ, vocab_size=VOCAB)[0]
    with torch.no_grad():
        logits = model(**{k: v for k, v in model_inputs(batch, config).items() if k != "labels"}).logits
        ours = lm_loss(logits, batch["labels"], family)
        own = model(**model_inputs(batch, config)).loss  # the HF model's loss (same objective, in fp32 here)
    shifted = (logits[:, :-1], batch["labels"][:, 1:]) if family == "clm" else (logits, batch["labels"])
    assert ours.dtype == torch.float32
    assert float(ours) == pytest.approx(_hand_cross_entropy(*shifted), rel=1e-6)
    assert float(ours) == pytest.approx(float(own), rel=1e-6)


def test_a_bf16_model_gives_the_fp32_loss_to_1e3():
    config = build_config("mlm", smoke_trial("mlm").size, VOCAB, SEQ)
    model = build_model(config, seed=0).eval()
    half = build_model(config, seed=0).to(torch.bfloat16).eval()
    for batch in synthetic_batches("mlm", 0, n_batches=4, micro_batch_size=MICRO, seq_len=SEQ, vocab_size=VOCAB):
        inputs = {k: v for k, v in model_inputs(batch, config).items() if k != "labels"}
        with torch.no_grad():
            full, low = model(**inputs).logits, half(**inputs).logits
        assert low.dtype == torch.bfloat16
        loss_low = lm_loss(low, batch["labels"], "mlm")
        assert loss_low.dtype == torch.float32
        assert float(loss_low) == pytest.approx(float(lm_loss(full, batch["labels"], "mlm")), rel=1e-3)


def test_training_in_bf16_reports_the_fp32_loss(tmp_path):
    """DeepSpeed bf16 on CPU: the first step's loss (the same batches, the initial weights rounded to
    bf16) agrees with the fp32 run's to 1e-3. Measured here: 3e-5 apart; with the model's own loss,
    taken from bf16 logits and rounded to bf16, 1.4e-3 apart, which fails this test."""
    small = dict(checkpoints=1, log_every_steps=1)
    run(tmp_path / "fp32", **small)
    run(tmp_path / "bf16", precision="bf16", zero_stage=1, **small)  # 2 micro-steps: fp32 accumulation needs ZeRO
    first = {mode: records(tmp_path / mode)[0]["train_loss"] for mode in ("fp32", "bf16")}
    assert first["bf16"] == pytest.approx(first["fp32"], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# wsd runs


def test_wsd_checkpoints_are_branch_ends_that_reload(wsd):
    trial_dir, result, _ = wsd
    folder = TrialDir(trial_dir)
    assert result.status == "finished" and [c.milestone for c in result.checkpoints] == milestones(result.budget_tokens, 3)
    assert [int(p.name) for p in folder.checkpoints()] == [c.n_tokens for c in result.checkpoints]
    assert all(c.annealed for c in result.checkpoints)
    for info, path in zip(result.checkpoints, folder.checkpoints()):
        assert TrialDir.verify(path) == [] and not (folder.state_dir(path) / "ds").exists()  # no optimizer state
        model = AutoModelForMaskedLM.from_pretrained(path)
        assert hf_val_loss(model, "mlm") == pytest.approx(info.val_loss, rel=1e-5)
    assert result.checkpoints[-1].val_loss < result.checkpoints[0].val_loss

    # each branch: from its stable state (at 1 - cooldown_fraction of its milestone) down to the floor
    recs = [r for r in records(trial_dir) if "event" not in r]
    starts = stable_points(trial_dir)
    cfg = smoke_trial("mlm", "xxs", **WSD).train
    assert [s["n_tokens"] >= branch_start(c.milestone, cfg) for s, c in zip(starts, result.checkpoints)] == [True] * 3
    for start, info in zip(starts, result.checkpoints):
        branch = [r for r in recs if r.get("branch") == info.milestone]
        assert [r["step"] for r in branch] == list(range(start["step"] + 1, info.step + 1))
        lrs = [r["lr"] for r in branch]
        assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(cfg.lr_min_ratio * cfg.lr)
        assert start["lr"] == cfg.lr and branch[-1]["checkpoint"] == info.path
    # C counts the branches: the last point's run spent its own tokens plus every earlier branch's
    branch_tokens = [c.n_tokens - s["n_tokens"] for s, c in zip(starts, result.checkpoints)]
    assert result.checkpoints[-1].tokens_spent == result.n_tokens + sum(branch_tokens[:-1]) == result.tokens_spent
    assert result.flops_spent == pytest.approx(result.flops * result.tokens_spent / result.n_tokens)
    assert [c.flops for c in result.checkpoints] == pytest.approx(
        [result.flops * c.n_tokens / result.n_tokens for c in result.checkpoints])
    assert [p.name for p in folder.stable_states()] == [f"{result.budget_tokens:012d}"]  # only the newest is kept


def test_the_branches_leave_the_stable_run_alone(wsd, tmp_path):
    """The stable trajectory of the wsd run is the constant-lr run's, step for step, and so are its
    weights at the last stable state, although three branches were run and undone in between."""
    trial_dir, _, _ = wsd
    last = stable_points(trial_dir)[-1]
    constant, _ = run(tmp_path, schedule="constant_cooldown", cooldown_fraction=0.0, warmup_fraction=0.0,
                      checkpoints=1, log_every_steps=1, budget=last["n_tokens"])
    assert constant.n_steps == last["step"] and constant.n_tokens == last["n_tokens"]
    keys = ("n_tokens", "epoch", "train_loss", "lr", "grad_norm")
    stable = {r["step"]: {k: r[k] for k in keys} for r in records(trial_dir)
              if r.get("phase") == "stable" and r["step"] <= last["step"]}
    reference = {r["step"]: {k: r[k] for k in keys} for r in records(tmp_path) if "event" not in r}
    assert stable == reference  # bit for bit: no tolerance
    states = Path(trial_dir) / last["stable_state"] / "state" / "ds" / "mp_rank_00_model_states.pt"
    ds_state = torch.load(states, weights_only=True)["module"]
    model = AutoModelForMaskedLM.from_pretrained(TrialDir(tmp_path).checkpoints()[-1])
    for name, value in model.state_dict().items():
        if name in ds_state:  # tied weights are saved once
            assert torch.equal(ds_state[name], value), name


class Crash(RuntimeError):
    pass


def _crash_at(when):
    def report(record: dict) -> None:
        if when(record):
            raise Crash(f"simulated crash at step {record['step']}")
    return report


@pytest.mark.parametrize("where", ["mid_branch", "after_a_branch"])
def test_a_crashed_wsd_run_resumes_to_the_same_bytes(wsd, tmp_path, tokenizer_dir, where):  # noqa: F811
    trial_dir, reference, _ = wsd
    second = reference.checkpoints[1]
    start = stable_points(trial_dir)[1]
    if where == "mid_branch":  # inside the second branch, before its checkpoint: the branch is redone
        assert second.step - start["step"] >= 2
        when = lambda r: r.get("branch") == second.milestone and r["step"] == start["step"] + 1  # noqa: E731
    else:  # in the stable phase after the first branch, before the second stable state: the branch is not redone
        when = lambda r: r.get("phase") == "stable" and r["step"] == start["step"] - 1  # noqa: E731
    with pytest.raises(Crash):
        run(tmp_path, tokenizer_dir=tokenizer_dir, report=_crash_at(when), **WSD)
    n_done = 1
    assert len(TrialDir(tmp_path).checkpoints()) == n_done
    result, reports = run(tmp_path, tokenizer_dir=tokenizer_dir, **WSD)

    resumed = [r for r in records(tmp_path) if r.get("event") == "resumed"]
    resumed_at = start["step"] if where == "mid_branch" else stable_points(trial_dir)[0]["step"]
    assert [r["step"] for r in resumed] == [resumed_at]
    assert reports[0]["step"] == resumed_at + 1
    assert timeless(tmp_path) == timeless(trial_dir)  # the crashed tail dropped, the finished branch kept
    for ours, theirs in zip(TrialDir(tmp_path).checkpoints(), TrialDir(trial_dir).checkpoints(), strict=True):
        assert ours.name == theirs.name
        assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()
    assert [c.n_tokens for c in result.checkpoints] == [c.n_tokens for c in reference.checkpoints]
    assert result.tokens_spent == reference.tokens_spent and result.n_tokens == reference.n_tokens
    assert [c.val_loss for c in result.checkpoints] == [c.val_loss for c in reference.checkpoints]

    again, reports = run(tmp_path, **WSD)  # a finished wsd run: nothing left to do
    assert (again.n_steps, again.n_tokens, again.tokens_spent) == (result.n_steps, result.n_tokens, result.tokens_spent)
    assert [r["done"] for r in reports] == [True]


# ---------------------------------------------------------------------------------------------
# annealed, epochs, unique tokens: in the result and in pretrain.parquet


def test_a_cosine_run_marks_its_last_checkpoint_annealed_and_counts_epochs(tmp_path, caplog):
    split = synthetic_batches("mlm", 0, n_batches=4, micro_batch_size=MICRO, seq_len=SEQ, vocab_size=VOCAB)
    split_tokens = sum(int((b["input_ids"] != 0).sum()) for b in split)  # a train split of 4 micro-batches

    def small_epochs(epoch: int) -> list[dict]:
        return split  # every pass reads the same molecules, as a real split does
    rd = RunDir(tmp_path / "run")
    folder = rd.trial("smoke_mlm_xxs")
    with caplog.at_level("WARNING", logger="clmscale.engine.train"):
        result, _ = run(folder.path, make=small_epochs, checkpoints=3, train_split_tokens=split_tokens)

    infos = result.checkpoints
    assert [c.annealed for c in infos] == [False, False, True]
    assert [c.epochs for c in infos] == [c.n_tokens / split_tokens for c in infos]
    assert [c.unique_tokens for c in infos] == [float(min(c.n_tokens, split_tokens)) for c in infos]
    assert infos[0].epochs < MAX_EPOCHS < infos[-1].epochs  # the grid of this test spans the limit
    assert [bool(c.warning) for c in infos] == [c.epochs > MAX_EPOCHS for c in infos]
    assert sum("Muennighoff" in m for m in caplog.messages) == sum(bool(c.warning) for c in infos)
    for info, path in zip(infos, folder.checkpoints()):  # the data stream agrees: whole passes made
        position = folder.trainer_state(path)["data_position"][0]
        assert position["epoch"] + position["n_consumed"] // len(split) == int(info.epochs)
    assert (result.epochs, result.unique_tokens, result.train_split_tokens) == (
        infos[-1].epochs, float(split_tokens), split_tokens)
    assert [c.tokens_spent for c in infos] == [c.n_tokens for c in infos]  # no branches: spent = seen

    trial = smoke_trial("mlm", "xxs", result.budget_tokens, checkpoints=3)
    rows = pd.DataFrame(pretrain_rows(rd, trial, folder.result()))
    assert rows["annealed"].tolist() == [False, False, True]
    assert rows["epochs"].tolist() == [c.epochs for c in infos]
    assert rows["unique_tokens"].tolist() == [c.unique_tokens for c in infos]
    assert rows["tokens_spent"].tolist() == [c.n_tokens for c in infos] and (rows["warning"] != "").sum() >= 1
    rd.write_table("pretrain", rows)
    table = rd.read_table("pretrain")

    every = counted_checkpoints(table)
    assert every.checkpoints["tokens"].tolist() == [c.n_tokens for c in infos]  # the default keeps them all
    points = counted_checkpoints(table, annealed_only=True)
    assert points.checkpoints["tokens"].tolist() == [infos[-1].n_tokens]
    assert points.trajectory["tokens"].tolist() == [c.n_tokens for c in infos[:2]]
    [note] = [e for e in points.excluded if "not annealed" in e["reason"]]
    assert note["n_rows"] == 2 and note["status"] == "finished" and points.left_out_trials == set()

    unknown = counted_checkpoints(table.assign(annealed=None), annealed_only=True)  # a table from before the column
    assert unknown.checkpoints.empty and "without an annealed value" in unknown.excluded[0]["reason"]


def test_wsd_under_zero2_matches_zero0(wsd, tmp_path):
    """ZeRO-2 partitions the optimizer state that each branch's return to the stable state reloads."""
    _, reference, _ = wsd
    result, _ = run(tmp_path, zero_stage=2, **WSD)
    assert [c.n_tokens for c in result.checkpoints] == [c.n_tokens for c in reference.checkpoints]
    assert [c.val_loss for c in result.checkpoints] == pytest.approx([c.val_loss for c in reference.checkpoints],
                                                                     rel=1e-4)
