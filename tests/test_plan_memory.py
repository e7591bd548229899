"""The planner's memory model against measured peaks: three rungs trained on CPU by engine.train.train
(DeepSpeed ZeRO 0, fp32: what `engine.plan.memory_per_device` claims for that case).

How it is measured: each rung runs in a fresh process (this file run as a script). The process
imports torch and deepspeed and makes its one-process gloo group first, resets the kernel's
high-water mark (`/proc/self/clear_refs` = 5), reads VmRSS, then trains two optimizer steps of two
micro-steps each; the reporter called at step 2 (before any checkpoint or evaluation) reads
VmHWM and stops the run. Peak RSS delta = VmHWM - VmRSS. torch has no CPU allocator statistics,
and glibc keeps freed heap pages (a caching allocator's "reserved"), so the processes run with
MALLOC_MMAP_THRESHOLD_=65536: tensors above 64 KiB are mmapped and returned when freed, and RSS
follows the live tensor bytes. The fixed cost of a first step (kernels, autograd, DeepSpeed's
engine) is measured on the xxs rung, whose tensors are a few hundred kB, and subtracted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# (family, rung, micro-batch, sequence length, precision): an activation-heavy encoder, a decoder with
# about as much state as activations, and an encoder whose weights and Adam state dominate. The probe
# also takes precision "bf16" (DeepSpeed's FP16_UnfusedOptimizer: bf16 weights and grads, fp32
# masters, fp32 grads at step) and a ZeRO stage, for one-off checks:
#   python tests/test_plan_memory.py '["mlm", "xl", 2, 32, "bf16", 0]'
CASES = [("mlm", "m", 16, 128, "fp32"), ("clm", "l", 8, 64, "fp32"), ("mlm", "xl", 2, 32, "fp32")]
BASELINES = {"fp32": ("mlm", "xxs", 2, 16, "fp32")}
VOCAB = 64
TOLERANCE = 0.25


class _Stop(Exception):
    pass


def probe(family: str, rung: str, micro_batch_size: int, seq_len: int, precision: str = "fp32", zero_stage: int = 0) -> dict:
    """Peak RSS delta of two optimizer steps (grad accumulation 2) of engine.train.train on CPU."""
    import tempfile

    import torch
    import torch.distributed as dist

    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed  # noqa: F401  (imported before the baseline: its import is not the model's memory)

    from clmscale.engine.models import build_config
    from clmscale.engine.train import smoke_trial, synthetic_batches, train

    torch.set_num_threads(1)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # what engine.train's own group setup sets
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    trial = smoke_trial(family, rung, budget_tokens=10**9, batch_size=2 * micro_batch_size,
                        micro_batch_size=micro_batch_size, log_every_steps=2, checkpoints=1, zero_stage=zero_stage,
                        precision=precision)  # fmt: skip
    config = build_config(family, trial.size, VOCAB, seq_len)
    data = dict(micro_batch_size=micro_batch_size, seq_len=seq_len, vocab_size=VOCAB)
    batches = synthetic_batches(family, 0, n_batches=8, **data)
    val = synthetic_batches(family, -1, n_batches=1, **data)

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    peak: dict[str, int] = {}

    def report(metrics: dict) -> None:
        peak["hwm"] = status("VmHWM")
        raise _Stop

    Path("/proc/self/clear_refs").write_text("5")
    base = status("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            train(trial, Path(tmp), lambda epoch: batches, val, config, report=report, device="cpu")
        except _Stop:
            pass
    return {"peak_bytes": peak["hwm"] - base}


def _measure(case: tuple) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    out = subprocess.run([sys.executable, __file__, json.dumps(case)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def _predicted(case: tuple) -> float:
    from clmscale.engine.config import LADDER
    from clmscale.engine.plan import memory_per_device, model_shape

    family, rung, micro, seq_len, precision = case
    shape = model_shape(family, LADDER[rung], VOCAB, seq_len)
    return memory_per_device(shape, micro_batch_size=micro, zero_stage=0, world_size=1, bf16=precision == "bf16",
                             device="cpu", overhead_bytes=0.0).total  # fmt: skip


@pytest.mark.timeout(300)
def test_memory_model_matches_measured_cpu_peaks():
    fixed = {precision: _measure(case) - _predicted(case) for precision, case in BASELINES.items()}
    rows = []
    for case in CASES:
        measured = _measure(case) - fixed[case[-1]]
        predicted = _predicted(case)
        rows.append((case, measured, predicted))
    text = "; ".join(f"{c[0]} {c[1]} b={c[2]} s={c[3]} {c[4]}: measured {m / 1e6:.1f} MB, model {p / 1e6:.1f} MB "
                     f"({p / m - 1:+.0%})" for c, m, p in rows)  # fmt: skip
    print(f"fixed cost {fixed['fp32'] / 1e6:.1f} MB; {text}")
    for case, measured, predicted in rows:
        assert abs(predicted - measured) <= TOLERANCE * measured, text


if __name__ == "__main__":
    print(json.dumps(probe(*json.loads(sys.argv[1]))))
