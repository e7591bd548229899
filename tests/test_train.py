"""engine.train on CPU, one process (gloo), fp32: a tiny model trains under ZeRO 0 and 2, its
checkpoints load with from_pretrained, a resumed run equals an uninterrupted one, NaN stops a run."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import flip_byte
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerFast

from clmscale.engine.config import TrainConfig
from clmscale.engine.models import build_config, model_inputs
from clmscale.engine.rundir import TrialDir
from clmscale.engine.train import INJECT_NAN_ENV, lr_at, milestones, smoke_trial, synthetic_batches, train

VOCAB, SEQ, MICRO = 40, 32, 4
BUDGET = 4_000  # tokens: ~20 optimizer steps of 8 sequences
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batches(family: str):
    def make(epoch: int) -> list[dict]:
        return synthetic_batches(family, epoch, n_batches=12, micro_batch_size=MICRO, seq_len=SEQ, vocab_size=VOCAB)

    return make


def val_batches(family: str) -> list[dict]:
    return synthetic_batches(family, -1, n_batches=2, micro_batch_size=MICRO, seq_len=SEQ, vocab_size=VOCAB)


def run(tmp: Path, family: str = "mlm", make=None, tokenizer_dir=None, **overrides):
    overrides = {"precision": "fp32", **overrides}
    trial = smoke_trial(family, "xxs", BUDGET, batch_size=2 * MICRO, micro_batch_size=MICRO, **overrides)
    config = build_config(family, trial.size, VOCAB, SEQ)
    reports = []
    result = train(
        trial, tmp, make or batches(family), val_batches(family), config,
        tokenizer_dir=tokenizer_dir, report=reports.append, device="cpu",
    )
    return result, reports


def records(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "metrics.jsonl").read_text().splitlines()]


def hf_val_loss(model, family: str) -> float:
    """Token-weighted validation loss of a loaded model, computed without the engine."""
    config, total, n = model.config, 0.0, 0
    with torch.no_grad():
        for batch in val_batches(family):
            labels = batch["labels"][:, 1:] if family == "clm" else batch["labels"]
            k = int((labels != -100).sum())
            total += float(model(**model_inputs(batch, config)).loss) * k
            n += k
    return total / n


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + [f"t{i}" for i in range(VOCAB - len(SPECIALS))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def stage0(tmp_path_factory, tokenizer_dir):
    """The reference run: mlm, ZeRO 0, two checkpoints; several tests read it."""
    trial_dir = tmp_path_factory.mktemp("stage0")
    result, reports = run(trial_dir, tokenizer_dir=tokenizer_dir)
    return trial_dir, result, reports


# ---------------------------------------------------------------------------------------------
# plain functions


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, lr_min_ratio=0.1, warmup_fraction=0.1)
    assert lr_at(0.0, cfg) == 0 and lr_at(0.05, cfg) == pytest.approx(0.5)
    assert lr_at(0.1, cfg) == pytest.approx(1.0) and lr_at(1.0, cfg) == pytest.approx(0.1)
    assert lr_at(0.55, cfg) == pytest.approx(0.55)  # cosine midpoint: halfway between peak and floor
    flat = TrainConfig(
        lr=1.0, lr_min_ratio=0.0, warmup_fraction=0.0, schedule="constant_cooldown", cooldown_fraction=0.2
    )
    assert [lr_at(f, flat) for f in (0.0, 0.8, 0.9, 1.0)] == pytest.approx([1.0, 1.0, 0.5, 0.0])


def test_milestones_double_up_to_the_budget():
    assert milestones(8_000, 4) == [1_000, 2_000, 4_000, 8_000]
    assert milestones(1_000, 1) == [1_000]


# ---------------------------------------------------------------------------------------------
# training runs


def test_mlm_trains_and_checkpoints_load(stage0, tmp_path):
    trial_dir, result, reports = stage0
    assert result.status == "finished" and result.n_tokens >= BUDGET
    recs = records(trial_dir)
    assert recs == json.loads(json.dumps(reports[:-1]).replace("NaN", "null"))  # what was reported, was logged
    assert reports[-1]["done"] and reports[-1]["status"] == "finished" and reports[-1]["n_tokens"] == result.n_tokens
    assert recs[-1]["train_loss"] < recs[0]["train_loss"] - 0.2
    assert all(r["mfu"] is None for r in recs)  # NaN on CPU, null in JSON
    assert json.loads((trial_dir / "result.json").read_text())["n_tokens"] == result.n_tokens

    dirs = TrialDir(trial_dir).checkpoints()
    assert [int(d.name) for d in dirs] == [c.n_tokens for c in result.checkpoints]
    assert dirs[0].name >= f"{BUDGET // 2:012d}" and len(dirs) == 2
    for info, path in zip(result.checkpoints, dirs):
        assert TrialDir.verify(path) == []
        model = AutoModelForMaskedLM.from_pretrained(path)
        assert hf_val_loss(model, "mlm") == pytest.approx(info.val_loss, rel=1e-5)
        assert AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("[MASK]") == 4
        state = json.loads((path / "state" / "trainer_state.json").read_text())
        assert state["n_tokens"] == info.n_tokens and state["data_position"][0]["n_consumed"] > 0
    assert result.val_loss == result.checkpoints[-1].val_loss < result.checkpoints[0].val_loss

    copy = shutil.copytree(dirs[0], tmp_path / dirs[0].name)
    (copy / "config.json").write_text("{}")  # corruption is caught
    assert TrialDir.verify(copy) == ["config.json"]


def test_zero2_matches_zero0(stage0, tmp_path):
    _, reference, _ = stage0
    result, _ = run(tmp_path, zero_stage=2)
    expected = [r["train_loss"] for r in records(stage0[0])]
    assert [r["train_loss"] for r in records(tmp_path)] == pytest.approx(expected, rel=1e-4)
    assert result.val_loss == pytest.approx(reference.val_loss, rel=1e-4)
    model = AutoModelForMaskedLM.from_pretrained(TrialDir(tmp_path).checkpoints()[-1])
    assert hf_val_loss(model, "mlm") == pytest.approx(result.val_loss, rel=1e-5)


def test_clm_trains(tmp_path):
    result, reports = run(tmp_path, family="clm")
    assert result.status == "finished"
    recs = records(tmp_path)
    assert recs[-1]["train_loss"] < recs[0]["train_loss"] - 0.2
    model = AutoModelForCausalLM.from_pretrained(TrialDir(tmp_path).checkpoints()[-1])
    assert hf_val_loss(model, "clm") == pytest.approx(result.val_loss, rel=1e-5)


def test_resume_equals_uninterrupted(stage0, tmp_path, tokenizer_dir):
    reference_dir, reference, _ = stage0
    first_checkpoint_step = reference.checkpoints[0].step
    crash_after = (first_checkpoint_step + 3) * 2  # micro-batches: a few steps past the checkpoint
    served = 0

    def crashing(epoch: int):
        nonlocal served
        for batch in batches("mlm")(epoch):
            served += 1
            if served > crash_after:
                raise RuntimeError("simulated worker crash")
            yield batch

    with pytest.raises(RuntimeError, match="simulated"):
        run(tmp_path, make=crashing, tokenizer_dir=tokenizer_dir)
    assert len(TrialDir(tmp_path).checkpoints()) == 1
    result, reports = run(tmp_path, tokenizer_dir=tokenizer_dir)  # resumes from the first checkpoint
    assert reports[0]["step"] > first_checkpoint_step

    keys = ("step", "n_tokens", "epoch", "train_loss", "lr", "grad_norm", "val_loss")
    expected = [{k: r.get(k) for k in keys} for r in records(reference_dir)]
    resumed = [r for r in records(tmp_path) if r.get("event") == "resumed"]
    assert [r["step"] for r in resumed] == [first_checkpoint_step]  # one restart, from the checkpoint
    got = [{k: r.get(k) for k in keys} for r in records(tmp_path) if "event" not in r]
    assert [r["step"] for r in got] == [r["step"] for r in expected]  # the crashed tail was dropped
    for a, b in zip(got, expected):
        assert a.keys() == b.keys() and {k for k in a if a[k] is None} == {k for k in b if b[k] is None}
        assert {k: v for k, v in a.items() if v is not None} == pytest.approx(
            {k: v for k, v in b.items() if v is not None}, rel=1e-6
        )
    assert [c.n_tokens for c in result.checkpoints] == [c.n_tokens for c in reference.checkpoints]
    assert result.val_loss == pytest.approx(reference.val_loss, rel=1e-6)

    again, reports = run(tmp_path)  # a finished trial: nothing left to do
    assert again.n_steps == result.n_steps and [r["done"] for r in reports] == [True]


@pytest.mark.parametrize("damaged", ["model.safetensors", "state/rank_00000.pt"])
def test_corrupt_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(stage0, tmp_path, tokenizer_dir, damaged):
    reference_dir, reference, _ = stage0
    shutil.copytree(reference_dir, tmp_path, dirs_exist_ok=True)
    first, last = TrialDir(tmp_path).checkpoints()
    good = (last / "model.safetensors").read_bytes()
    flip_byte(last / damaged)
    assert TrialDir.verify(last) == [damaged] and TrialDir.verify(first) == []

    result, _ = run(tmp_path, tokenizer_dir=tokenizer_dir)

    events = [r for r in records(tmp_path) if r.get("event") == "corrupt_checkpoint"]
    assert events == [{"trial_id": events[0]["trial_id"], "event": "corrupt_checkpoint", "checkpoint": last.name,
                       "files": [damaged], "kept_as": f"{last.name}.corrupt", "resumed_from": first.name}]
    assert TrialDir.verify(tmp_path / "checkpoints" / f"{last.name}.corrupt") == [damaged]  # kept, not deleted
    assert TrialDir(tmp_path).checkpoints() == [first, last] and TrialDir.verify(last) == []  # the milestone redone
    assert (last / "model.safetensors").read_bytes() == good  # exactly as the run without the fault
    assert [c.n_tokens for c in result.checkpoints] == [c.n_tokens for c in reference.checkpoints]
    assert result.val_loss == pytest.approx(reference.val_loss, rel=1e-6)


def test_nan_loss_marks_the_run_diverged(tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_NAN_ENV, "7")
    result, reports = run(tmp_path)
    assert reports[-1]["status"] == "diverged"
    assert result.status == "diverged" and result.diverged_at_step == 7 and result.n_steps == 6
    assert math.isnan(result.train_loss)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["status"] == "diverged" and saved["diverged_at_step"] == 7
    assert TrialDir(tmp_path).checkpoints() == []


def _zero3_worker(rank: int, world: int, port: int, trial_dir: str) -> None:
    """One of two workers: its own data stream (seed = rank), the shared validation batches."""
    import os

    import torch.distributed as dist

    from clmscale.engine.config import ResourcesConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))  # what torchrun sets; DeepSpeed asserts LOCAL_RANK
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    trial = smoke_trial("mlm", "xxs", BUDGET // 2, zero_stage=3, precision="fp32", checkpoints=1)
    trial = trial.model_copy(update={"resources": ResourcesConfig(workers=world)})

    def make(epoch: int) -> list[dict]:
        return synthetic_batches(
            "mlm", epoch, n_batches=4, micro_batch_size=MICRO, seq_len=SEQ, vocab_size=VOCAB, seed=rank
        )

    config = build_config("mlm", trial.size, VOCAB, SEQ)
    train(trial, Path(trial_dir), make, val_batches("mlm"), config, device="cpu", report=lambda metrics: None)
    dist.destroy_process_group()


@pytest.mark.slow  # ~15 s on an idle 2-core machine, ~60 s on a busy one
def test_zero3_two_processes(tmp_path):
    """ZeRO-3 partitions the weights over two gloo workers; the consolidated fp32 copy still loads."""
    import multiprocessing
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a fork server imports torch, transformers and deepspeed once for both workers (spawn would
    # import them twice, ~10 s each on a busy machine); forking pytest itself would copy its process group
    multiprocessing.set_forkserver_preload(["clmscale.engine.train", "deepspeed", "transformers"])
    mp.start_processes(_zero3_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="forkserver")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "finished" and result["n_tokens"] >= BUDGET // 2
    recs = records(tmp_path)
    assert recs[-1]["n_tokens"] / recs[-1]["step"] > 2 * MICRO * SEQ // 2  # both workers' tokens count
    model = AutoModelForMaskedLM.from_pretrained(TrialDir(tmp_path).checkpoints()[-1])
    assert hf_val_loss(model, "mlm") == pytest.approx(result["val_loss"], rel=1e-5)


ONE_PROCESS_GROUP = """
import os, subprocess, sys, torch, torch.distributed as dist
from clmscale.engine.train import _init_process_group
_init_process_group(torch.device("cpu"))
t = torch.ones(2); dist.all_reduce(t)
assert dist.get_world_size() == 1 and t.tolist() == [1.0, 1.0]
assert "MASTER_PORT" not in os.environ, os.environ["MASTER_PORT"]
if len(sys.argv) == 1:  # a child started while this group lives makes its own (CI: gpu_readiness after test_axes)
    subprocess.run([sys.executable, __file__, "child"], check=True, timeout=60)
"""


def test_one_process_group_claims_no_port_a_child_could_inherit(tmp_path):
    script = tmp_path / "group.py"
    script.write_text(ONE_PROCESS_GROUP)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    subprocess.run([sys.executable, str(script)], check=True, timeout=120, env=env)


def test_compiled_training_follows_the_eager_run(tmp_path):
    """train.compile: the model under torch.compile, every batch padded to max_seq_len (one shape). The
    padding carries no label and no attention, so the losses follow the eager run's closely."""
    eager, _ = run(tmp_path / "eager")
    compiled, _ = run(tmp_path / "compiled", compile=True)
    assert compiled.status == "finished" and compiled.n_tokens == eager.n_tokens  # the same batches, the same tokens
    assert compiled.val_loss == pytest.approx(eager.val_loss, rel=1e-3)


def test_the_loop_reads_the_device_only_at_log_points(tmp_path, monkeypatch):
    """No per-step host read (issue 16): the loss-is-finite check reads the device once per log window."""
    from clmscale.engine import train as train_module

    reads = []
    real = train_module._finite_so_far
    monkeypatch.setattr(train_module, "_finite_so_far", lambda loop: reads.append(loop.state.step) or real(loop))
    result, _ = run(tmp_path, log_every_steps=5)
    assert result.n_steps > 10 and len(reads) <= result.n_steps // 5 + 2 * len(result.checkpoints) + 1


def test_bf16_accumulates_gradients_in_fp32_or_is_refused(tmp_path, monkeypatch):
    """DeepSpeed 0.19 adds bf16 micro-step gradients in fp32 only under ZeRO: ZeRO 1 with 2 micro-steps
    runs its BF16_Optimizer with an fp32 accumulator; ZeRO 0 with 2 micro-steps is refused, by the
    Trial where the split is known, by train() where it is not (a 2-worker trial run by one process)."""
    import deepspeed
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from clmscale.engine.config import Trial

    with pytest.raises(ValueError, match=r"smoke_mlm_xxs: bf16 at zero_stage 0 would accumulate gradients in bf16 "
                                         r"over 2 micro-steps .*use zero_stage: 1 or auto"):  # fmt: skip
        smoke_trial("mlm", "xxs", BUDGET, batch_size=2 * MICRO, micro_batch_size=MICRO, precision="bf16")
    two = smoke_trial("mlm", "xxs", BUDGET, batch_size=2 * MICRO, micro_batch_size=MICRO, precision="fp32")
    two = Trial.model_validate({**two.model_dump(), "train": {**two.train.model_dump(), "precision": "bf16"},
                                "resources": {**two.resources.model_dump(), "workers": 2}})  # one micro-step each
    config = build_config("mlm", two.size, VOCAB, SEQ)
    with pytest.raises(ValueError, match=r"bf16 on cpu at zero_stage 0 .* over 2 micro-steps of 1 worker"):
        train(two, tmp_path / "refused", batches("mlm"), val_batches("mlm"), config, device="cpu")

    engines = []
    real = deepspeed.initialize
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: engines.append(real(**kw)) or engines[-1])
    result, _ = run(tmp_path / "zero1", precision="bf16", zero_stage=1, checkpoints=1)
    engine = engines[0][0]
    assert isinstance(engine.optimizer, BF16_Optimizer) and engine.gradient_accumulation_steps() == 2
    assert engine.get_data_types() == (torch.bfloat16, torch.float32)
    assert result.status == "finished" and math.isfinite(result.train_loss)
