"""What a sweep will cost before it runs: memory per device, the ZeRO stage and micro-batch each
trial should use, FLOPs, device-hours, and the grid's makespan on a cluster of G devices.

The story, in order:
1. `memory_per_device` — the bytes one worker holds at its peak: weights, gradients and optimizer
   state for the ZeRO stage and world size (DeepSpeed 0.19 as `engine.train` configures it),
   the activations of one micro-batch (`activation_bytes`), and a fixed framework overhead.
2. `choose` — ZeRO 0 (plain data parallelism) when the trial fits one device, else the smallest
   stage that fits over the fewest devices; the largest power-of-two micro-batch that fits and
   divides the global batch. A trial that fits nowhere raises `PlanError` with the numbers.
3. `trial_flops`, `device_hours` — C = `engine.models.flops_per_token` x budget tokens; hours at
   a given MFU and peak FLOP/s (`peak_flops_per_s` takes a GPU name or a TF/s number).
4. `simulate` — the grid on the cluster, replaying `engine.admission.AdmissionController`
   (largest first, fractional GPUs sharing a device) against today's one-concurrency-for-all.
5. `hessian_bytes` — the Hessian job of `engine.analyze` per rung (with `engine.hessian.memory_estimate`).
6. `plan_sweep` puts it together; `format_plan` prints it.

Model states (Rajbhandari et al. 2020, "ZeRO", §3 and Fig. 1, with what DeepSpeed 0.19 adds):
Ψ parameters, W data-parallel workers, p = 2 bytes (bf16) or 4 (fp32), Adam's m and v in fp32.

    stage 0, fp32   weights 4Ψ, grads 4Ψ, Adam 8Ψ (DeepSpeed hands back the bare torch AdamW)
    stage 0, bf16   weights 2Ψ, grads 2Ψ, fp32 masters + Adam 12Ψ; step(): fp32 grads 4Ψ
                    (FP16_UnfusedOptimizer, runtime/fp16/unfused_optimizer.py)
    stage 1         weights pΨ, grads pΨ, masters + Adam 12Ψ/W; step(): fp32 grad partition 4Ψ/W
                    and the flat averaged partition pΨ/W
    stage 2         weights pΨ, grads pΨ/W, masters + Adam 12Ψ/W; step(): 4Ψ/W
    stage 3         weights pΨ/W + the gathered layers (two layers + the prefetch bucket), grads
                    pΨ/W, masters + Adam 12Ψ/W; step(): 4Ψ/W
    stages 1-3      + the contiguous-gradients bucket, reduce_bucket_size (5e8) x p bytes,
                    allocated whatever the model size (stage_1_and_2.py `setup_buckets`, stage3.py):
                    1 GB in bf16 on a GPU; on a CPU only the pages gradients are written into

The masters exist in fp32 runs too from stage 1 up (DeepSpeed clones the partition). The peak is
the persistent states plus the larger of one micro-batch's activations (gradients are whole from
the second micro-step on) and the step's transients.

Activations (`activation_bytes`): Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models", §4.1: s·b·h·(34 + 5·a·s/h) bytes per layer in 16-bit with dropout.
Adapted to what HF transformers 5 keeps for autograd with dropout 0 (no masks kept:
`at::dropout` returns its input at p = 0) and SDPA attention (flash / memory-efficient kernels
keep q, k, v, the output and a float32 log-sum-exp, no s² matrix), e bytes per value:

    RoBERTa layer   e·s·b·(9h + 2f) + 16·s·b (LayerNorm mean and rstd, fp32) + 4·b·a·s (log-sum-exp)
                    9h: layer input, q, k, v, SDPA output, its contiguous copy, both LayerNorm
                    inputs and the attention LayerNorm's output; 2f: GELU input and output
    GPT-2 layer     e·s·b·(9h + 5f) + ...: gelu_new is a Python composite that keeps x, tanh(.),
                    0.5x and 1 + tanh(.), plus its output
    llama and modernbert layers   e·s·b·(9h + 4g), g the gated width (engine.models.glu_dim): the
                    gate and up projections, the activation's output and the product. Not yet
                    measured: the RoBERTa and GPT-2 counts are, these are read off the modules
    eager attention + e·b·a·s² per layer (the softmax output), no log-sum-exp
    head            4h (mlm: dense, GELU, LayerNorm, decoder inputs) or 2h (clm: ln_f, lm_head)
                    + the float32 log-softmax 4·s·b·V; transients: logits and their gradient

checked against measured peaks on CPU in tests/test_plan_memory.py (fp32, ZeRO 0: within 10 %
for three rungs; bf16 ZeRO 0 and fp32 ZeRO 1 within 6 % in one-off runs of the same probe). The
GPU-side constants (GPU_OVERHEAD_BYTES, GPU_FRAGMENTATION) are assumptions until measured on a GPU.

No ray import here: this runs in `clmscale plan` and in the driver before Ray starts anything.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

from clmscale.engine.admission import (
    DATA_CPUS,
    TRIAL_CPU,
    AdmissionController,
    Node,
    TrialNeed,
    copies_that_fit,
    largest_first,
    trial_need,
)
from clmscale.engine.config import ModelSize, SweepConfig, Trial, expand_grid
from clmscale.engine.ladder import Family, objective
from clmscale.engine.models import build_config, count_params, flops_per_token, glu_dim

GB = 1e9  # memory is quoted in decimal GB, as GPU datasheets do (80 GB = 80e9 bytes)

# DeepSpeed 0.19's defaults (deepspeed/runtime/zero/config.py), which engine.train does not change
REDUCE_BUCKET_ELEMENTS = int(5e8)  # reduce_bucket_size
PREFETCH_BUCKET_ELEMENTS = int(5e7)  # stage3_prefetch_bucket_size
PERSISTENCE_THRESHOLD = int(1e5)  # stage3_param_persistence_threshold: smaller tensors stay whole

# Fixed per-process cost on a GPU that torch's allocator does not count: CUDA context, cuBLAS
# workspaces, NCCL buffers; and the caching allocator's reserved/allocated ratio. Assumed, not
# measured (no GPU was lent to the session that wrote this): set them from a measured run.
GPU_OVERHEAD_BYTES = 1.5 * GB
GPU_FRAGMENTATION = 1.10

Attention = Literal["sdpa", "eager"]


class PlanError(ValueError):
    """A trial that cannot run on the cluster given; the message names the trial and the numbers."""


# ---------------------------------------------------------------------------------------------
# 1. memory per device


@dataclass(frozen=True)
class ModelShape:
    """The numbers the memory model needs about one rung, as engine.models builds it."""

    family: Family
    n_layer: int
    d_model: int
    n_head: int
    d_ff: int
    vocab_size: int
    seq_len: int
    n_params: int  # Ψ, every trainable tensor once
    largest_tensor: int  # elements of the largest parameter (the optimizer steps tensor by tensor)
    layer_params: int  # elements of one transformer block
    persistent_params: int  # elements in tensors under PERSISTENCE_THRESHOLD (ZeRO-3 keeps them whole)


def model_shape(family: Family, size: ModelSize, vocab_size: int, max_seq_len: int) -> ModelShape:
    config = build_config(family, size, vocab_size, max_seq_len)
    d = size.d_model
    if family in ("mlm", "clm"):
        f = size.ffn_dim
        positions = config.max_position_embeddings if family == "mlm" else config.n_positions
        layer = 4 * d * d + 2 * d * f + 9 * d + f
        small: tuple[int, ...] = (d, d, d, d, f, d, d, d, d, d, d, d, d)  # biases and LayerNorms
    else:  # RoPE (no position table), bias-free gated MLP of width g, two norm weights per layer
        f = glu_dim(size.ffn_dim)
        positions = 0
        layer = 4 * d * d + 3 * d * f + 2 * d
        small = (d, d)
    small_per_layer = sum(n for n in small if n < PERSISTENCE_THRESHOLD)
    return ModelShape(
        family=family, n_layer=size.n_layer, d_model=d, n_head=size.n_head, d_ff=f, vocab_size=vocab_size,
        seq_len=max_seq_len, n_params=count_params(config).total,
        largest_tensor=max(vocab_size * d, positions * d, d * f),
        layer_params=layer, persistent_params=size.n_layer * small_per_layer,
    )  # fmt: skip


@dataclass(frozen=True)
class Activations:
    saved: float  # bytes autograd keeps from the forward pass to the backward
    transient: float  # the largest short-lived extra: logits and their gradients, or a layer's backward


def activation_bytes(
    shape: ModelShape, micro_batch_size: int, *, bytes_per_value: int, attention: Attention = "sdpa"
) -> Activations:
    """One micro-batch's activations at full sequence length (the formulas in the module docstring)."""
    b, s, h, f, a, n_layer, vocab = (micro_batch_size, shape.seq_len, shape.d_model, shape.d_ff, shape.n_head,
                                     shape.n_layer, shape.vocab_size)  # fmt: skip
    e, tokens = bytes_per_value, micro_batch_size * shape.seq_len
    # nn.functional.gelu, transformers' NewGELUActivation, or a gated MLP's gate, up, activation and product
    gelu = {"mlm": 2, "clm": 5}.get(shape.family, 4)
    attn = e * b * a * s * s if attention == "eager" else 4 * b * a * s
    per_layer = e * tokens * (9 * h + gelu * f) + 16 * tokens + attn
    if objective(shape.family) == "mlm":
        # LayerNorm input; ids, mask, labels, positions, types
        embeddings = e * tokens * h + 8 * tokens + 5 * 8 * tokens
        head = 4 * e * tokens * h
    else:
        embeddings = 4 * 8 * tokens  # ids, mask, labels, positions (the sum is layer 0's input)
        head = 2 * e * tokens * h
    mask = b * s * s  # the 4-D boolean attention mask, built once per forward
    log_softmax = 4 * tokens * vocab
    saved = n_layer * per_layer + embeddings + head + mask + log_softmax
    upcast = 4 * tokens * vocab if e != 4 else 0  # bf16 logits are cast to float32 for the loss
    logits = e * tokens * vocab + upcast + 4 * tokens * vocab  # logits, (cast,) gradient of log-softmax
    layer_backward = e * tokens * (2 * f + 3 * h)
    return Activations(saved=float(saved), transient=float(max(logits, layer_backward)))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device at the peak of a step, by part."""

    weights: float
    gradients: float
    optimizer: float  # Adam's m and v, plus fp32 master weights where DeepSpeed keeps them
    buffers: float  # DeepSpeed's gradient bucket (ZeRO 1-3)
    activations: float  # saved for backward
    transient: float  # max(activation transients, the optimizer step's fp32 gradients and temporaries)
    overhead: float
    fragmentation: float  # allocator factor on everything but the fixed overhead

    @property
    def total(self) -> float:
        tensors = self.weights + self.gradients + self.optimizer + self.buffers + self.activations + self.transient
        return tensors * self.fragmentation + self.overhead


def memory_per_device(
    shape: ModelShape,
    *,
    micro_batch_size: int,
    zero_stage: int,
    world_size: int,
    bf16: bool,
    device: Literal["cuda", "cpu"],
    overhead_bytes: float,
    fragmentation: float = 1.0,
    attention: Attention = "sdpa",
    reduce_bucket_elements: int = REDUCE_BUCKET_ELEMENTS,
) -> MemoryEstimate:
    """Peak bytes on one of `world_size` workers training `shape` (the table in the module docstring).

    `device` "cuda": engine.train's fused AdamW makes no temporaries, and DeepSpeed's gradient bucket
    is allocated whole. "cpu": torch's single-tensor AdamW makes two temporaries of the tensor it
    steps (under ZeRO the flat partition), and only the bucket pages gradients are written into
    become resident (`torch.empty` leaves the rest untouched).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3 (got {zero_stage})")
    n, w, p = shape.n_params, world_size, 2 if bf16 else 4
    bucket = p * (reduce_bucket_elements if device == "cuda" else min(reduce_bucket_elements, n))

    def adam_temporaries(elements: float) -> float:
        return 0.0 if device == "cuda" else 2 * 4 * elements

    weights: float  # bytes, as are the others below
    gradients: float
    optimizer: float
    step: float
    if zero_stage == 0:
        weights, gradients = p * n, p * n
        optimizer = 8 * n + (4 * n if bf16 else 0)
        buffers = 0.0
        step = (4 * n if bf16 else 0) + adam_temporaries(shape.largest_tensor)
    elif zero_stage in (1, 2):
        weights = p * n
        gradients = p * n if zero_stage == 1 else p * n / w
        optimizer = 12 * n / w
        buffers = bucket
        step = 4 * n / w + (p * n / w if zero_stage == 1 else 0) + adam_temporaries(n / w)
    else:
        gathered = min(p * n, p * (2 * shape.layer_params + PREFETCH_BUCKET_ELEMENTS))
        weights = p * n / w + p * shape.persistent_params + gathered
        gradients = p * n / w
        optimizer = 12 * n / w
        buffers = bucket
        step = 4 * n / w + adam_temporaries(n / w)
    act = activation_bytes(shape, micro_batch_size, bytes_per_value=p, attention=attention)
    return MemoryEstimate(
        weights=weights, gradients=gradients, optimizer=optimizer, buffers=buffers, activations=act.saved,
        transient=max(act.transient, step), overhead=overhead_bytes, fragmentation=fragmentation,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 2. the ZeRO stage, workers and micro-batch of one trial


@dataclass(frozen=True)
class Choice:
    zero_stage: int
    micro_batch_size: int
    workers: int
    memory: MemoryEstimate
    capacity_bytes: float | None  # per worker; None: not checked (a CPU trial without --cpu-memory)
    note: str = ""


def _is_auto(value: object) -> bool:
    return value is None or value == "auto"


def needs_choice(trial: Trial) -> bool:
    """Whether the trial's ZeRO stage or micro-batch is still `auto`."""
    return _is_auto(trial.train.zero_stage) or _is_auto(trial.train.micro_batch_size)


def bf16_of(trial: Trial) -> bool:
    """Precision as engine.train resolves it: auto is bf16 on a GPU, fp32 on a CPU."""
    precision = trial.train.precision
    return precision == "bf16" or (precision == "auto" and trial.resources.gpus_per_worker > 0)


def choose(
    trial: Trial,
    gpus: int,
    gpu_memory_gb: float,
    *,
    vocab_size: int,
    max_seq_len: int,
    cpu_memory_gb: float | None = None,
    overhead_bytes: float = GPU_OVERHEAD_BYTES,
    fragmentation: float = GPU_FRAGMENTATION,
) -> Choice:
    """ZeRO stage, micro-batch and workers for one trial on `gpus` devices of `gpu_memory_gb`.

    `trial.train.zero_stage` / `micro_batch_size` may be "auto" (or None): auto stage is 0 when the
    trial fits one device, else the smallest stage that fits at the fewest workers (from
    `resources.workers` up to what the cluster holds); auto micro-batch is the largest power of two
    that fits and divides batch_size / workers. Fixed values are only checked. A fractional
    `gpus_per_worker` gets that share of the device's memory; CPU trials are checked against
    `cpu_memory_gb` per worker when given (the fixed overhead is then not counted).
    """
    r, batch = trial.resources, trial.train.batch_size
    on_gpu = r.gpus_per_worker > 0
    if on_gpu:
        capacity: float | None = gpu_memory_gb * GB * min(r.gpus_per_worker, 1.0)
        max_workers = max(r.workers, int(gpus // r.gpus_per_worker + 1e-9))
    else:
        capacity = None if cpu_memory_gb is None else cpu_memory_gb * GB
        max_workers = r.workers
        overhead_bytes, fragmentation = 0.0, 1.0
    stage_auto, micro_auto = _is_auto(trial.train.zero_stage), _is_auto(trial.train.micro_batch_size)
    stages = [0, 1, 2, 3] if stage_auto else [int(trial.train.zero_stage)]
    shape = model_shape(trial.family, trial.size, vocab_size, max_seq_len)
    bf16 = bf16_of(trial)

    def micro_batches(workers: int) -> list[int]:
        if not micro_auto:
            mb = int(trial.train.micro_batch_size)
            return [mb] if batch % (mb * workers) == 0 else []
        per_worker = batch // workers if batch % workers == 0 else 0
        return [2**k for k in range(int(math.log2(per_worker)), -1, -1) if per_worker % 2**k == 0] if per_worker else []

    def estimate(stage: int, workers: int, mb: int) -> MemoryEstimate:
        return memory_per_device(
            shape,
            micro_batch_size=mb,
            zero_stage=stage,
            world_size=workers,
            bf16=bf16,
            device="cuda" if on_gpu else "cpu",
            overhead_bytes=overhead_bytes,
            fragmentation=fragmentation,
        )

    smallest: tuple[int, int, int, MemoryEstimate] | None = None  # the least memory tried, for the error
    worker_counts = [r.workers] + (list(range(r.workers + 1, max_workers + 1)) if stage_auto else [])
    for workers in worker_counts:
        for stage in stages:
            if stage == 0 and workers != r.workers:
                continue  # ZeRO 0 replicates everything: more workers do not help it fit
            for mb in micro_batches(workers):
                if bf16 and stage == 0 and batch // (mb * workers) > 1:
                    continue  # bf16 accumulates in fp32 only under ZeRO (config.Trial refuses this)
                mem = estimate(stage, workers, mb)
                if smallest is None or mem.total < smallest[3].total:
                    smallest = (stage, workers, mb, mem)
                if capacity is None or mem.total <= capacity:
                    note = f"workers raised from {r.workers} to {workers} to fit" if workers != r.workers else ""
                    return Choice(stage, mb, workers, mem, capacity, note)
    if smallest is None:
        raise PlanError(
            f"trial {trial.trial_id}: no micro-batch divides batch_size {batch} over {r.workers} worker(s) "
            f"(micro_batch_size: {trial.train.micro_batch_size})"
        )
    stage, workers, mb, mem = smallest
    assert capacity is not None  # with no capacity the first estimate is returned above
    raise PlanError(
        f"trial {trial.trial_id}: needs {mem.total / GB:.1f} GB per device even at ZeRO-{stage} over {workers} "
        f"worker(s) with micro-batch {mb} ({_parts_text(mem)}), but a worker gets {capacity / GB:.1f} GB "
        f"({f'{min(r.gpus_per_worker, 1.0):g} x ' if on_gpu else ''}{gpu_memory_gb if on_gpu else cpu_memory_gb:g} GB) "
        f"and the cluster has {gpus} GPU(s); lower micro_batch_size or the rung, or use larger devices"
    )


MEMORY_PARTS = ("weights", "grads", "optim", "act", "buffers", "other")  # format_plan's columns


def memory_parts(mem: MemoryEstimate) -> dict[str, float]:
    """Bytes per device by `MEMORY_PARTS`, summing to `mem.total`: the allocator's fragmentation is
    counted in "other" with the transients and the fixed overhead, so the tensor parts are as modelled."""
    tensors = {"weights": mem.weights, "grads": mem.gradients, "optim": mem.optimizer, "act": mem.activations,
               "buffers": mem.buffers}  # fmt: skip
    return {**tensors, "other": mem.total - sum(tensors.values())}


def _parts_text(mem: MemoryEstimate) -> str:
    parts = {"weights": mem.weights, "grads": mem.gradients, "optimizer": mem.optimizer, "buckets": mem.buffers,
             "activations": mem.activations, "transient": mem.transient, "overhead": mem.overhead}  # fmt: skip
    return ", ".join(f"{k} {v / GB:.2f}" for k, v in parts.items() if v)


def apply_choice(trial: Trial, choice: Choice) -> Trial:
    """The trial with its auto fields made concrete, validated again (batch splits over workers)."""
    train = trial.train.model_copy(
        update={"zero_stage": choice.zero_stage, "micro_batch_size": choice.micro_batch_size}
    )
    resources = trial.resources.model_copy(update={"workers": choice.workers})
    rest = trial.model_dump(exclude={"train", "resources"})
    return Trial.model_validate({**rest, "train": train.model_dump(), "resources": resources.model_dump()})


# ---------------------------------------------------------------------------------------------
# 3. FLOPs and device-hours


def trial_flops(trial: Trial, *, vocab_size: int, max_seq_len: int, budget_tokens: int) -> float:
    """C = flops_per_token x tokens, as engine.train reports it."""
    config = build_config(trial.family, trial.size, vocab_size, max_seq_len)
    return flops_per_token(config, max_seq_len) * budget_tokens


def budget_tokens_of(trial: Trial, tokens_per_epoch: int | Mapping[int | None, int] | None) -> int:
    """Tokens the trial trains on; an epoch budget needs the train split's token count (after prepare), or,
    with budget.unique_molecules, a mapping from each unique count (None: the whole split) to its tokens."""
    if trial.budget_tokens is not None:
        return trial.budget_tokens
    if isinstance(tokens_per_epoch, Mapping):
        tokens_per_epoch = tokens_per_epoch.get(trial.unique_molecules)
    if tokens_per_epoch is None:
        raise PlanError(
            f"trial {trial.trial_id}: the budget is {trial.budget_epochs:g} epochs; run prepare first "
            f"(the manifest has the train split's tokens) or give tokens per epoch"
        )
    assert trial.budget_epochs is not None  # Trial's validator: one of the two budgets
    return int(trial.budget_epochs * tokens_per_epoch)


def peak_flops_per_s(gpu: str | float, *, bf16: bool = True) -> float:
    """Peak FLOP/s of one device: a number is TF/s; a name must equal an entry of the peak table.

    Exact names only: a substring match reads "H200 NVL" as "H200" (issue 16); the table is
    engine.models.PEAK_FLOPS.
    """
    if isinstance(gpu, int | float) or _is_number(gpu):
        tflops = float(gpu)
        if not tflops > 0:
            raise ValueError(f"peak TF/s must be positive (got {gpu})")
        return tflops * 1e12
    from clmscale.engine.models import PEAK_FLOPS

    table = dict(PEAK_FLOPS)
    for name, (bf16_peak, fp32_peak) in table.items():
        if name.lower() == str(gpu).strip().lower():
            return bf16_peak if bf16 else fp32_peak
    raise ValueError(f"unknown GPU {gpu!r}: give its peak in TF/s or one of {', '.join(sorted(table))}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def device_hours(flops: float, mfu: float, peak_flops: float) -> float:
    """Device-hours of a run at `mfu` of `peak_flops` per device (the same however many devices share it)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1] (got {mfu})")
    return flops / (mfu * peak_flops) / 3600


# ---------------------------------------------------------------------------------------------
# 4. the grid on the cluster


@dataclass(frozen=True)
class Schedule:
    start_h: list[float]
    end_h: list[float]

    @property
    def makespan_h(self) -> float:
        return max(self.end_h, default=0.0) - min(self.start_h, default=0.0)


def simulate(
    needs: Sequence[TrialNeed],
    hours: Sequence[float],
    nodes: Sequence[Node],
    *,
    reserved_cpus: float,
    packed: bool = True,
    concurrency: int | None = None,
) -> Schedule:
    """List scheduling of the grid. packed: `AdmissionController`, largest first with backfilling.
    Not packed: Tune's grid order with one concurrency for all trials (`concurrency`, default
    today's min over trials of how many copies fit), the way engine.sweep runs it now."""
    ledger = AdmissionController(nodes, reserved_cpus)
    for i, (need, h) in enumerate(zip(needs, hours, strict=True)):
        ledger.add(i, need, largest_first(need, h) if packed else (float(i),))
    limit = None
    if not packed:
        limit = concurrency or min(
            (copies_that_fit(n, nodes, reserved_cpus, limit=len(needs)) for n in needs), default=1
        )
    start, end = [math.nan] * len(needs), [math.nan] * len(needs)
    running: list[tuple[float, int]] = []
    now = 0.0
    while ledger.pending or running:
        for i in cast(list[int], ledger.admit(limit)):  # the keys added above are the indices
            start[i], end[i] = now, now + hours[i]
            heapq.heappush(running, (end[i], i))
        if not running:  # nothing runs and nothing fits: add() refuses such trials, so this is a bug
            raise AssertionError(f"trials {ledger.pending} can never start")
        now, i = heapq.heappop(running)
        ledger.release(i)
        while running and running[0][0] <= now:
            ledger.release(heapq.heappop(running)[1])
    return Schedule(start, end)


def occupancy(needs: Sequence[TrialNeed], schedule: Schedule, n_gpus: float) -> float:
    """GPU-hours held / (cluster GPUs x makespan)."""
    held = sum(n.gpus * (e - s) for n, s, e in zip(needs, schedule.start_h, schedule.end_h, strict=True))
    return held / (n_gpus * schedule.makespan_h) if n_gpus and schedule.makespan_h > 0 else math.nan


def cluster_nodes(gpus: int, *, gpus_per_node: int | None = None, cpus_per_node: float | None = None) -> list[Node]:
    """`gpus` GPUs in nodes of `gpus_per_node` (default: one node); CPUs per node default to plenty
    (the plan is about GPUs unless the CPUs are given)."""
    per_node = gpus_per_node or max(gpus, 1)
    n_nodes = max(1, math.ceil(gpus / per_node))
    cpus = cpus_per_node if cpus_per_node is not None else 1e6
    return [Node(cpus=cpus, gpus=min(per_node, gpus - k * per_node)) for k in range(n_nodes)]


# ---------------------------------------------------------------------------------------------
# 5. the Hessian job


def hessian_bytes(
    shape: ModelShape,
    *,
    micro_batch_size: int,
    max_iter: int,
    top_k: int,
    trace_matvecs: int,
    density_runs: int,
    n_workers: int = 1,
) -> float:
    """Peak bytes of one worker of `engine.hessian.spectrum` on this shape: the fp32 weights, what
    `engine.hessian.memory_estimate` counts (one HVP's parameter-sized tensors and the largest
    estimator's stored vectors: a fixed Lanczos basis, this worker's slice of it when distributed),
    and about three times the eager-attention activations of one batch for the double backward (an
    assumption: the forward's saved tensors plus the first backward's graph). Batches are taken one
    at a time, so their number does not add."""
    from clmscale.engine.hessian import memory_estimate

    n = shape.n_params
    extra = memory_estimate(n, "float32", max_iter, max(top_k, 1), trace_matvecs, n_workers, density_runs=density_runs)[
        "peak_bytes"
    ]
    act = activation_bytes(shape, micro_batch_size, bytes_per_value=4, attention="eager")
    return 4 * n + extra + 3 * act.saved + act.transient


# ---------------------------------------------------------------------------------------------
# 6. the whole sweep


@dataclass(frozen=True)
class TrialPlan:
    trial_id: str
    rung: str
    n_params: int
    budget_tokens: int
    flops: float
    choice: Choice
    gpus: float  # devices held: workers x gpus_per_worker
    device_hours: float
    wall_hours: float


@dataclass(frozen=True)
class SweepPlan:
    trials: list[TrialPlan]
    n_gpus: int
    gpu_memory_gb: float
    mfu: float
    peak_flops: float
    packed: Schedule
    one_at_a_time: Schedule
    concurrency_today: int
    occupancy_packed: float
    occupancy_today: float
    hessian_bytes: dict[str, float] = field(default_factory=dict)  # per rung, one worker
    hessian_workers: int = 1

    @property
    def device_hours(self) -> float:
        return sum(t.device_hours for t in self.trials)


def plan_sweep(
    cfg: SweepConfig,
    *,
    gpus: int,
    gpu_memory_gb: float,
    mfu: float = 0.4,
    peak_flops: float,
    vocab_size: int,
    tokens_per_epoch: int | Mapping[int | None, int] | None = None,
    gpus_per_node: int | None = None,
    cpus_per_node: float | None = None,
    cpu_memory_gb: float | None = None,
    trial_cpus: float = TRIAL_CPU,
    reserved_cpus: float = DATA_CPUS,
    trials: Sequence[Trial] | None = None,
) -> SweepPlan:
    """Every trial of the grid planned (`choose`) and timed, the grid scheduled both ways.

    Raises `PlanError` for the first trial that cannot fit, naming it. `peak_flops` is FLOP/s
    per device (`peak_flops_per_s`); CPU trials are timed at the same peak per worker.
    `trials` defaults to `expand_grid(cfg)`.
    """
    max_seq_len = cfg.model.max_seq_len
    nodes = cluster_nodes(gpus, gpus_per_node=gpus_per_node, cpus_per_node=cpus_per_node)
    trials = list(expand_grid(cfg) if trials is None else trials)
    rows, needs = [], []
    for trial in trials:
        choice = choose(
            trial, gpus, gpu_memory_gb, vocab_size=vocab_size, max_seq_len=max_seq_len, cpu_memory_gb=cpu_memory_gb
        )
        concrete = apply_choice(trial, choice)
        tokens = budget_tokens_of(trial, tokens_per_epoch)
        flops = trial_flops(trial, vocab_size=vocab_size, max_seq_len=max_seq_len, budget_tokens=tokens)
        held = concrete.resources.workers * (concrete.resources.gpus_per_worker or 1.0)
        hours = device_hours(flops, mfu, peak_flops)
        need = trial_need(concrete.resources, trial_cpus)
        ledger = AdmissionController(nodes, reserved_cpus)
        if not ledger.fits_empty(need):
            raise PlanError(
                f"trial {trial.trial_id}: needs {need.gpus:g} GPUs and {need.cpus:g} CPUs, but the "
                f"cluster is {ledger.capacity_text()}"
            )
        needs.append(need)
        n_params = model_shape(trial.family, trial.size, vocab_size, max_seq_len).n_params
        rows.append(TrialPlan(trial.trial_id, trial.size.name, n_params, tokens, flops, choice, need.gpus, hours,
                              hours / held))  # fmt: skip
    wall = [t.wall_hours for t in rows]
    packed = simulate(needs, wall, nodes, reserved_cpus=reserved_cpus, packed=True)
    today = min((copies_that_fit(n, nodes, reserved_cpus, limit=len(needs)) for n in needs), default=1)
    serial = simulate(needs, wall, nodes, reserved_cpus=reserved_cpus, packed=False, concurrency=today)
    hessian = {}
    if cfg.analysis.hessian_top_k > 0:
        for row, trial in zip(rows, trials, strict=True):
            if row.rung in hessian:
                continue
            shape = model_shape(trial.family, trial.size, vocab_size, max_seq_len)
            # engine.analyze cuts the trial's validation batches into pieces of analysis.hessian_micro_batch rows
            micro = min(cfg.analysis.hessian_micro_batch, row.choice.micro_batch_size)
            hessian[row.rung] = hessian_bytes(
                shape, micro_batch_size=micro, max_iter=cfg.analysis.hessian_max_iter,
                top_k=cfg.analysis.hessian_top_k, trace_matvecs=cfg.analysis.trace_matvecs,
                density_runs=cfg.analysis.density_runs, n_workers=cfg.analysis.hessian_workers,
            )  # fmt: skip
    return SweepPlan(
        trials=rows, n_gpus=gpus, gpu_memory_gb=gpu_memory_gb, mfu=mfu, peak_flops=peak_flops, packed=packed,
        one_at_a_time=serial, concurrency_today=today, occupancy_packed=occupancy(needs, packed, gpus),
        occupancy_today=occupancy(needs, serial, gpus), hessian_bytes=hessian,
        hessian_workers=cfg.analysis.hessian_workers,
    )  # fmt: skip


def format_plan(plan: SweepPlan) -> str:
    """The plan as a table a person can read: one line per trial, then the grid's totals."""
    head = (f"{'trial':<22} {'params':>9} {'FLOPs':>9} {'GB/dev':>7} {'of':>6} | "
            + " ".join(f"{name:>7}" for name in MEMORY_PARTS)
            + f" | {'ZeRO':>4} {'micro':>5} {'workers':>7} {'GPUs':>5} {'dev-h':>8} {'wall-h':>8}")  # fmt: skip
    lines = [
        f"# {len(plan.trials)} trials on {plan.n_gpus} GPU(s) of {plan.gpu_memory_gb:g} GB at MFU {plan.mfu:g} of "
        f"{plan.peak_flops / 1e12:g} TF/s",
        "# GB per device at the chosen ZeRO stage and micro-batch (of: what a worker gets), by part: optim = Adam's "
        "m and v (+ fp32 masters), act = saved for backward, buffers = DeepSpeed's gradient bucket, other = "
        "transients + fixed overhead + allocator slack",
        head,
    ]
    for t in plan.trials:
        c = t.choice
        cap = f"{c.capacity_bytes / GB:.1f}" if c.capacity_bytes else "-"
        parts = " ".join(f"{v / GB:>7.2f}" for v in memory_parts(c.memory).values())
        lines.append(
            f"{t.trial_id:<22} {t.n_params:>9.3g} {t.flops:>9.3g} {c.memory.total / GB:>7.2f} {cap:>6} | {parts} | "
            f"{c.zero_stage:>4} {c.micro_batch_size:>5} {c.workers:>7} {t.gpus:>5g} {t.device_hours:>8.3g} "
            f"{t.wall_hours:>8.3g}" + (f"  ({c.note})" if c.note else "")
        )
    packed, serial = plan.packed.makespan_h, plan.one_at_a_time.makespan_h
    lines += [
        f"# total {plan.device_hours:.4g} device-hours",
        f"# makespan packed (largest first, fractional GPUs share a device): {packed:.4g} h, "
        f"occupancy {plan.occupancy_packed:.2f}",
        f"# makespan today (one concurrency for all trials: {plan.concurrency_today} at once, grid order): "
        f"{serial:.4g} h, occupancy {plan.occupancy_today:.2f}"
        + (f"; packed is {serial / packed:.2f}x faster" if packed > 0 else ""),
    ]
    if plan.hessian_bytes:
        lines.append(
            f"# Hessian job per rung, per worker of {plan.hessian_workers} (fixed Lanczos basis, sliced over "
            "the workers; pieces of analysis.hessian_micro_batch rows): "
            + ", ".join(f"{rung} {b / GB:.3g} GB" for rung, b in plan.hessian_bytes.items())
        )
    return "\n".join(lines)
