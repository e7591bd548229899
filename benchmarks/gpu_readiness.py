"""GPU readiness in one prepared run: ceilings, training MFU per rung, packed tiny rungs, HVP throughput.

Built for a lent GPU machine whose image has torch and transformers but not this repository's other
dependencies: the model ladder and FLOP formulas come from engine/ladder.py and engine/models.py
(no pydantic, ray, deepspeed or rdkit); the engine's own step (engine.train, DeepSpeed) runs only
when deepspeed and pydantic import (carry ../shared/tools/device-wheels.sh's .whl/), and is
recorded as skipped, with the reason, otherwise. In this order, most important first:

  setup     versions, the device, the measured bf16 / TF32 / fp32 GEMM ceilings (8192^3, random data),
            host<->device copy bandwidth (pinned and pageable) and the device-to-device copy rate.
  train     per rung (mlm m, xl, 3xl, 6xl and clm 3xl of sweeps/paper.yaml, their micro-batches):
            a plain HF + fused AdamW + bf16 autocast loop and the engine's standalone step, on the
            same MOSES batches (engine.data.local_batches), padded and packed; torch.compile last.
            ms/step (p50, p95), tokens/s padded and real, MFU against the datasheet peak and the
            measured ceiling (padded FLOPs and real-token FLOPs), peak memory.
  packing   aggregate tokens/s of k = 1 and k = 4 processes of the smallest rung on one GPU, each
            capped by torch.cuda.set_per_process_memory_fraction(1/k); p50/p95 step time each.
  hvp       matvecs/s of engine.hessian.HVPOperator for two rungs in fp32 and TF32, Lanczos λmax in
            both and their relative difference, peak memory; one matvec of the largest rung.

Timing: warm-up steps first (every distinct batch shape, so compilation and cuBLAS heuristics stay
out), then CUDA events around every step and one synchronize; the tokens and FLOPs of the batches
are counted on the CPU before the timed steps. The engine's step is timed by its own `report`
callback (after its per-step host sync) over windows of steps, and stopped from there before
its first checkpoint. A deadline guard skips whatever its prediction says would not finish inside
`--budget-s` (counted from the first import) and says why; each measurement also runs under a
hard time limit. The JSON is rewritten (atomically) after every measurement, so a run cut short
keeps what it measured; a summary table is printed last.

    python benchmarks/gpu_readiness.py --budget-s 470 --out DIR          # on the GPU
    python benchmarks/gpu_readiness.py --cpu-smoke --out DIR              # every part at toy size
"""

from __future__ import annotations

import time

T_START = time.monotonic()  # the budget counts from here: the imports take seconds of it

import argparse  # noqa: E402
import contextlib
import gc
import gzip
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the GPU machine has the repository, not an install of it

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402

from clmscale.engine.ladder import LADDER  # noqa: E402
from clmscale.engine.models import (  # noqa: E402
    ZERO_COST,
    BatchCost,
    batch_cost,
    build_config,
    build_model,
    count_params,
    mfu,
    model_inputs,
    peak_flops,
)
from clmscale.engine.files import write_json_atomic  # noqa: E402

logger = logging.getLogger("gpu_readiness")

UNWANTED = ("ray", "pydantic", "deepspeed", "rdkit")  # not on the GPU image (deepspeed: only if carried)
MOSES = REPO / "data" / "moses_100k.csv.gz"
PAPER = REPO / "sweeps" / "paper.yaml"
FINAL_RESERVE_S = 3.0  # kept back from every measurement for the last JSON and the summary
JSON_NAME = "gpu_readiness.json"


# ---------------------------------------------------------------------------------------------
# what to measure: the GPU plan and the CPU smoke plan differ only in sizes


@dataclass(frozen=True)
class RungPlan:
    family: str
    rung: str
    micro_batch_size: int
    max_seq_len: int
    lr: float

    @property
    def key(self) -> str:
        return f"{self.family}-{self.rung}"


@dataclass(frozen=True)
class Plan:
    rungs: list[RungPlan]
    # (loop, RungPlan key, "padded" | "packed") in priority order; loop is "plain" or "engine"
    engine: list[tuple[str, str]]  # the engine's step, eager
    compiled: list[tuple[str, str, str]]  # with torch.compile, after the packing and HVP parts
    compile_backend: str
    n_warmup: int  # steps, after one of each distinct batch shape
    min_steps: int
    max_steps: int
    timed_s: float  # aim for this much timed work per variant
    engine_window: int  # steps per engine log record
    n_batches: int  # distinct batches per variant (cycled when more steps run)
    n_smiles: int
    gemm_n: int
    gemm_reps: int
    copy_bytes: int
    copy_reps: int
    packing_rung: str
    packing_ks: list[int]
    packing_s: float  # timed seconds per packing run
    hvp_rungs: list[str]
    hvp_batches: int
    hvp_matvecs: int  # timed matvecs per variant
    hvp_lanczos_iter: int
    hvp_largest: str


# The micro-batches sweeps/paper.yaml fixed before `micro_batch_size: auto` (git d927feb): 128, and 64 / 32
# for the two rungs that ran over 4 and 8 workers; an out-of-memory is recorded as that measurement's error.
AUTO_MICRO_BATCH = {"*": 128, "5xl": 64, "6xl": 32}


def paper_rungs(path: Path, picks: list[tuple[str, str]]) -> list[RungPlan]:
    """Micro-batch, sequence length and learning rate of each (family, rung) from a sweep file, read as
    plain YAML (engine.config needs pydantic); the clm rungs borrow the mlm file's settings."""
    cfg = yaml.safe_load(path.read_text())
    model, train = cfg["model"], cfg["train"]
    out = []
    for family, rung in picks:
        if rung not in model["sizes"]:
            raise ValueError(f"{path}: rung {rung!r} is not in model.sizes {model['sizes']}")
        over = (model.get("overrides") or {}).get(rung) or {}
        micro = over.get("micro_batch_size", train["micro_batch_size"])
        if micro == "auto":  # engine.plan chooses it, but needs pydantic, which the GPU image lacks
            micro = AUTO_MICRO_BATCH.get(rung, AUTO_MICRO_BATCH["*"])
        out.append(RungPlan(family, rung, int(micro),
                            int(model["max_seq_len"]), float(over.get("lr", train["lr"]))))  # fmt: skip
    return out


def gpu_plan() -> Plan:
    rungs = paper_rungs(PAPER, [("mlm", "m"), ("mlm", "xl"), ("mlm", "3xl"), ("mlm", "6xl"), ("clm", "3xl")])
    return Plan(
        rungs=rungs,
        # the 6xl's engine run costs ~45 s (its model is built on the CPU): padded only, after the others
        engine=[(k, b) for b in ("padded", "packed") for k in ("mlm-m", "mlm-xl", "mlm-3xl", "clm-3xl")]
        + [("mlm-6xl", "padded")],
        # fixed-shape packed batches compile once; padded ones twice (static, then dynamic length)
        compiled=[("plain", "mlm-3xl", "packed"), ("engine", "mlm-3xl", "packed"), ("plain", "mlm-m", "packed"),
                  ("plain", "mlm-6xl", "packed"), ("plain", "clm-3xl", "packed"), ("plain", "mlm-3xl", "padded"),
                  ("plain", "mlm-xl", "packed")],  # fmt: skip
        compile_backend="inductor",
        n_warmup=5, min_steps=10, max_steps=60, timed_s=2.5, engine_window=5, n_batches=40, n_smiles=30_000,
        gemm_n=8192, gemm_reps=20, copy_bytes=1 << 30, copy_reps=5,
        packing_rung="mlm-m", packing_ks=[1, 4], packing_s=12.0,
        hvp_rungs=["mlm-xl", "mlm-3xl"], hvp_batches=2, hvp_matvecs=3, hvp_lanczos_iter=20, hvp_largest="mlm-6xl",
    )  # fmt: skip


def smoke_plan() -> Plan:
    """Toy sizes on the CPU: every code path that can run there runs, in well under a minute."""
    base = paper_rungs(PAPER, [("mlm", "m")])[0]
    rungs = [replace(base, family=f, rung=r, micro_batch_size=8, max_seq_len=32)
             for f, r in [("mlm", "xxs"), ("mlm", "xs"), ("clm", "xxs")]]  # fmt: skip
    return Plan(
        rungs=rungs,
        engine=[("mlm-xxs", "padded"), ("mlm-xxs", "packed")],
        compiled=[("plain", "mlm-xxs", "packed"), ("engine", "mlm-xxs", "packed")],
        compile_backend="aot_eager",  # dynamo + AOTAutograd without inductor's C++ build: seconds, not minutes
        n_warmup=1, min_steps=3, max_steps=3, timed_s=0.1, engine_window=2, n_batches=4, n_smiles=400,
        gemm_n=256, gemm_reps=3, copy_bytes=1 << 20, copy_reps=2,
        packing_rung="mlm-xxs", packing_ks=[1, 2], packing_s=1.0,
        hvp_rungs=["mlm-xxs", "mlm-xs"], hvp_batches=1, hvp_matvecs=2, hvp_lanczos_iter=4, hvp_largest="mlm-xs",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the deadline guard and the record


class Skip(Exception):
    """A measurement that cannot run here (no CUDA, no deepspeed): recorded with its reason."""


class Overran(Exception):
    """Raised by the alarm when a measurement passes its hard time limit."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise `Overran` in the main thread once `seconds` have passed (SIGALRM; the code in between is
    Python driving CUDA, so the alarm lands within a kernel launch or a synchronize)."""

    def alarm(signum, frame):
        raise Overran(f"{what}: stopped at its time limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _known(value: float) -> float | None:
    """None for an unknown (NaN: no datasheet peak for this device): JSON has no NaN, and the record in
    memory is then the record on disk."""
    return value if math.isfinite(value) else None


class Record:
    """The JSON of the run, rewritten atomically after every measurement, and the deadline guard.

    Every measurement is a leaf dict with `status`: "ok" (its numbers), "skipped" (never started:
    the deadline guard or a missing precondition), "stopped" (its hard time limit) or "error";
    all but "ok" carry a `reason`.
    """

    def __init__(self, path: Path, budget_s: float, meta: dict, *, start: float = T_START, min_limit_s: float = 30.0):
        self.path, self.budget_s, self.start = path, budget_s, start
        self.end = start + budget_s
        self.min_limit_s = min_limit_s  # a measurement's hard limit is at least its prediction plus this
        self.data: dict[str, Any] = {"meta": meta, "setup": {}, "train": {}, "packing": {}, "hvp": {}, "skipped": []}
        self.write()

    def left_s(self) -> float:
        return self.end - time.monotonic() - FINAL_RESERVE_S

    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    def put(self, where: tuple[str, ...], value: Any) -> None:
        node = self.data
        for key in where[:-1]:
            node = node.setdefault(key, {})
        node[where[-1]] = value
        self.write()

    def write(self) -> None:
        self.data["meta"]["elapsed_s"] = round(self.elapsed_s(), 2)
        write_json_atomic(self.path, self.data)

    def measure(
        self, where: tuple[str, ...], predicted_s: float, fn: Callable[[], dict], *, reserve_s: float = 0.0
    ) -> dict:
        """Run `fn` if its prediction fits the time left (less `reserve_s` kept for later parts), under a
        hard limit of a few times the prediction; record and return its leaf."""
        name = "/".join(where)
        left = self.left_s() - reserve_s
        if predicted_s > left:
            kept = f" after keeping {reserve_s:.0f} s for the parts after it" if reserve_s else ""
            leaf = {"status": "skipped", "reason": f"deadline guard: predicted {predicted_s:.0f} s, "
                    f"{max(left, 0):.0f} s left of the {self.budget_s:.0f} s budget{kept}"}  # fmt: skip
        else:
            limit = min(self.left_s(), max(3 * predicted_s, predicted_s + self.min_limit_s))
            t0 = time.perf_counter()
            try:
                with time_limit(limit, name):
                    leaf = {"status": "ok", **fn()}
            except Skip as e:
                leaf = {"status": "skipped", "reason": str(e)}
            except Overran as e:
                leaf = {"status": "stopped", "reason": f"{e} (predicted {predicted_s:.0f} s)"}
            except torch.cuda.OutOfMemoryError as e:
                leaf = {"status": "error", "reason": f"out of memory: {str(e).splitlines()[0]}"}
            except Exception as e:  # one broken measurement must not cost the others
                overran = _overran_in(e)
                if overran is not None:  # raised inside a library that wrapped it (torch.compile does)
                    leaf = {"status": "stopped", "reason": f"{overran} (predicted {predicted_s:.0f} s)"}
                else:
                    logger.error("%s failed:\n%s", name, traceback.format_exc())
                    leaf = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:800]}
            leaf["wall_s"] = round(time.perf_counter() - t0, 3)
            leaf["predicted_s"] = round(predicted_s, 1)
            _release()
        if leaf["status"] != "ok":
            self.data["skipped"].append({"what": name, "status": leaf["status"], "reason": leaf["reason"]})
        self.put(where, leaf)
        logger.info("[%5.0f s] %s: %s", self.elapsed_s(), name, _one_line(leaf))
        return leaf


def _overran_in(error: BaseException) -> Overran | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Overran):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _one_line(leaf: dict) -> str:
    if leaf["status"] != "ok":
        return f"{leaf['status']}: {leaf['reason']}"
    keys = ("tflops_per_s", "gb_per_s", "ms_per_step", "tokens_per_s_real", "mfu_real_datasheet",
            "aggregate_tokens_per_s_real", "matvecs_per_s", "lambda_max", "rel_diff", "speedup")  # fmt: skip
    return ", ".join(f"{k} {leaf[k]:.4g}" for k in keys if isinstance(leaf.get(k), float | int)) or "ok"


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    """The caching allocator's peak since the last reset; None on the CPU, which has no such counter."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _needs_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise Skip(f"{what} needs CUDA; this run is on the CPU")


# ---------------------------------------------------------------------------------------------
# timing


def _events_ms(step: Callable[[Any], Any], items: list, device: torch.device) -> list[float]:
    """Milliseconds of each `step(item)`, back to back: CUDA events between steps and one synchronize
    at the end on a GPU; on the CPU, where ops run synchronously, the host clock."""
    if device.type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(items) + 1)]
        marks[0].record()
        for item, mark in zip(items, marks[1:]):
            step(item)
            mark.record()
        torch.cuda.synchronize(device)
        return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
    stamps = [time.perf_counter()]
    for item in items:
        step(item)
        stamps.append(time.perf_counter())
    return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]


def _stats_ms(times_ms: list[float]) -> dict:
    return {"ms_per_step": float(np.mean(times_ms)), "p50_ms": float(np.percentile(times_ms, 50)),
            "p95_ms": float(np.percentile(times_ms, 95)), "n_steps": len(times_ms)}  # fmt: skip


def _throughput(times_ms: list[float], cost: BatchCost, peak_datasheet: float, peak_measured: float) -> dict:
    """ms/step, tokens/s and MFU (padded and real FLOPs; datasheet peak and measured ceiling) of timed steps."""
    seconds = sum(times_ms) / 1e3
    return {
        **_stats_ms(times_ms),
        "tokens_per_s_padded": cost.n_tokens_padded / seconds,
        "tokens_per_s_real": cost.n_tokens_real / seconds,
        "real_token_fraction": cost.n_tokens_real / cost.n_tokens_padded,
        "tflops_per_s_padded": cost.flops_padded / seconds / 1e12,
        "tflops_per_s_real": cost.flops_real / seconds / 1e12,
        "mfu_padded_datasheet": _known(mfu(cost.flops_padded, seconds, peak_datasheet)),
        "mfu_real_datasheet": _known(mfu(cost.flops_real, seconds, peak_datasheet)),
        "mfu_padded_ceiling": _known(mfu(cost.flops_padded, seconds, peak_measured)),
        "mfu_real_ceiling": _known(mfu(cost.flops_real, seconds, peak_measured)),
    }


def _cost_of(batches: list[dict], config, indices) -> BatchCost:
    costs = [batch_cost(b, config) for b in batches]
    return sum((costs[i % len(costs)] for i in indices), start=ZERO_COST)


# ---------------------------------------------------------------------------------------------
# setup: versions, device, ceilings


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)  # without importing it
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        **{name: _version(name) for name in ("triton", "deepspeed", "pydantic", "pyarrow", "scipy", "tokenizers")},
    }


def device_facts(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"type": "cpu", "name": platform.processor() or platform.machine(), "n_cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads()}  # fmt: skip
    props = torch.cuda.get_device_properties(device)
    facts = {
        "type": "cuda",
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "n_sms": props.multi_processor_count,
        "memory_gib": props.total_memory / 2**30,
        "peak_bf16_tflops_datasheet": _known(peak_flops(device, bf16=True) / 1e12),
        "peak_fp32_tflops_datasheet": _known(peak_flops(device, bf16=False) / 1e12),
    }
    if shutil.which("nvidia-smi"):  # read-only queries; nothing about the card is changed
        query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)  # fmt: skip
            facts["nvidia_smi"] = dict(zip(query.split(","), (v.strip() for v in out.stdout.split(","))))
        except (OSError, subprocess.SubprocessError) as e:
            facts["nvidia_smi"] = f"not read: {e}"
    return facts


def gemm_rate(n: int, dtype: torch.dtype, tf32: bool, reps: int, device: torch.device) -> dict:
    """TFLOP/s of an n x n x n matmul on random data, two input sets alternating, median of `reps`."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        g = torch.Generator(device).manual_seed(0)
        sets = [(torch.randn(n, n, generator=g, device=device).to(dtype),
                 torch.randn(n, n, generator=g, device=device).to(dtype)) for _ in range(2)]  # fmt: skip
        out = torch.empty(n, n, device=device, dtype=dtype)
        for a, b in sets * 2:  # warm-up: cuBLAS picks its kernel
            torch.matmul(a, b, out=out)
        times_ms = _events_ms(lambda ab: torch.matmul(*ab, out=out), [sets[i % 2] for i in range(reps)], device)
        assert torch.isfinite(out).all(), "GEMM output is not finite"
    finally:
        torch.set_float32_matmul_precision(previous)
    median_s = float(np.median(times_ms)) / 1e3
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tf32": tf32, "median_ms": median_s * 1e3,
            "tflops_per_s": 2 * n**3 / median_s / 1e12, "reps": reps}  # fmt: skip


def copy_rate(n_bytes: int, kind: str, reps: int, device: torch.device) -> dict:
    """GB/s of one copy of `n_bytes`: host->device or device->host from pinned or pageable memory, or
    device->device (counted as bytes read plus bytes written, as METHOD.md says)."""
    _needs_cuda(device, "copy bandwidth")
    on_device = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, device=device)  # random, not zeros
    if kind == "d2d":
        src, dst, moved = on_device, torch.empty_like(on_device), 2 * n_bytes
    else:
        host = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=kind.endswith("pinned"))
        host.copy_(on_device)
        src, dst = (host, on_device) if kind.startswith("h2d") else (on_device, host)
        moved = n_bytes
    dst.copy_(src, non_blocking=True)  # warm-up
    times_ms = _events_ms(lambda _: dst.copy_(src, non_blocking=True), list(range(reps)), device)
    median_s = float(np.median(times_ms)) / 1e3
    return {"n_bytes": n_bytes, "median_ms": median_s * 1e3, "gb_per_s": moved / median_s / 1e9, "reps": reps}


def setup_part(rec: Record, plan: Plan, device: torch.device) -> dict[str, float]:
    """Versions, device, ceilings. Returns the measured ceilings by precision, for MFU against them."""
    rec.put(("setup", "versions"), versions())
    rec.put(("setup", "device"), device_facts(device))
    ceilings = {}
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True), ("fp32", torch.float32, False)):
        leaf = rec.measure(("setup", f"gemm_{name}"), 2.0 + plan.gemm_reps * 0.05,
                           lambda: gemm_rate(plan.gemm_n, dtype, tf32, plan.gemm_reps, device))  # fmt: skip
        ceilings[name] = leaf["tflops_per_s"] * 1e12 if leaf["status"] == "ok" else math.nan
    for kind in ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable", "d2d"):
        rec.measure(("setup", f"copy_{kind}"), 3.0, lambda: copy_rate(plan.copy_bytes, kind, plan.copy_reps, device))
    return ceilings


# ---------------------------------------------------------------------------------------------
# batches: MOSES molecules through engine.data, as the standalone loop gets them


def first_smiles(n: int) -> list[str]:
    with gzip.open(MOSES, "rt") as f:
        next(f)  # header: SMILES
        return [line.split(",")[0].strip() for line in itertools.islice(f, n)]


class Batches:
    """Micro-batches of real SMILES per (family, micro-batch, length, packing), via engine.data.local_batches
    from a shard of the first MOSES molecules and a tokenizer built on them (engine.tokenizer)."""

    def __init__(self, work: Path, n_smiles: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from clmscale.engine.tokenizer import build_tokenizer

        smiles = first_smiles(n_smiles)
        self.shard = work / "train-00000.parquet"
        pq.write_table(pa.table({"smiles": smiles}), self.shard)
        self.tokenizer = build_tokenizer(smiles)
        self.vocab_size = len(self.tokenizer)
        self.n_smiles = len(smiles)
        self._cache: dict[tuple, list[dict]] = {}

    def get(self, rp: RungPlan, packing: bool, n_batches: int) -> list[dict]:
        key = (rp.family, rp.micro_batch_size, rp.max_seq_len, packing, n_batches)
        if key not in self._cache:
            from clmscale.engine.data import local_batches

            stream = local_batches([self.shard], self.tokenizer, rp.family, rp.micro_batch_size, rp.max_seq_len,
                                   seed=0, epoch=0, packing=packing)  # fmt: skip
            full = (b for b in stream if b["input_ids"].shape[0] == rp.micro_batch_size)  # no short last batch
            batches = list(itertools.islice(full, n_batches))
            if not batches:
                raise ValueError(f"{self.n_smiles} molecules give no full batch of {rp.micro_batch_size}")
            self._cache[key] = batches
        return self._cache[key]


def _warmup_then_timed(batches: list[dict], n_warmup: int, n_timed: int) -> tuple[list[int], list[int]]:
    """Batch indices: one of every distinct shape first (compiles and kernel choices happen there), then
    `n_warmup` more, then the timed ones, cycling through the list."""
    first_of_shape = {}
    for i, b in enumerate(batches):
        first_of_shape.setdefault(tuple(b["input_ids"].shape), i)
    warm = list(first_of_shape.values()) + list(range(n_warmup))
    return warm, [i % len(batches) for i in range(n_warmup, n_warmup + n_timed)]


# ---------------------------------------------------------------------------------------------
# train: the plain HF loop and the engine's step


def pinned(batches: list[dict], device: torch.device) -> list[dict]:
    """Batches in page-locked host memory on a GPU machine (as a DataLoader with pin_memory=True gives
    them), so the step's non_blocking copy does not wait for the stream; unchanged on the CPU."""
    if device.type != "cuda":
        return batches
    return [{k: v.pin_memory() for k, v in b.items()} for b in batches]


def plain_step(config, device: torch.device, bf16: bool, lr: float, compile_backend: str | None):
    """A plain loop's step: forward under bf16 autocast, backward, clip, fused AdamW; the batch is
    copied to the device inside the step (non_blocking: pass `pinned` batches)."""
    with torch.device(device):
        model = build_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda")
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model

    def step(batch: dict) -> None:
        # copied first, then shaped: model_inputs makes new tensors (shifted positions), which on the host
        # would be pageable and make the copy wait for the stream
        inputs = model_inputs({k: v.to(device, non_blocking=True) for k, v in batch.items()}, config)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = forward(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def plain_variant(
    rp: RungPlan, config, batches: list[dict], plan: Plan, device: torch.device, bf16: bool,
    peaks: tuple[float, float], compile_backend: str | None,
) -> dict:  # fmt: skip
    t0 = time.perf_counter()
    batches = pinned(batches, device)
    step = plain_step(config, device, bf16, rp.lr, compile_backend)
    warm, _ = _warmup_then_timed(batches, plan.n_warmup, 0)
    first = _events_ms(step, [batches[warm[0]]], device)[0]  # the compile, when there is one
    for i in warm[1:]:
        step(batches[i])
    _sync(device)
    setup_s = time.perf_counter() - t0
    probe = _events_ms(step, batches[:2], device)  # how long a step takes, to size the timed run
    n_timed = int(np.clip(plan.timed_s / (np.mean(probe) / 1e3), plan.min_steps, plan.max_steps))
    _, timed = _warmup_then_timed(batches, plan.n_warmup, n_timed)
    cost = _cost_of(batches, config, timed)  # counted before the timed steps
    times_ms = _events_ms(step, [batches[i] for i in timed], device)
    out = {**_throughput(times_ms, cost, *peaks), "first_step_ms": first, "setup_s": setup_s,
           "peak_mem_gib": _peak_gib(device), "n_warmup": len(warm) + len(probe),
           "compile_backend": compile_backend, "precision": "bf16 autocast" if bf16 else "fp32",
           "batches_in": "pinned host memory" if device.type == "cuda" else "host memory",
           "timer": "cuda events" if device.type == "cuda" else "perf_counter"}  # fmt: skip
    if compile_backend:
        import torch._dynamo

        del step
        torch._dynamo.reset()  # drop the compiled graphs and their memory before the next variant
    return out


class _Enough(Exception):
    """Raised from the engine's report callback once enough windows are timed: no checkpoint is written."""


def engine_variant(
    rp: RungPlan, config, batches: list[dict], plan: Plan, device: torch.device, bf16: bool,
    peaks: tuple[float, float], compile: bool, n_timed: int,
) -> dict:  # fmt: skip
    """engine.train.train (DeepSpeed ZeRO-0, one process) on the same batches, timed by its report callback."""
    missing = [m for m in ("deepspeed", "pydantic") if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"{' and '.join(missing)} not importable here: carry .whl (../shared/tools/device-wheels.sh)")
    from clmscale.engine.config import TrainConfig
    from clmscale.engine.train import smoke_trial, train

    if compile and "compile" not in TrainConfig.model_fields:
        raise Skip("engine.config.TrainConfig has no `compile` setting yet (issue 16 item 3)")
    window = plan.engine_window
    n_warm_windows = max(1, math.ceil(plan.n_warmup / window)) + 1  # the first holds DeepSpeed's first steps
    n_windows = n_warm_windows + max(2, math.ceil(n_timed / window))
    stamps: list[float] = []
    t0 = time.perf_counter()

    def report(record: dict) -> None:
        if "step" in record and not record.get("done"):
            _sync(device)  # the engine has just read its step statistics: a sync already happened
            stamps.append(time.perf_counter())
            if len(stamps) > n_windows:
                raise _Enough

    trial = smoke_trial(
        rp.family, rp.rung, budget_tokens=10**15,  # never reached: no milestone, no checkpoint
        batch_size=rp.micro_batch_size, micro_batch_size=rp.micro_batch_size, zero_stage=0,
        precision="bf16" if bf16 else "fp32", checkpoints=1, log_every_steps=window, warmup_fraction=0.0,
        lr=rp.lr, **({"compile": True} if compile else {}),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        try:
            train(trial, Path(tmp), lambda epoch: batches, batches[:1], config, device=device, report=report)
        except _Enough:
            pass
    if len(stamps) <= n_windows:
        raise RuntimeError(f"the engine stopped after {len(stamps)} log records, {n_windows + 1} were needed")
    first_timed = n_warm_windows * window  # steps before the first timed window
    window_ms = [(b - a) * 1e3 / window for a, b in zip(stamps[n_warm_windows - 1 :], stamps[n_warm_windows:])]
    timed = range(first_timed, first_timed + window * len(window_ms))
    cost = _cost_of(batches, config, timed)
    out = _throughput([ms for ms in window_ms for _ in range(window)], cost, *peaks)
    out.update(n_steps=len(timed), n_warmup=first_timed, steps_per_window=window,
               setup_and_first_window_s=stamps[0] - t0, peak_mem_gib=_peak_gib(device),
               precision="DeepSpeed bf16" if bf16 else "fp32",
               timer=f"host clock at the engine's report, after a synchronize, per {window}-step window")  # fmt: skip
    return out


def _predict_train_s(rp: RungPlan, n_params: int, step_s: float, plan: Plan, device: torch.device,
                     loop: str, compile: bool) -> float:  # fmt: skip
    """Seconds a variant should take: setup (model build; the engine's CPU build and DeepSpeed), warm-up
    and timed steps, and a compile. Rough on purpose: the hard limit catches what it misses."""
    steps = plan.n_warmup + 6 + min(plan.max_steps, max(plan.min_steps, plan.timed_s / step_s))
    gpu = device.type == "cuda"
    setup = (2.0 + n_params * 4e-9) if gpu else 0.5
    if loop == "engine":
        setup = (4.0 + n_params * 3e-8) if gpu else 2.0
    if compile:
        setup += (25.0 + 3.0 * LADDER[rp.rung].n_layer) if gpu else (5.0 + 1.0 * LADDER[rp.rung].n_layer)
    return setup + steps * step_s * (1.5 if loop == "engine" else 1.0)


@dataclass
class TrainState:
    """What the training part learns as it goes: configs, batches, measured step times."""

    configs: dict[str, Any] = field(default_factory=dict)
    step_s: dict[str, float] = field(default_factory=dict)  # per rung key, from its first measured variant
    n_timed: dict[str, int] = field(default_factory=dict)


def train_prepare(rec: Record, plan: Plan, data: Batches, state: TrainState, peaks: dict, device: torch.device) -> None:
    for rp in plan.rungs:
        config = build_config(rp.family, LADDER[rp.rung], data.vocab_size, rp.max_seq_len)
        state.configs[rp.key] = config
        n = count_params(config)
        info = {"family": rp.family, "rung": rp.rung, "n_params": n.total, "n_params_non_embedding": n.non_embedding,
                "micro_batch_size": rp.micro_batch_size, "max_seq_len": rp.max_seq_len, "lr": rp.lr, "batches": {}}  # fmt: skip
        for batching in ("padded", "packed"):
            batches = data.get(rp, batching == "packed", plan.n_batches)
            cost = _cost_of(batches, config, range(len(batches)))
            info["batches"][batching] = {
                "n_distinct": len(batches),
                "shapes": sorted({tuple(b["input_ids"].shape) for b in batches}),
                "real_token_fraction": cost.n_tokens_real / cost.n_tokens_padded,
                "mean_real_tokens_per_batch": cost.n_tokens_real / len(batches),
            }
        rate = 0.3 * (peaks["bf16"] if device.type == "cuda" else peaks["fp32"])
        step_flops = _cost_of(data.get(rp, False, plan.n_batches), config, [0]).flops_padded
        state.step_s[rp.key] = step_flops / (rate if rate > 0 else 1e11) + (3e-3 + 3e-4 * LADDER[rp.rung].n_layer)
        rec.put(("train", rp.key), {**info, "variants": {}})


def train_variant(
    rec: Record, plan: Plan, data: Batches, state: TrainState, loop: str, key: str, batching: str,
    compile: bool, peaks: dict, device: torch.device, reserve_s: float = 0.0,
) -> dict:  # fmt: skip
    """One (loop, batching, compile) of one rung; loop is "plain" or "engine"."""
    rp = next(r for r in plan.rungs if r.key == key)
    bf16 = device.type == "cuda"
    config = state.configs[rp.key]
    peak_pair = (peak_flops(device, bf16), peaks["bf16" if bf16 else "fp32"])
    batches = data.get(rp, batching == "packed", plan.n_batches)
    n_params = count_params(config).total
    predicted = _predict_train_s(rp, n_params, state.step_s[rp.key], plan, device, loop, compile)
    n_timed = state.n_timed.get(rp.key, plan.min_steps)
    if loop == "engine":
        fn = lambda: engine_variant(rp, config, batches, plan, device, bf16, peak_pair, compile, n_timed)  # noqa: E731
    else:
        backend = plan.compile_backend if compile else None
        fn = lambda: plain_variant(rp, config, batches, plan, device, bf16, peak_pair, backend)  # noqa: E731
    name = f"{loop}/{batching}/{'compile' if compile else 'eager'}"
    leaf = rec.measure(("train", rp.key, "variants", name), predicted, fn, reserve_s=reserve_s)
    if leaf["status"] == "ok" and name == "plain/padded/eager":
        state.step_s[rp.key] = leaf["ms_per_step"] / 1e3
        state.n_timed[rp.key] = leaf["n_steps"]
    return leaf


# ---------------------------------------------------------------------------------------------
# packing: k processes of the smallest rung on one GPU


def packing_worker(spec: dict) -> None:
    """One of the k processes (this script with --packing-worker): warm up, say ready, wait for go, run
    plain steps for `seconds`, write tokens, elapsed time and step-time percentiles."""
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(spec["memory_fraction"], device)
    else:
        torch.set_num_threads(spec["cpu_threads"])
    batches = pinned(torch.load(spec["batches"], weights_only=True), device)
    config = build_config(spec["family"], LADDER[spec["rung"]], spec["vocab_size"], spec["max_seq_len"])
    step = plain_step(config, device, device.type == "cuda", spec["lr"], None)
    for b in batches[: spec["n_warmup"]]:
        step(b)
    _sync(device)
    Path(spec["ready"]).touch()
    deadline = time.monotonic() + spec["wait_s"]
    while not Path(spec["go"]).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no go signal within {spec['wait_s']} s")
        time.sleep(0.005)
    t0 = time.perf_counter()
    times_ms: list[float] = []
    n_steps = 0
    cost = ZERO_COST
    while time.perf_counter() - t0 < spec["seconds"]:
        chunk = [batches[(n_steps + i) % len(batches)] for i in range(5)]
        cost = sum((batch_cost(b, config) for b in chunk), start=cost)  # counted before the steps run
        times_ms += _events_ms(step, chunk, device)  # one synchronize per 5 steps
        n_steps += len(chunk)
    elapsed = time.perf_counter() - t0
    result = {"n_steps": n_steps, "elapsed_s": elapsed, "n_tokens_padded": cost.n_tokens_padded,
              "n_tokens_real": cost.n_tokens_real, "peak_mem_gib": _peak_gib(device), **_stats_ms(times_ms)}  # fmt: skip
    Path(spec["result"]).write_text(json.dumps(result))


def run_packed(k: int, base: dict, work: Path, wait_s: float) -> dict:
    """Start k workers together on one device and aggregate their tokens over the common window."""
    run = work / f"k{k}"
    run.mkdir(exist_ok=True)
    go = run / "go"
    specs, procs, logs = [], [], []
    try:
        for i in range(k):
            spec = {**base, "ready": str(run / f"ready{i}"), "go": str(go), "result": str(run / f"result{i}.json"),
                    "memory_fraction": 0.95 / k, "cpu_threads": 1, "wait_s": wait_s}  # fmt: skip
            log = open(run / f"worker{i}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--packing-worker",
                                           json.dumps(spec)], stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
            specs.append(spec)
        t_ready = time.monotonic()
        while not all(Path(s["ready"]).exists() for s in specs):
            dead = [i for i, p in enumerate(procs) if p.poll() is not None]
            if dead:
                tail = (run / f"worker{dead[0]}.log").read_text()[-1500:]
                raise RuntimeError(f"packing worker {dead[0]} of {k} exited with {procs[dead[0]].returncode}: {tail}")
            if time.monotonic() - t_ready > wait_s:
                raise TimeoutError(f"{k} packing workers not ready within {wait_s:.0f} s")
            time.sleep(0.05)
        startup_s = time.monotonic() - t_ready
        go.touch()
        for i, p in enumerate(procs):
            if p.wait(timeout=base["seconds"] + wait_s) != 0:
                tail = (run / f"worker{i}.log").read_text()[-1500:]
                raise RuntimeError(f"packing worker {i} of {k} exited with {p.returncode}: {tail}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    workers = [json.loads(Path(s["result"]).read_text()) for s in specs]
    window_s = max(w["elapsed_s"] for w in workers)
    return {
        "k": k,
        "memory_fraction_each": 0.95 / k,
        "startup_s": startup_s,
        "window_s": window_s,
        "aggregate_tokens_per_s_real": sum(w["n_tokens_real"] for w in workers) / window_s,
        "aggregate_tokens_per_s_padded": sum(w["n_tokens_padded"] for w in workers) / window_s,
        "workers": workers,
    }


def packing_part(rec: Record, plan: Plan, data: Batches, work: Path, device: torch.device, import_s: float,
                 reserve_s: float) -> None:  # fmt: skip
    rp = next(r for r in plan.rungs if r.key == plan.packing_rung)
    batches = data.get(rp, False, plan.n_batches)
    path = work / "packing_batches.pt"
    torch.save(batches, path)
    base = {"device": str(device), "batches": str(path), "family": rp.family, "rung": rp.rung, "lr": rp.lr,
            "vocab_size": data.vocab_size, "max_seq_len": rp.max_seq_len, "n_warmup": plan.n_warmup + 2,
            "seconds": plan.packing_s}  # fmt: skip
    rec.put(("packing", "rung"), rp.key)
    wait_s = 90.0 if device.type == "cuda" else 60.0
    if device.type != "cuda":
        rec.put(("packing", "note"), "CPU: processes share the cores and set_per_process_memory_fraction is "
                "CUDA-only (not applied); the code path runs, the ratio says nothing about a GPU")  # fmt: skip
    # a worker pays this script's imports again, then its batches, model and warm-up; k of them share
    # the host's cores while they start
    startup_s = 2 * import_s + (5.0 if device.type == "cuda" else 2.0)

    def predicted(k: int) -> float:
        return startup_s * max(1.3, 2 * k / (os.cpu_count() or 1)) + plan.packing_s + 5

    done = {}
    for i, k in enumerate(plan.packing_ks):
        later = sum(predicted(j) for j in plan.packing_ks[i + 1 :])
        done[k] = rec.measure(("packing", f"k{k}"), predicted(k), lambda: run_packed(k, base, work, wait_s),
                              reserve_s=reserve_s + later)  # fmt: skip
        if done[k]["status"] == "ok":
            startup_s = done[k]["startup_s"] / max(1.3, 2 * k / (os.cpu_count() or 1))
    k1, kn = done[plan.packing_ks[0]], done[plan.packing_ks[-1]]

    def speedup() -> dict:
        if k1["status"] != "ok" or kn["status"] != "ok":
            raise Skip("needs both packing runs")
        return {"speedup": kn["aggregate_tokens_per_s_real"] / k1["aggregate_tokens_per_s_real"],
                "k": kn["k"], "target": 2.5 if kn["k"] == 4 else None}  # fmt: skip

    rec.measure(("packing", "speedup"), 0.0, speedup)


# ---------------------------------------------------------------------------------------------
# HVP: engine.hessian's operator in fp32 and TF32


def hvp_variant(rp: RungPlan, config, batches: list[dict], tf32: bool, n_matvecs: int, lanczos_iter: int,
                device: torch.device) -> dict:  # fmt: skip
    """Matvecs/s of HVPOperator over `batches` (fp32 weights, eager attention), then λmax by Lanczos
    (k = 1, seed 0, so fp32 and TF32 start from the same vector); lanczos_iter = 0: the matvecs only."""
    from clmscale.engine.hessian import HVPOperator, double_backward_safe, lanczos

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        with torch.device(device):
            model = build_model(config).eval()
        on_device = [{k: v.to(device) for k, v in b.items()} for b in batches]

        def loss_fn(m, batch):
            return m(**model_inputs(batch, config)).loss

        with double_backward_safe(model):
            op = HVPOperator(model, loss_fn, on_device)
            v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1)).to(device)
            first_ms = _events_ms(op.matvec, [v], device)[0]
            times_ms = _events_ms(op.matvec, [v] * n_matvecs, device)
            out = {"dim": op.dim, "n_batches": len(batches), "batch_shape": list(batches[0]["input_ids"].shape),
                   "first_matvec_ms": first_ms, "matvec_ms": float(np.median(times_ms)),
                   "matvecs_per_s": 1e3 / float(np.median(times_ms)), "n_timed": n_matvecs}  # fmt: skip
            if lanczos_iter:
                t0 = time.perf_counter()
                result = lanczos(op, op.dim, k=1, max_iter=lanczos_iter, seed=0, device=device)
                _sync(device)
                out.update(lambda_max=float(result.eigenvalues[0]), lanczos_matvecs=result.n_matvecs,
                           lanczos_converged=result.converged, lanczos_s=time.perf_counter() - t0)  # fmt: skip
        out.update(precision="tf32" if tf32 else "fp32", peak_mem_gib=_peak_gib(device))
        if tf32 and device.type != "cuda":
            out["note"] = "TF32 is a CUDA matmul mode: on the CPU this run is plain fp32 again"
        return out
    finally:
        torch.set_float32_matmul_precision(previous)


def hvp_part(rec: Record, plan: Plan, data: Batches, state: TrainState, device: torch.device, reserve_s: float) -> None:
    gpu = device.type == "cuda"
    for i, key in enumerate(plan.hvp_rungs):
        rp = next(r for r in plan.rungs if r.key == key)
        config = state.configs[rp.key]
        batches = data.get(rp, False, plan.n_batches)[: plan.hvp_batches]
        # a matvec is about four forward+backward passes of these batches, in fp32
        matvec_s = 4 * state.step_s[rp.key] * len(batches) * (8 if gpu else 1)
        predicted = (3 if gpu else 1) + matvec_s * (1 + plan.hvp_matvecs + plan.hvp_lanczos_iter)
        later = (len(plan.hvp_rungs) - i - 1) * 2 * predicted
        leaves = {}
        for tf32 in (False, True):
            name = "tf32" if tf32 else "fp32"
            leaves[name] = rec.measure(
                ("hvp", rp.key, name), predicted / (3 if tf32 and gpu else 1),
                lambda: hvp_variant(rp, config, batches, tf32, plan.hvp_matvecs, plan.hvp_lanczos_iter, device),
                reserve_s=reserve_s + later,
            )

        def compare() -> dict:
            a, b = leaves["fp32"], leaves["tf32"]
            if a["status"] != "ok" or b["status"] != "ok":
                raise Skip("needs both the fp32 and the TF32 run")
            return {"rel_diff": abs(b["lambda_max"] - a["lambda_max"]) / abs(a["lambda_max"]),
                    "tf32_speedup": b["matvecs_per_s"] / a["matvecs_per_s"]}  # fmt: skip

        rec.measure(("hvp", rp.key, "tf32_vs_fp32"), 0.0, compare)
    largest = next(r for r in plan.rungs if r.key == plan.hvp_largest)
    config = state.configs[largest.key]
    batches = data.get(largest, False, plan.n_batches)[:1]
    predicted = (8 if gpu else 1) + 4 * state.step_s[largest.key] * (8 if gpu else 1) * 2
    rec.measure(("hvp", largest.key, "one_matvec_fp32"), predicted,
                lambda: hvp_variant(largest, config, batches, False, 1, 0, device), reserve_s=reserve_s)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the run


def summary(data: dict) -> str:
    """The table printed last: one line per measurement that produced numbers, then what was skipped."""

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, int | float) else "-"

    lines = [f"gpu_readiness: {data['meta'].get('device_name')}, {data['meta'].get('status')}, "
             f"{data['meta'].get('elapsed_s')} s of {data['meta'].get('budget_s')} s"]  # fmt: skip
    lines.append("setup: " + ", ".join(
        f"{k.removeprefix('gemm_').removeprefix('copy_')} {num(v.get('tflops_per_s', v.get('gb_per_s')), '.1f')}"
        f"{' TF/s' if k.startswith('gemm') else ' GB/s'}"
        for k, v in data["setup"].items() if isinstance(v, dict) and v.get("status") == "ok"))  # fmt: skip
    lines.append(f"{'train':32s} {'ms/step':>9s} {'p95':>8s} {'tok/s pad':>11s} {'tok/s real':>11s} "
                 f"{'MFU pad':>8s} {'MFU real':>8s} {'MFU/ceil':>8s} {'mem GiB':>8s}")  # fmt: skip
    for key, rung in data["train"].items():
        for name, v in rung.get("variants", {}).items():
            if v.get("status") == "ok":
                lines.append(f"{key + ' ' + name:32s} {num(v['ms_per_step'], '9.2f')} {num(v['p95_ms'], '8.2f')} "
                             f"{num(v['tokens_per_s_padded'], '11.3g')} {num(v['tokens_per_s_real'], '11.3g')} "
                             f"{num(v['mfu_padded_datasheet'], '8.3f')} {num(v['mfu_real_datasheet'], '8.3f')} "
                             f"{num(v['mfu_real_ceiling'], '8.3f')} {num(v.get('peak_mem_gib'), '8.2f')}")  # fmt: skip
    for key, v in data["packing"].items():
        if isinstance(v, dict) and v.get("status") == "ok" and "aggregate_tokens_per_s_real" in v:
            p95 = max(w["p95_ms"] for w in v["workers"])
            lines.append(f"packing {key}: {v['aggregate_tokens_per_s_real']:.4g} real tok/s aggregate, "
                         f"worst p95 {p95:.2f} ms")  # fmt: skip
    if data["packing"].get("speedup", {}).get("status") == "ok":
        lines.append(f"packing speedup k={data['packing']['speedup']['k']}: {data['packing']['speedup']['speedup']:.2f}x")
    for key, rung in data["hvp"].items():
        for name, v in rung.items():
            if v.get("status") == "ok":
                extra = (f"rel diff {v['rel_diff']:.2e}, TF32 {v['tf32_speedup']:.2f}x" if "rel_diff" in v else
                         f"{v['matvecs_per_s']:.3g} matvecs/s, λmax {num(v.get('lambda_max'), '.4g')}, "
                         f"mem {num(v.get('peak_mem_gib'), '.2f')} GiB")  # fmt: skip
                lines.append(f"hvp {key} {name}: {extra}")
    for s in data["skipped"]:
        lines.append(f"not measured: {s['what']} ({s['status']}): {s['reason']}")
    return "\n".join(lines)


def _unwanted_imported() -> list[str]:
    return sorted(m for m in UNWANTED if m in sys.modules)


def run(args: argparse.Namespace) -> dict:
    import_s = time.monotonic() - T_START
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        raise SystemExit("no CUDA device here: run with --cpu-smoke for the CPU smoke test")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    plan = gpu_plan() if cuda else smoke_plan()
    if not cuda:
        torch.set_num_threads(1)  # toy models: extra threads only spin on a shared machine (seen 6-50x slower)
    if args.parts:
        unknown = set(args.parts) - {"setup", "train", "packing", "hvp", "compile"}
        if unknown:
            raise SystemExit(f"--parts: unknown {sorted(unknown)}")
    parts = set(args.parts or ["setup", "train", "packing", "hvp", "compile"])
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "argv": sys.argv, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "budget_s": args.budget_s, "cpu_smoke": bool(args.cpu_smoke), "parts": sorted(parts),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu", "status": "running",
        "import_s": import_s, "unwanted_modules_after_imports": _unwanted_imported(),
        "plan": {k: str(v) for k, v in vars(plan).items()},
    }  # fmt: skip
    rec = Record(args.out / JSON_NAME, args.budget_s, meta)
    state = TrainState()
    with tempfile.TemporaryDirectory(prefix="gpu-readiness-") as tmp:
        work = Path(tmp)
        ceilings = {"bf16": math.nan, "tf32": math.nan, "fp32": math.nan}
        if "setup" in parts:
            ceilings = setup_part(rec, plan, device)
        data = Batches(work, plan.n_smiles)
        rec.put(("meta", "corpus"), {"source": str(MOSES.relative_to(REPO)), "n_smiles": data.n_smiles,
                                     "vocab_size": data.vocab_size})  # fmt: skip
        train_prepare(rec, plan, data, state, ceilings, device)
        gpu = device.type == "cuda"
        # kept back while training runs, so the packing and HVP parts still get their turn
        reserve = (55.0 if gpu else 10.0) * ("packing" in parts) + (45.0 if gpu else 5.0) * ("hvp" in parts)
        if "train" in parts:
            for batching in ("padded", "packed"):
                for rp in plan.rungs:
                    train_variant(rec, plan, data, state, "plain", rp.key, batching, False, ceilings, device, reserve)
            for key, batching in plan.engine:
                train_variant(rec, plan, data, state, "engine", key, batching, False, ceilings, device, reserve)
        if "packing" in parts:
            packing_part(rec, plan, data, work, device, import_s, (45.0 if gpu else 5.0) * ("hvp" in parts))
        if "hvp" in parts:
            hvp_part(rec, plan, data, state, device, 0.0)
        if "compile" in parts:
            for loop, key, batching in plan.compiled:
                train_variant(rec, plan, data, state, loop, key, batching, True, ceilings, device)
    n_not = len(rec.data["skipped"])
    rec.data["meta"]["status"] = "complete" + (f", {n_not} measurements not made (see skipped)" if n_not else "")
    rec.data["meta"]["unwanted_modules_at_end"] = _unwanted_imported()
    rec.write()
    return rec.data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=470.0, help="seconds from the first import to the summary")
    parser.add_argument("--out", type=Path, help=f"folder for {JSON_NAME}")
    parser.add_argument("--cpu-smoke", action="store_true", help="every part at toy size on the CPU")
    parser.add_argument("--parts", nargs="+", help="only these: setup train packing hvp compile (a rerun)")
    parser.add_argument("--packing-worker", help=argparse.SUPPRESS)  # internal: one packing process
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.packing_worker:
        packing_worker(json.loads(args.packing_worker))
        return
    if args.out is None:
        parser.error("--out is required")
    data = run(args)
    print(summary(data))
    print(f"wrote {args.out / JSON_NAME}")


if __name__ == "__main__":
    main()
