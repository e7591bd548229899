"""The planner: ZeRO model states as in the ZeRO paper, the choice of stage / workers / micro-batch,
refusals with the numbers, peaks, device-hours, makespans that can be worked out by hand, the
paper grid. The memory model against measured peaks is tests/test_plan_memory.py."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from clmscale.engine.admission import Bundle, Node, TrialNeed
from clmscale.engine.config import LADDER, ResourcesConfig, expand_grid, load_sweep
from clmscale.engine.plan import (
    GB,
    MEMORY_PARTS,
    PlanError,
    apply_choice,
    choose,
    device_hours,
    format_plan,
    hessian_bytes,
    memory_parts,
    memory_per_device,
    model_shape,
    occupancy,
    peak_flops_per_s,
    plan_sweep,
    simulate,
)
from clmscale.engine.train import smoke_trial

REPO_SWEEPS = __import__("pathlib").Path(__file__).resolve().parents[1] / "sweeps"


def auto(trial, **resources):
    """The trial with zero_stage and micro_batch_size 'auto' (the new defaults) and the given resources."""
    train = trial.train.model_copy(update={"zero_stage": "auto", "micro_batch_size": "auto"})
    res = trial.resources.model_copy(update=resources)
    return trial.model_copy(update={"train": train, "resources": res})


def gpu_trial(size: str, *, batch_size: int = 1024, **resources):
    trial = smoke_trial("mlm", size, budget_tokens=10**9, batch_size=batch_size, micro_batch_size=batch_size)
    return auto(trial, **{"gpus_per_worker": 1.0, "cpus_per_worker": 4, **resources})


def test_model_states_match_the_zero_paper():
    """Rajbhandari et al. 2020, Fig. 1: Ψ = 7.5e9, N_d = 64, K = 12 -> 120, 31.4, 16.6, 1.9 GB."""
    shape = replace(model_shape("mlm", LADDER["xxs"], 64, 16), n_params=int(7.5e9), layer_params=0, persistent_params=0)
    states = {}
    for stage in (0, 1, 2, 3):
        m = memory_per_device(shape, micro_batch_size=1, zero_stage=stage, world_size=64, bf16=True, device="cuda",
                              overhead_bytes=0.0)  # fmt: skip
        states[stage] = m.weights + m.gradients + m.optimizer
    assert states[0] / GB == pytest.approx(120, rel=1e-3)
    assert states[1] / GB == pytest.approx(31.4, rel=2e-3)
    assert states[2] / GB == pytest.approx(16.6, rel=3e-3)  # 16.64: the figure rounds
    # stage 3's own share; the two layers being gathered and the prefetch bucket come on top
    assert (states[3] - 2 * 5e7) / GB == pytest.approx(1.875, rel=1e-3)


def test_fp32_zero0_is_sixteen_bytes_per_parameter_plus_activations():
    shape = model_shape("clm", LADDER["l"], 64, 64)
    m = memory_per_device(shape, micro_batch_size=8, zero_stage=0, world_size=1, bf16=False, device="cuda",
                          overhead_bytes=0.0)  # fmt: skip
    assert m.weights + m.gradients + m.optimizer == 16 * shape.n_params
    assert m.buffers == 0 and m.activations > 0
    more = memory_per_device(shape, micro_batch_size=16, zero_stage=0, world_size=1, bf16=False, device="cuda",
                             overhead_bytes=0.0)  # fmt: skip
    assert more.activations == pytest.approx(2 * m.activations, rel=0.05)  # linear in the micro-batch


def test_auto_is_zero0_with_the_largest_micro_batch_when_one_device_holds_the_trial():
    trial = gpu_trial("3xl")
    c = choose(trial, gpus=8, gpu_memory_gb=80, vocab_size=512, max_seq_len=128)
    assert (c.zero_stage, c.workers) == (0, 1)
    assert c.memory.total <= 80 * GB
    assert 1024 % c.micro_batch_size == 0 and c.micro_batch_size & (c.micro_batch_size - 1) == 0
    if c.micro_batch_size < 1024:  # twice the micro-batch would not fit
        bigger = memory_per_device(model_shape("mlm", LADDER["3xl"], 512, 128), micro_batch_size=2 * c.micro_batch_size,
                                   zero_stage=0, world_size=1, bf16=True, device="cuda",
                                   overhead_bytes=c.memory.overhead, fragmentation=c.memory.fragmentation)  # fmt: skip
        assert bigger.total > 80 * GB
    concrete = apply_choice(trial, c)
    assert concrete.train.zero_stage == 0 and concrete.train.micro_batch_size == c.micro_batch_size


def test_a_trial_too_big_for_one_device_gets_the_smallest_stage_over_the_fewest_devices():
    trial = gpu_trial("6xl")  # ~1.2e9 parameters: 16 bytes each is ~19 GB before activations
    c = choose(trial, gpus=8, gpu_memory_gb=16, vocab_size=512, max_seq_len=128)
    assert c.zero_stage > 0 and c.workers > 1 and c.memory.total <= 16 * GB
    assert "workers raised from 1" in c.note
    for workers in range(1, c.workers):  # fewer devices: no stage fits at any micro-batch
        for stage in (1, 2, 3):
            m = memory_per_device(model_shape("mlm", LADDER["6xl"], 512, 128), micro_batch_size=1, zero_stage=stage,
                                  world_size=workers, bf16=True, device="cuda", overhead_bytes=c.memory.overhead,
                                  fragmentation=c.memory.fragmentation)  # fmt: skip
            assert m.total > 16 * GB or 1024 % workers, (workers, stage)
    for stage in range(1, c.zero_stage):  # a smaller stage does not fit at the chosen worker count
        m = memory_per_device(model_shape("mlm", LADDER["6xl"], 512, 128), micro_batch_size=1, zero_stage=stage,
                              world_size=c.workers, bf16=True, device="cuda", overhead_bytes=c.memory.overhead,
                              fragmentation=c.memory.fragmentation)  # fmt: skip
        assert m.total > 16 * GB


def test_a_trial_that_fits_nowhere_is_refused_with_the_trial_the_need_and_the_capacity():
    trial = gpu_trial("6xl")
    with pytest.raises(PlanError, match=r"trial smoke_mlm_6xl: needs [\d.]+ GB per device even at ZeRO-3 over 2 "
                                        r"worker\(s\).*a worker gets 4.0 GB .*the cluster has 2 GPU"):
        choose(trial, gpus=2, gpu_memory_gb=4, vocab_size=512, max_seq_len=128)
    fixed = trial.model_copy(update={"train": trial.train.model_copy(update={"zero_stage": 0, "micro_batch_size": 1024})})
    with pytest.raises(PlanError, match="ZeRO-0 over 1 worker"):  # fixed values are checked, never changed
        choose(fixed, gpus=8, gpu_memory_gb=80, vocab_size=512, max_seq_len=128)


def test_a_fractional_gpu_gets_its_share_of_the_memory():
    whole = choose(gpu_trial("2xl"), gpus=1, gpu_memory_gb=80, vocab_size=512, max_seq_len=128)
    quarter = choose(gpu_trial("2xl", gpus_per_worker=0.25), gpus=1, gpu_memory_gb=80, vocab_size=512, max_seq_len=128)
    assert quarter.capacity_bytes == pytest.approx(whole.capacity_bytes / 4)
    assert quarter.micro_batch_size < whole.micro_batch_size and quarter.memory.total <= 20 * GB


def test_peak_flops_by_exact_name_or_number():
    assert peak_flops_per_s(312) == 312e12
    assert peak_flops_per_s("312.5") == 312.5e12
    assert peak_flops_per_s("a100") == 312e12
    assert peak_flops_per_s("A100", bf16=False) == 19.5e12
    with pytest.raises(ValueError, match="unknown GPU 'H200 NVLx'"):  # no substring guessing
        peak_flops_per_s("H200 NVLx")
    with pytest.raises(ValueError, match="positive"):
        peak_flops_per_s(0)


def test_device_hours():
    assert device_hours(3600 * 1e15, mfu=0.5, peak_flops=2e15) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mfu"):
        device_hours(1.0, mfu=0.0, peak_flops=1.0)


def _need(gpus: float, workers: int = 1) -> TrialNeed:
    return TrialNeed((Bundle(0.5, gpus),) * workers, trial_cpus=0.01)


def test_makespans_that_can_be_worked_out_by_hand():
    nodes = [Node(cpus=32, gpus=4)]
    needs = [_need(1.0), _need(1.0), _need(1.0), _need(1.0), _need(1.0, workers=4)]
    hours = [1.0, 1.0, 1.0, 1.0, 1.0]
    packed = simulate(needs, hours, nodes, reserved_cpus=1)
    assert packed.makespan_h == pytest.approx(2.0)  # the 4-GPU trial first, then four at once
    assert packed.start_h[4] == 0.0
    today = simulate(needs, hours, nodes, reserved_cpus=1, packed=False)  # min over trials: 1 at a time
    assert today.makespan_h == pytest.approx(5.0)
    assert occupancy(needs, packed, 4) == pytest.approx(1.0)
    assert occupancy(needs, today, 4) == pytest.approx(8 / 20)
    # eight half-GPU trials share four GPUs: one round
    halves = simulate([_need(0.5)] * 8, [1.0] * 8, nodes, reserved_cpus=1)
    assert halves.makespan_h == pytest.approx(1.0)
    # largest first: the long 2-GPU trial does not wait behind short small ones
    mixed = simulate([_need(0.25)] * 8 + [_need(1.0, workers=2)], [1.0] * 8 + [4.0], nodes, reserved_cpus=1)
    assert mixed.start_h[8] == 0.0 and mixed.makespan_h == pytest.approx(4.0)


def test_paper_grid_packs_and_prints():
    cfg = load_sweep(REPO_SWEEPS / "paper.yaml")
    trials = [auto(t) for t in expand_grid(cfg)]
    plan = plan_sweep(cfg, gpus=8, gpu_memory_gb=80, mfu=0.4, peak_flops=peak_flops_per_s("H100"), vocab_size=512,
                      trials=trials)  # fmt: skip
    assert {t.choice.zero_stage for t in plan.trials} == {0}  # every rung fits one 80 GB card
    assert plan.concurrency_today == 1  # the 8-worker 6xl sets it for all
    assert plan.packed.makespan_h < 0.6 * plan.one_at_a_time.makespan_h
    assert plan.packed.makespan_h >= plan.device_hours / 8 - 1e-9  # no schedule beats perfect packing
    assert plan.device_hours == pytest.approx(sum(t.device_hours for t in plan.trials))
    text = format_plan(plan)
    assert all(t.trial_id in text for t in plan.trials)
    assert "makespan packed" in text and "makespan today" in text and "Hessian job per rung" in text
    # memory per device by part, next to the total: the parts add up to it, row by row
    lines = text.splitlines()
    head = next(line for line in lines if line.startswith("trial "))
    assert head.split("|")[1].split() == list(MEMORY_PARTS) == ["weights", "grads", "optim", "act", "buffers", "other"]
    for t in plan.trials:
        row = next(line for line in lines if line.startswith(t.trial_id + " "))
        total, parts = float(row.split("|")[0].split()[3]), [float(v) for v in row.split("|")[1].split()]
        assert sum(parts) == pytest.approx(total, abs=0.03)  # each printed to 0.01 GB
        assert parts[0] == pytest.approx(t.choice.memory.weights / GB, abs=0.005)
        assert parts[2] == pytest.approx(t.choice.memory.optimizer / GB, abs=0.005)
        assert sum(memory_parts(t.choice.memory).values()) == pytest.approx(t.choice.memory.total)
    big = next(t for t in plan.trials if t.rung == "6xl").choice.memory
    assert big.optimizer > big.weights > 0 and big.activations > 0  # Adam's state: 3x fp32 over bf16 weights


def test_epoch_budgets_need_tokens_per_epoch():
    cfg = load_sweep(REPO_SWEEPS / "demo.yaml")
    if cfg.budget.epochs is None:
        cfg = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"tokens": None, "epochs": [1.0]})})
    kwargs = dict(gpus=0, gpu_memory_gb=0, mfu=0.1, peak_flops=1e11, vocab_size=64)
    with pytest.raises(PlanError, match="epochs; run prepare first"):
        plan_sweep(cfg, **kwargs)
    plan = plan_sweep(cfg, **kwargs, tokens_per_epoch=10**6)
    assert all(t.budget_tokens == 10**6 for t in plan.trials)
    assert all(math.isfinite(t.wall_hours) for t in plan.trials)


def test_hessian_estimate_does_not_grow_with_the_lanczos_iterations():
    shape = model_shape("mlm", LADDER["3xl"], 512, 128)
    at = {it: hessian_bytes(shape, micro_batch_size=32, max_iter=it, top_k=5, trace_matvecs=30, density_runs=2)
          for it in (60, 120)}  # fmt: skip
    assert at[120] == at[60]  # a fixed basis with thick restarts (engine.hessian), not 8 bytes x N x max_iter
    assert 4 * shape.n_params < at[60] < 60 * 8 * shape.n_params  # under the 41 GB of a float64 basis at 3xl
    sharded = hessian_bytes(shape, micro_batch_size=32, max_iter=60, top_k=5, trace_matvecs=30, density_runs=2,
                            n_workers=4)
    assert sharded < at[60]  # each worker keeps its slice of the basis


def test_resources_with_no_gpu_are_planned_on_the_cpu():
    trial = auto(smoke_trial("mlm", "s", budget_tokens=10**6, batch_size=64, micro_batch_size=64))
    trial = trial.model_copy(update={"resources": ResourcesConfig(workers=1, cpus_per_worker=1)})
    c = choose(trial, gpus=0, gpu_memory_gb=0, vocab_size=64, max_seq_len=64, cpu_memory_gb=1.0)
    assert c.zero_stage == 0 and c.micro_batch_size == 64 and c.memory.overhead == 0
    with pytest.raises(PlanError, match="a worker gets 0.0 GB"):
        choose(trial, gpus=0, gpu_memory_gb=0, vocab_size=64, max_seq_len=64, cpu_memory_gb=1e-3)


def test_auto_stage_leaves_zero_0_when_bf16_would_accumulate_in_bf16():
    """bf16 (auto precision on a GPU) with micro-steps: ZeRO 0 would add them up in bf16 (config.Trial
    refuses it), so auto takes ZeRO 1, where DeepSpeed accumulates in fp32; one micro-step keeps ZeRO 0."""
    trial = auto(smoke_trial("mlm", "xs", budget_tokens=10**6, batch_size=64, micro_batch_size=64), gpus_per_worker=1)
    fixed = trial.model_copy(update={"train": trial.train.model_copy(update={"micro_batch_size": 16})})
    c = choose(fixed, gpus=1, gpu_memory_gb=80, vocab_size=512, max_seq_len=64)
    assert (c.zero_stage, c.micro_batch_size) == (1, 16)
    c = choose(trial, gpus=1, gpu_memory_gb=80, vocab_size=512, max_seq_len=64)
    assert (c.zero_stage, c.micro_batch_size) == (0, 64)
