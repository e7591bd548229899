"""benchmarks/gpu_readiness.py on the CPU: every part runs at toy size, the JSON says for every
measurement what it measured or why not, the deadline guard skips, and the script needs nothing the
GPU image lacks (ray, pydantic, rdkit; deepspeed only for the engine's step)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, pulled_in

SCRIPT = REPO / "benchmarks" / "gpu_readiness.py"
SECTIONS = ("setup", "train", "packing", "hvp")
STATUSES = {"ok", "skipped", "stopped", "error"}
BOOKKEEPING = {"wall_s", "predicted_s", "n_steps", "n_warmup", "n_timed", "reps", "n", "k"}


def _run(out: Path, *args: str, timeout_s: float) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), *args],
        capture_output=True, text=True, timeout=timeout_s, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "gpu_readiness.json").read_text()), proc.stdout


def _leaves(node, path=()):
    """(path, leaf) for every measurement: a dict with a status."""
    if isinstance(node, dict):
        if "status" in node:
            yield path, node
            return
        for key, value in node.items():
            yield from _leaves(value, (*path, key))


def _numbers(leaf: dict) -> list[float]:
    return [v for k, v in leaf.items() if k not in BOOKKEEPING and isinstance(v, int | float)
            and not isinstance(v, bool) and math.isfinite(v)]  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    # ~50 s on an idle 2-core machine; the budget is generous so that a loaded machine does not trip the guard
    return _run(tmp_path_factory.mktemp("smoke"), "--budget-s", "420", timeout_s=480)


def test_every_section_holds_numbers_or_a_reason(smoke):
    data, stdout = smoke
    assert data["meta"]["status"].startswith("complete")
    for section in SECTIONS:
        leaves = list(_leaves(data[section]))
        assert leaves, f"section {section} is empty"
        for path, leaf in leaves:
            where = "/".join((section, *path))
            assert leaf["status"] in STATUSES, where
            if leaf["status"] == "ok":
                assert _numbers(leaf), f"{where} is ok but holds no number: {leaf}"
            else:
                assert isinstance(leaf["reason"], str) and leaf["reason"], where
    errors = [s for s in data["skipped"] if s["status"] == "error"]
    assert not errors, errors
    assert "not measured: setup/copy_d2d" in stdout and "train " in stdout  # the summary table, printed last


def test_every_path_that_runs_on_a_cpu_ran(smoke):
    data, _ = smoke
    setup = data["setup"]
    assert all(setup[f"gemm_{p}"]["tflops_per_s"] > 0 for p in ("bf16", "tf32", "fp32"))
    for kind in ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable", "d2d"):
        assert setup[f"copy_{kind}"]["status"] == "skipped" and "needs CUDA" in setup[f"copy_{kind}"]["reason"]
    assert set(data["train"]) == {"mlm-xxs", "mlm-xs", "clm-xxs"}
    for key, rung in data["train"].items():
        for name in ("plain/padded/eager", "plain/packed/eager"):
            v = rung["variants"][name]
            assert v["status"] == "ok", (key, name, v)
            assert v["ms_per_step"] > 0 and v["p95_ms"] >= v["p50_ms"] > 0
            assert 0 < v["tokens_per_s_real"] <= v["tokens_per_s_padded"]
            assert v["mfu_real_ceiling"] <= v["mfu_padded_ceiling"]  # real-token FLOPs never exceed padded ones
            assert v["mfu_real_datasheet"] is None  # no datasheet peak for a CPU: null, not a made-up number
    xxs = data["train"]["mlm-xxs"]["variants"]
    for name in ("engine/padded/eager", "engine/packed/eager", "plain/packed/compile"):
        assert xxs[name]["status"] == "ok" and xxs[name]["ms_per_step"] > 0, (name, xxs[name])
    engine_compiled = xxs["engine/packed/compile"]  # runs once engine.config.TrainConfig has `compile`
    assert engine_compiled["status"] == "ok" or "`compile` setting" in engine_compiled["reason"], engine_compiled
    packing = data["packing"]
    for k in ("k1", "k2"):
        assert packing[k]["status"] == "ok", packing[k]
        assert packing[k]["aggregate_tokens_per_s_real"] > 0
        assert len(packing[k]["workers"]) == int(k[1:])
    assert packing["speedup"]["speedup"] > 0
    for key in ("mlm-xxs", "mlm-xs"):
        fp32, tf32 = data["hvp"][key]["fp32"], data["hvp"][key]["tf32"]
        assert fp32["status"] == tf32["status"] == "ok"
        assert fp32["matvecs_per_s"] > 0 and math.isfinite(fp32["lambda_max"])
        # TF32 is a CUDA matmul mode: on the CPU both runs do the same arithmetic
        assert data["hvp"][key]["tf32_vs_fp32"]["rel_diff"] < 1e-6
    assert data["hvp"]["mlm-xs"]["one_matvec_fp32"]["matvecs_per_s"] > 0


def test_deadline_guard_skips_everything_when_the_budget_is_tiny(tmp_path):
    data, stdout = _run(tmp_path, "--budget-s", "1", timeout_s=240)
    leaves = [leaf for section in SECTIONS for _, leaf in _leaves(data[section])]
    assert leaves
    for leaf in leaves:
        assert leaf["status"] == "skipped" and leaf["reason"].startswith("deadline guard: predicted"), leaf
        assert "wall_s" not in leaf  # never started
    assert data["meta"]["status"].startswith("complete, ") and "not made" in data["meta"]["status"]
    assert "deadline guard" in stdout


def _module():
    """The script as a module, imported once (its dataclasses need it registered in sys.modules)."""
    name = "gpu_readiness_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def test_record_guard_hard_limit_and_atomic_json(tmp_path):
    gr = _module()
    path = tmp_path / "r.json"
    rec = gr.Record(path, budget_s=10.0 + gr.FINAL_RESERVE_S, meta={}, start=time.monotonic(), min_limit_s=0.5)
    called = []

    def ran() -> dict:
        called.append(1)
        return {"x": 1.5}

    too_long = rec.measure(("setup", "too_long"), 100.0, ran)
    assert too_long["status"] == "skipped" and "predicted 100 s" in too_long["reason"] and not called
    kept = rec.measure(("setup", "kept_for_later"), 1.0, ran, reserve_s=9.5)
    assert kept["status"] == "skipped" and "keeping 10 s" in kept["reason"] and not called
    ok = rec.measure(("setup", "ok"), 0.1, ran)
    assert ok["status"] == "ok" and ok["x"] == 1.5 and called == [1]
    assert json.loads(path.read_text())["setup"]["ok"]["x"] == 1.5  # on disk right after the measurement

    t0 = time.monotonic()
    stopped = rec.measure(("setup", "hangs"), 0.1, lambda: time.sleep(30) or {})
    assert stopped["status"] == "stopped" and "time limit" in stopped["reason"]
    assert time.monotonic() - t0 < 5  # the hard limit is max(3 x 0.1 s, 0.1 s + 0.5 s)

    def cannot() -> dict:
        raise gr.Skip("needs CUDA")

    def broken() -> dict:
        raise ValueError("bad shape")

    assert rec.measure(("setup", "skip"), 0.1, cannot)["reason"] == "needs CUDA"
    error = rec.measure(("setup", "broken"), 0.1, broken)
    assert error["status"] == "error" and "ValueError: bad shape" in error["reason"]
    on_disk = json.loads(path.read_text())
    assert [s["what"] for s in on_disk["skipped"]] == [
        "setup/too_long", "setup/kept_for_later", "setup/hangs", "setup/skip", "setup/broken"]  # fmt: skip
    assert not list(tmp_path.glob(".r.json.*"))  # no temporary file left behind


def test_engine_step_without_deepspeed_is_skipped_with_the_remedy(monkeypatch):
    gr = _module()
    real = importlib.util.find_spec
    monkeypatch.setattr(gr.importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    plan = gr.smoke_plan()
    with pytest.raises(gr.Skip, match=r"deepspeed not importable here: carry \.whl"):
        gr.engine_variant(plan.rungs[0], None, [], plan, gr.torch.device("cpu"), False, (math.nan, math.nan), False, 3)


def test_script_imports_nothing_the_gpu_image_lacks(smoke):
    """The GPU image has torch and transformers, not ray, pydantic or rdkit; deepspeed (and the pydantic
    it needs) only when .whl is carried, for the engine's step alone."""
    lazy = "clmscale.engine.data, clmscale.engine.hessian, clmscale.engine.tokenizer"  # what the parts import when they run
    assert pulled_in(f"benchmarks.gpu_readiness, {lazy}", {"ray", "pydantic", "deepspeed", "rdkit"}) == []
    meta = smoke[0]["meta"]
    assert meta["unwanted_modules_after_imports"] == []
    assert set(meta["unwanted_modules_at_end"]) <= {"pydantic", "deepspeed"}  # the engine's step, here
