"""The sweep file: one YAML document describes a whole scaling study.

Every section is a frozen pydantic model with `extra="forbid"`, so a typo is an error, not a
silently ignored setting. `load_sweep(path)` parses the YAML, validates it and, on failure, raises
`SweepFileError` naming the file, the YAML line and the field (with a "did you mean" for typos).
`expand_grid(cfg)` turns the validated file into the list of pretraining trials
(sizes x budgets x seeds, and representations x families x masking ratios where those are lists), each with its per-rung
overrides applied.

Derived quantities (parameter counts, FLOPs, token budgets from epochs) are computed elsewhere
from these fields; nothing here stores a copy of something that can be derived.
"""

from __future__ import annotations

import difflib
import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from clmscale.engine import ladder
from clmscale.engine.ladder import Family, objective
from clmscale.engine.representations import Representation


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _as_int(value: Any) -> Any:
    """YAML reads `1e6` as a float (or a string); budgets and counts are integers."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


BigInt = Annotated[int, BeforeValidator(_as_int)]


def _token_counts(value: list[int]) -> list[int]:
    _distinct_positive_list(value, "tokens must be a non-empty list of distinct positive token counts")
    return value


TokenCounts = Annotated[list[BigInt], AfterValidator(_token_counts)]  # a rung's budgets, analysis.tokens


# ---------------------------------------------------------------------------------------------
# prepare: corpus -> canonical, deduplicated shards


class DataConfig(Strict):
    corpus: list[Path] = Field(min_length=1)  # CSV / SMI / Parquet files, optionally .gz
    smiles_column: str | None = None  # None: a column named smiles (any case), else the first
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    split: Literal["random", "scaffold"] = "random"
    max_molecules: BigInt | None = Field(None, gt=0)  # cap on molecules read, in file order
    isomeric: bool = True  # keep stereochemistry in canonical SMILES; False strips it
    max_heavy_atoms: int | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)  # tokens per SMILES, before special tokens
    shard_rows: BigInt = Field(50_000, gt=0)
    seed: int = 0  # for the train/validation split
    # drop corpus molecules that are downstream task molecules (all splits): true = every task of
    # `downstream`, or a list of task names (registry or downstream.custom), or false. Exposure to test
    # molecules grows with epochs, so leakage would be confounded with D
    decontaminate: bool | list[str] = True
    # inchikey: the full InChIKey; connectivity: its first 14 characters, the skeleton without stereo,
    # isotopes or protonation (a stereoisomer of a task molecule is removed too)
    decontaminate_key: Literal["inchikey", "connectivity"] = "inchikey"
    # the molecular string the models read (engine.representations): smiles, selfies, deepsmiles or safe; a list
    # makes it an axis of the grid. prepare writes each from the canonical SMILES, keeping only molecules that
    # every listed representation writes and reads back, so all arms see the same molecules
    representation: Representation | list[Representation] = "smiles"
    # SMILES augmentation (enumeration): each pass shows every molecule k times, each time in a random RDKit atom
    # order (`doRandom`), drawn anew per pass; 0: the canonical SMILES once. Validation stays canonical
    randomized_smiles: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _randomized_smiles_are_smiles(self) -> DataConfig:
        if self.randomized_smiles and self.representations() != ["smiles"]:
            raise ValueError(
                f"randomized_smiles: random atom orderings are written as SMILES, and data.representation is "
                f"{self.representation}; use representation: smiles, or randomized_smiles: 0"
            )
        return self

    @field_validator("representation")
    @classmethod
    def _distinct_representations(cls, value: Representation | list[Representation]) -> Any:
        if isinstance(value, list):
            _distinct(value)
        return value

    def representations(self) -> list[Representation]:
        """The grid's representations, in the order given."""
        return self.representation if isinstance(self.representation, list) else [self.representation]

    @field_validator("decontaminate")
    @classmethod
    def _distinct_task_names(cls, value: bool | list[str]) -> bool | list[str]:
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError(f"task names repeat (got {value})")
        return value


# ---------------------------------------------------------------------------------------------
# the model ladder


class ModelSize(Strict):
    """Explicit transformer dimensions; also the shape of every named rung in `LADDER`."""

    name: str
    n_layer: int = Field(gt=0)
    d_model: int = Field(gt=0)
    n_head: int = Field(gt=0)
    d_ff: int | None = Field(None, gt=0)  # None: 4 * d_model, as in BERT and GPT-2

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSize:
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model must be divisible by n_head (got d_model: {self.d_model} and n_head: {self.n_head})"
            )
        return self

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 4 * self.d_model


# Named rungs, smallest first: the table is engine/ladder.py's (plain data, so that the FLOP formulas
# import without pydantic on a GPU box); here each rung becomes a validated ModelSize.
LADDER: dict[str, ModelSize] = {
    name: ModelSize(name=r.name, n_layer=r.n_layer, d_model=r.d_model, n_head=r.n_head, d_ff=r.d_ff)
    for name, r in ladder.LADDER.items()
}


class RungOverrides(Strict):
    """Per-rung training settings; anything unset falls back to the `train` section."""

    lr: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    micro_batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] | None = None
    zero_stage: Literal["auto", 0, 1, 2, 3] | None = None
    workers: int | None = Field(None, gt=0)
    gpus_per_worker: float | None = Field(None, ge=0)  # e.g. 0.25: four tiny trials share a GPU
    cpus_per_worker: float | None = Field(None, gt=0)
    # this rung's token budgets in place of budget.tokens: e.g. small rungs trained long enough to flatten
    # (an isoFLOP-style design); only with budget.tokens
    tokens: TokenCounts | None = None

    def split(self) -> tuple[dict, dict]:
        """(train updates, resources updates): the training and resource fields that are set, by section."""
        set_ = {k: v for k, v in self.model_dump(exclude={"tokens"}).items() if v is not None}
        res = {k: set_.pop(k) for k in ("workers", "gpus_per_worker", "cpus_per_worker") if k in set_}
        return set_, res


def _distinct_positive_list(value: list[int] | None, what: str) -> None:
    """A list of counts (None: not given): at least one, all positive, none twice; else ValueError `what`."""
    if value is not None and (not value or min(value) <= 0 or len(set(value)) != len(value)):
        raise ValueError(f"{what} (got {value})")


def _distinct(values: list) -> None:
    """An axis given as a list: at least one value, none twice (a repeated value would repeat trial ids)."""
    if not values:
        raise ValueError("a list needs at least one value")
    if len(set(values)) != len(values):
        raise ValueError(f"values repeat (got {values})")


class ModelConfig(Strict):
    # mlm (RoBERTa), clm (GPT-2), llama (Llama decoder), modernbert (ModernBERT encoder); a list makes it an axis
    family: Family | list[Family] = "mlm"
    sizes: list[str | ModelSize] = Field(min_length=1)
    max_seq_len: int = Field(128, gt=4)  # tokens incl. special tokens; longer SMILES are cut
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # 0: scaling-law runs are single-epoch-ish
    overrides: dict[str, RungOverrides] = {}

    @field_validator("family")
    @classmethod
    def _distinct_families(cls, family: Family | list[Family]) -> Family | list[Family]:
        if isinstance(family, list):
            _distinct(family)
        return family

    def families(self) -> list[Family]:
        return self.family if isinstance(self.family, list) else [self.family]

    @field_validator("sizes")
    @classmethod
    def _known_rungs(cls, sizes: list[str | ModelSize]) -> list[str | ModelSize]:
        for i, name in enumerate(sizes):
            if isinstance(name, str) and name not in LADDER:
                raise ValueError(_unknown(f"rung sizes[{i}]", name, list(LADDER)))
        return sizes

    @model_validator(mode="after")
    def _unique_and_overridden_rungs(self) -> ModelConfig:
        names = [s if isinstance(s, str) else s.name for s in self.sizes]
        for name in self.overrides:
            if name not in names:
                raise ValueError(_unknown("overrides", name, names))
        if len(set(names)) != len(names):
            raise ValueError(f"sizes names must be unique (got {names})")
        return self

    def rungs(self) -> list[ModelSize]:
        return [LADDER[s] if isinstance(s, str) else s for s in self.sizes]


# ---------------------------------------------------------------------------------------------
# budgets and training


class BudgetConfig(Strict):
    """How long each run trains: a list of token budgets, or a list of epochs over the train split.

    `unique_molecules` adds the unique data as an axis of its own: each run draws from the first n molecules
    of the train split (written in a seeded random order, so each smaller set is a random subset nested in
    every larger one), and its epochs are passes over that subset (Muennighoff et al. 2023)."""

    tokens: list[BigInt] | None = None
    epochs: list[float] | None = None
    unique_molecules: list[BigInt] | None = None  # None: the whole train split

    @model_validator(mode="after")
    def _exactly_one(self) -> BudgetConfig:
        if (self.tokens is None) == (self.epochs is None):
            raise ValueError("give exactly one of budget.tokens or budget.epochs")
        values = self.tokens or self.epochs or []
        if not values or any(v <= 0 for v in values):
            raise ValueError(f"budgets must be a non-empty list of positive numbers (got {values})")
        return self

    @field_validator("unique_molecules")
    @classmethod
    def _distinct_positive(cls, value: list[int] | None) -> list[int] | None:
        _distinct_positive_list(value, "unique_molecules must be a non-empty list of distinct positive counts")
        return sorted(value) if value is not None else None


class TrainConfig(Strict):
    batch_size: int = Field(64, gt=0)  # global batch in sequences (all workers, all micro-steps)
    # per worker per forward pass; auto: the largest power of two that fits the device (engine.plan)
    micro_batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"
    lr: float = Field(1e-3, gt=0)  # peak
    lr_min_ratio: float = Field(0.1, ge=0, le=1)  # floor of the decay, as a fraction of peak
    warmup_fraction: float = Field(0.05, ge=0, lt=1)  # of the token budget
    # cosine: one decay to the budget, only its last checkpoint annealed. constant_cooldown: constant, then
    # a cooldown over the last cooldown_fraction. wsd: warmup-stable-decay with a cooldown branch per
    # milestone (Hagele et al. 2024), every checkpoint annealed; the main run goes on at the peak lr
    schedule: Literal["cosine", "constant_cooldown", "wsd"] = "cosine"
    # constant_cooldown: the tail of the budget; wsd: each branch's share of its milestone's tokens (20 %
    # matches cosine in Hagele et al. 2024)
    cooldown_fraction: float = Field(0.2, ge=0, le=1)
    cooldown_shape: Literal["linear", "1-sqrt"] = "linear"  # 1-sqrt: Hagele et al.'s better-performing decay
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)  # RoBERTa's beta2
    grad_clip: float = Field(1.0, ge=0)  # 0 disables
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # auto: 0 when the trial fits one device (on one worker any stage is pure overhead), else the
    # smallest stage that fits (engine.plan.choose, at the sweep's start)
    zero_stage: Literal["auto", 0, 1, 2, 3] = "auto"
    # share of tokens masked (80 % [MASK], 10 % random, 10 % kept) in the mlm families; a list makes it an axis
    mlm_probability: Annotated[float, Field(gt=0, lt=1)] | list[Annotated[float, Field(gt=0, lt=1)]] = 0.15
    packing: bool = False  # pack several SMILES per sequence instead of padding each
    # without packing: batches of molecules of about one length (sorted within windows of ~1024 molecules,
    # the windows' batches dealt in a seeded order), so less of each batch is padding
    length_buckets: bool = False
    compile: bool = False  # torch.compile the model (batches padded to max_seq_len: one shape); off until measured
    checkpoints: int = Field(4, ge=1)  # log-spaced token milestones per run, the last at the budget
    log_every_steps: int = Field(10, gt=0)
    val_batches: int = Field(4, gt=0)  # fixed validation batches, the same for every run
    seed_data: bool = True  # True: the trial seed also shuffles the data; False: only the init

    @field_validator("mlm_probability")
    @classmethod
    def _distinct_ratios(cls, value: float | list[float]) -> float | list[float]:
        if isinstance(value, list):
            _distinct(value)
        return value

    def mlm_probabilities(self) -> list[float]:
        return self.mlm_probability if isinstance(self.mlm_probability, list) else [self.mlm_probability]

    @model_validator(mode="after")
    def _micro_divides(self) -> TrainConfig:
        if self.micro_batch_size != "auto" and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size must be a multiple of micro_batch_size "
                f"(got batch_size: {self.batch_size} and micro_batch_size: {self.micro_batch_size})"
            )
        return self

    @model_validator(mode="after")
    def _buckets_or_packing(self) -> TrainConfig:
        if self.length_buckets and self.packing:
            raise ValueError(
                "length_buckets and packing are two ways to cut padding; packing already fills each row, so "
                "give one of them (got both true)"
            )
        return self

    @model_validator(mode="after")
    def _wsd_branches_after_warmup(self) -> TrainConfig:
        """A wsd branch decays from the peak: the first one (at (1 - cooldown_fraction) of budget /
        2^(checkpoints-1)) may not start inside the warmup, nor be empty."""
        if self.schedule != "wsd":
            return self
        if self.cooldown_fraction == 0:
            raise ValueError("schedule wsd needs cooldown_fraction > 0 (got 0): each checkpoint is a cooldown's end")
        first_branch = (1 - self.cooldown_fraction) / 2 ** (self.checkpoints - 1)
        if self.warmup_fraction > first_branch:
            raise ValueError(
                f"schedule wsd: the first cooldown branch starts at {first_branch:.4g} of the budget "
                f"((1 - cooldown_fraction) / 2^(checkpoints - 1)), inside the warmup (warmup_fraction: "
                f"{self.warmup_fraction}); lower warmup_fraction to at most {first_branch:.4g} or use fewer checkpoints"
            )
        return self


class ResourcesConfig(Strict):
    workers: int = Field(1, gt=0)  # Ray Train workers per trial
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)  # fractions let tiny rungs share a GPU
    max_concurrent_trials: int | None = Field(None, gt=0)  # None: as many as the cluster fits
    gpu_memory_gb: float | None = Field(None, gt=0)  # per GPU, for the planner; None: asked of the cluster
    max_failures: int = Field(2, ge=0)  # retries of a trial whose worker dies
    # What an autoscaling cluster can grow to, in all ({GPU: 8, CPU: 64}); None: the autoscaler's own
    # limits where Ray exposes them, else the nodes up at the start. A missing CPU means "enough".
    cluster_max: dict[Literal["CPU", "GPU"], Annotated[float, Field(ge=0)]] | None = None
    scale_up_timeout_s: float = Field(1800.0, gt=0)  # nothing runs and the nodes asked for never came: fail

    @model_validator(mode="after")
    def _whole_gpus_for_many(self) -> ResourcesConfig:
        if self.workers > 1 and 0 < self.gpus_per_worker < 1:
            raise ValueError(
                f"fractional gpus_per_worker needs workers: 1 (got workers: {self.workers}, "
                f"gpus_per_worker: {self.gpus_per_worker})"
            )
        return self


# ---------------------------------------------------------------------------------------------
# analysis of the checkpoints


class CustomTask(Strict):
    name: str
    path: Path
    smiles_column: str = "smiles"
    label_columns: list[str] = Field(min_length=1)
    task_type: Literal["classification", "regression"]


Baseline = Literal["random_init", "morgan_fp", "ecfp4_rf", "rdkit2d_rf"]
BASELINES: tuple[Baseline, ...] = ("random_init", "morgan_fp", "ecfp4_rf", "rdkit2d_rf")


class DownstreamConfig(Strict):
    tasks: list[str] = []  # registry names (engine.tasks.TASKS) or names of `custom` entries
    custom: list[CustomTask] = []
    # scaffold: balanced and seeded (chemprop), for split variance; deepchem: DeepChem's deterministic
    # ScaffoldSplitter, comparable with published MoleculeNet tables (its seeds vary only the fine-tuning)
    split: Literal["scaffold", "deepchem", "random"] = "scaffold"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seeds: list[int] = Field([0, 1, 2], min_length=1)  # split seeds: which molecules are in which part
    finetune_seeds: list[int] = Field([0], min_length=1)  # head init and batch order, crossed with the split seeds
    modes: list[Literal["finetune", "probe"]] = ["finetune", "probe"]
    # the same splits and seeds for each: random_init (the architecture untrained), Morgan + linear,
    # ECFP4 + random forest, RDKit 2D descriptors + random forest; true = all of them, false = none
    baselines: list[Baseline] = list(BASELINES)
    epochs: int = Field(20, gt=0)
    patience: int = Field(5, gt=0)  # early stopping on the validation primary metric
    # learning rates tried per (checkpoint, task) on the first split and fine-tuning seed, chosen on
    # validation: one lr for every size would confound scale with tuning (ChemBERTa searches 1e-6..1e-4)
    lrs: list[float] = Field([1e-5, 3e-5, 1e-4, 3e-4, 1e-3], min_length=1)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)  # of all fine-tuning steps, then a linear decay to 0
    lr_schedule: Literal["linear", "constant"] = "linear"
    weight_decay: float = Field(0.01, ge=0)
    pooling: Literal["mean", "cls", "last"] = "mean"  # mean: masked-LM pretraining never trains [CLS]
    probe_layer: Literal["last", "best"] = "last"  # best: the layer best on validation
    n_trees: int = Field(500, gt=0)  # random-forest baselines
    batch_size: int = Field(32, gt=0)
    max_molecules: BigInt | None = Field(None, gt=0)  # cap per task (demo speed)
    data_dir: Path | None = None  # local MoleculeNet CSVs; else CLMSCALE_DATA_DIR, else download

    @field_validator("baselines", mode="before")
    @classmethod
    def _all_or_none(cls, value: Any) -> Any:
        if value is True:
            return list(BASELINES)
        return [] if value is False else value

    @field_validator("lrs")
    @classmethod
    def _positive_lrs(cls, lrs: list[float]) -> list[float]:
        if min(lrs) <= 0:
            raise ValueError(f"learning rates must be positive (got {lrs})")
        return sorted(set(lrs))

    @model_validator(mode="after")
    def _fractions(self) -> DownstreamConfig:
        if abs(sum(self.split_fractions) - 1) > 1e-6 or min(self.split_fractions) <= 0:
            raise ValueError(f"split_fractions must be positive and sum to 1 (got {self.split_fractions})")
        return self


class AnalysisConfig(Strict):
    run_after_sweep: bool = False  # `clmscale sweep` then runs `analyze` on its checkpoints
    checkpoints: Literal["final", "all"] = "final"
    # token milestones analysed as well, in every trial that has one (a checkpoint within 2 %, engine.analyze.
    # MILESTONE_RTOL): with per-rung budgets each rung's last checkpoint sits at its own D, and a milestone the
    # rungs share is where downstream trends along N at fixed D can be measured
    tokens: TokenCounts | None = None

    hessian_top_k: int = Field(5, ge=0)  # 0 skips Hessian spectra
    hessian_batches: int = Field(2, gt=0)  # validation batches the Hessian is taken over
    hessian_micro_batch: int = Field(32, gt=0)  # rows per HVP piece: bounds the double backward's activations
    hessian_max_iter: int = Field(60, gt=0)  # Lanczos steps
    hessian_workers: int = Field(1, gt=0)  # Ray Train workers sharing the batches of one HVP (<= hessian_batches)
    hessian_finetune: bool = True  # also the Hessian of each task's fine-tuning loss (needs mode finetune)
    hessian_tf32: bool = False  # TF32 matmuls in the HVPs on GPUs that have them; off until its error is measured
    trace_matvecs: int = Field(30, ge=0)  # 0 skips the trace; Hutch++ needs at least 3
    density_runs: int = Field(2, ge=0)
    landscape_resolution: int = Field(11, ge=0)  # points per axis; 0 skips landscapes
    landscape_span: float = Field(1.0, gt=0)
    landscape_2d: bool = True
    # sharpness radius relative to each tensor's norm (so it does not grow with N by construction), and
    # the ascent steps of adaptive sharpness (Andriushchenko et al. 2023)
    sharpness_rho: float = Field(0.05, gt=0)
    adaptive_rho: float = Field(0.5, gt=0)  # ASAM's radius in the |w|-scaled space (Kwon et al. 2021)
    sharpness_steps: int = Field(10, gt=0)
    # also each task's loss at the pretrained encoder with a probe head: its Hessian (with hessian_top_k > 0)
    # and its sharpness (with landscape_resolution > 0)
    hessian_pretrained_task: bool = True
    hessian_sample_seed: int = 0  # the fine-tuning Hessians read a random sample of train drawn with it
    corpus_sample: int = Field(10_000, gt=0)  # pretraining molecules the tasks' nearest-neighbour similarity uses

    @field_validator("trace_matvecs")
    @classmethod
    def _hutchpp_needs_three(cls, value: int) -> int:
        if value in (1, 2):
            raise ValueError(f"Hutch++ needs at least 3 matvecs (got {value}); 0 skips the trace")
        return value

    @model_validator(mode="after")
    def _workers_have_batches(self) -> AnalysisConfig:
        if self.hessian_workers > self.hessian_batches:
            raise ValueError(
                f"hessian_workers ({self.hessian_workers}) must not exceed hessian_batches "
                f"({self.hessian_batches}): each worker needs a batch of its own"
            )
        return self


class FitsConfig(Strict):
    huber_delta: float = Field(1e-3, gt=0)  # Hoffmann et al. 2022
    n_bootstrap: int = Field(1000, ge=0)
    holdout_rungs: int = Field(1, ge=0)  # largest rungs held out for the extrapolation back-test
    # only annealed checkpoints (a wsd branch end, a schedule's last) are (N, D) points: a mid-schedule
    # one sits at a high learning rate and overstates the loss at its D; false fits them all
    annealed_only: bool = True
    # tokens: D is the tokens seen (Hoffmann et al.); effective: D' discounts repeated tokens, with R* fitted
    # (Muennighoff et al. 2023, fits.powerlaw.DataConstrainedFit): for grids whose points repeat their data
    data_law: Literal["tokens", "effective"] = "tokens"
    # what D counts in the loss law: tokens (of each arm's own tokenizer), or molecules or characters seen
    # (pretrain.parquet's molecules_seen / characters_seen), which do not change with data.representation
    data_measure: Literal["tokens", "molecules", "characters"] = "tokens"
    seed: int = 0
    # equivalence margin of a downstream "plateau", metric -> metric units per decade of scale; a metric not
    # listed keeps its default (fits.verdicts.PLATEAU_MARGINS; the README gives each default's reason)
    plateau_margin: dict[str, Annotated[float, Field(gt=0)]] = {}
    # the run-level interval of a downstream slope (fits.slopes.METHODS): the cluster jackknife (CRV3) is
    # conservative with few runs; cluster (CRV1), a cluster bootstrap, or a mixed model with a random
    # intercept per run (statsmodels MixedLM) instead
    slope_method: Literal["cluster_jackknife", "cluster", "cluster_bootstrap", "mixedlm"] = "cluster_jackknife"


class StorageConfig(Strict):
    root: Path = Path("runs")  # the run dir is root/<name>; on a cluster, a shared mount


class SweepConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: DataConfig
    model: ModelConfig
    budget: BudgetConfig
    seeds: list[int] = Field([0], min_length=1)
    train: TrainConfig = TrainConfig()
    resources: ResourcesConfig = ResourcesConfig()
    downstream: DownstreamConfig = DownstreamConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    fits: FitsConfig = FitsConfig()
    storage: StorageConfig = StorageConfig()

    @property
    def run_dir(self) -> Path:
        return self.storage.root / self.name


# ---------------------------------------------------------------------------------------------
# the grid


class Trial(Strict):
    """One pretraining run: a family, a rung, a budget and a seed (and a masking ratio for the mlm families), with
    that rung's overrides applied; `train.mlm_probability` is one number here."""

    trial_id: str
    family: Family
    size: ModelSize
    representation: Representation = "smiles"  # the molecular string it reads (data.representation)
    budget_tokens: BigInt | None  # set when the budget is in tokens
    budget_epochs: float | None  # set when it is in epochs (tokens known after prepare)
    unique_molecules: BigInt | None = None  # the first n train molecules (budget.unique_molecules); None: all
    seed: int
    train: TrainConfig
    resources: ResourcesConfig

    @model_validator(mode="after")
    def _one_masking_ratio(self) -> Trial:
        if isinstance(self.train.mlm_probability, list):
            raise ValueError(
                f"{self.trial_id}: train.mlm_probability must be one number in a trial "
                f"(got {self.train.mlm_probability})"
            )
        return self

    @property
    def mlm_probability(self) -> float | None:
        """The masking ratio this trial trains with; None for the clm families, which mask nothing."""
        return float(self.train.mlm_probability) if objective(self.family) == "mlm" else None  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> Trial:
        if self.train.micro_batch_size == "auto":
            return self  # made concrete (and checked again) by engine.plan at the sweep's start
        per_step = self.train.micro_batch_size * self.resources.workers
        if self.train.batch_size % per_step:
            raise ValueError(
                f"{self.trial_id}: batch_size must be a multiple of micro_batch_size x workers "
                f"(got batch_size: {self.train.batch_size}, micro_batch_size: {self.train.micro_batch_size}, "
                f"workers: {self.resources.workers})"
            )
        accumulation = self.train.batch_size // per_step
        bf16 = self.train.precision == "bf16" or (self.train.precision == "auto" and self.resources.gpus_per_worker > 0)
        if bf16 and self.train.zero_stage == 0 and accumulation > 1:
            # DeepSpeed 0.19 accumulates bf16 gradients in fp32 only under ZeRO (its BF16_Optimizer, ZeRO 1,
            # or the ZeRO 2/3 optimizers); at stage 0 `data_types.grad_accum_dtype: fp32` is "unsupported"
            # and the micro-steps would add up in bf16 (deepspeed/runtime/engine.py, _do_optimizer_sanity_check)
            raise ValueError(
                f"{self.trial_id}: bf16 at zero_stage 0 would accumulate gradients in bf16 over {accumulation} "
                f"micro-steps (batch_size: {self.train.batch_size}, micro_batch_size: {self.train.micro_batch_size}, "
                f"workers: {self.resources.workers}, precision: {self.train.precision}"
                + (", bf16 on the GPUs" if self.train.precision == "auto" else "")
                + "); use zero_stage: 1 or auto (fp32 accumulation), micro_batch_size: batch_size / workers, "
                "or precision: fp32"
            )
        return self

    @property
    def grad_accumulation_steps(self) -> int:
        if self.train.micro_batch_size == "auto":
            raise ValueError(f"{self.trial_id}: micro_batch_size is still auto; the sweep resolves it (engine.plan)")
        return self.train.batch_size // (self.train.micro_batch_size * self.resources.workers)


def expand_grid(cfg: SweepConfig) -> list[Trial]:
    """Representations x families x sizes x unique data x budgets x seeds x masking ratios, in that nesting order
    (smallest rung first).

    Trial ids read `<rung>[_u<unique>]_<budget>_s<seed>[_<representation>][_<family>][_m<ratio>]`: the unique-data
    tag only with budget.unique_molecules; the representation, family and masking-ratio tags only when that axis is
    a list of several values.
    A grid without these axes keeps the ids it always had, so its run directories resume. The masking ratio is
    an axis of the mlm families only: a clm or llama trial is one trial whatever the list holds, without `_m`.
    A rung's `overrides.tokens` replaces budget.tokens for that rung."""
    problem = axis_problem(cfg)
    if problem is not None:
        raise ValueError(f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}")
    families, ratios = cfg.model.families(), cfg.train.mlm_probabilities()
    representations = cfg.data.representations()
    in_tokens = cfg.budget.tokens is not None
    uniques: list[int | None] = list(cfg.budget.unique_molecules) if cfg.budget.unique_molecules else [None]
    trials = []
    for representation, family in itertools.product(representations, families):
        family_tag = (f"_{representation}" if len(representations) > 1 else "") + (
            f"_{family}" if len(families) > 1 else ""
        )
        masked = objective(family) == "mlm"
        for size in cfg.model.rungs():
            override = cfg.model.overrides.get(size.name, RungOverrides())
            train_update, resources_update = override.split()
            resources = ResourcesConfig.model_validate({**cfg.resources.model_dump(), **resources_update})
            for unique in uniques:
                for budget in override.tokens or cfg.budget.tokens or cfg.budget.epochs or []:
                    for seed in cfg.seeds:
                        for ratio in ratios if masked else ratios[:1]:
                            train = TrainConfig.model_validate(
                                {**cfg.train.model_dump(), **train_update, "mlm_probability": ratio}
                            )
                            tag = f"{_short(budget)}tok" if in_tokens else f"{budget:g}ep"
                            data_tag = "" if unique is None else f"_u{_short(unique)}"
                            ratio_tag = f"_m{ratio:g}" if masked and len(ratios) > 1 else ""
                            trials.append(
                                Trial(
                                    trial_id=f"{size.name}{data_tag}_{tag}_s{seed}{family_tag}{ratio_tag}",
                                    family=family,
                                    size=size,
                                    representation=representation,
                                    budget_tokens=budget if in_tokens else None,
                                    budget_epochs=None if in_tokens else budget,
                                    unique_molecules=unique,
                                    seed=seed,
                                    train=train,
                                    resources=resources,
                                )
                            )
    return trials


def axis_problem(cfg: SweepConfig) -> ErrorDetails | None:
    """A masking-ratio list in a grid with no mlm family (mlm, modernbert): it would vary nothing. A rung's own
    token budgets in a grid whose budgets are in epochs: the two cannot mix."""
    if cfg.budget.epochs is not None:
        for name, override in cfg.model.overrides.items():
            if override.tokens is not None:
                return ErrorDetails(
                    loc=("model", "overrides", name, "tokens"),
                    type="budget_unit",
                    input=override.tokens,
                    msg=(
                        f"rung {name} has its own token budgets, but this grid's budgets are in epochs "
                        "(budget.epochs); give budget.tokens, or leave the rung's tokens out"
                    ),
                )
    if isinstance(cfg.train.mlm_probability, list) and all(objective(f) == "clm" for f in cfg.model.families()):
        return ErrorDetails(
            loc=("train", "mlm_probability"),
            type="axis_without_effect",
            input=cfg.train.mlm_probability,
            msg=(
                f"a list of masking ratios ({cfg.train.mlm_probability}) makes an axis of the mlm families only, and "
                f"model.family is {cfg.model.family} (next-token prediction masks nothing); give one number or add "
                "an mlm family (mlm, modernbert)"
            ),
        )
    return None


def _short(n: float) -> str:
    """1500000 -> '1.5M': trial ids a person can read."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"


# ---------------------------------------------------------------------------------------------
# loading, with errors that point at the YAML line


class SweepFileError(ValueError):
    """A sweep file that cannot be used; the message names the file, line and field."""


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise SweepFileError(f"{path}: no such sweep file")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        opened = getattr(err, "context_mark", None)  # e.g. where an unclosed [ or { began
        if opened and mark and opened.line != mark.line and getattr(err, "context", None):
            problem += f" ({err.context.removeprefix('while parsing ')} opened at line {opened.line + 1})"
        raise SweepFileError(f"{path}{where}: malformed YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise SweepFileError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        cfg = SweepConfig.model_validate(raw)
    except ValidationError as err:
        lines = _line_index(node)
        raise SweepFileError("\n".join(_describe(path, e, lines) for e in err.errors())) from None
    problems = _unknown_references(cfg)
    axis = axis_problem(cfg)
    if axis is not None:
        problems.append(axis)
    if problems:
        lines = _line_index(node)
        raise SweepFileError("\n".join(_describe(path, e, lines) for e in problems))
    return _resolve_paths(cfg, path.parent)


def _unknown_references(cfg: SweepConfig) -> list[ErrorDetails]:
    """Names that point across sections (data.decontaminate -> tasks), as pydantic-style errors."""
    if not isinstance(cfg.data.decontaminate, list):
        return []
    from clmscale.engine.tasks import TASKS  # rdkit and pandas: imported only when a list of names needs checking

    known = [*TASKS, *(t.name for t in cfg.downstream.custom)]
    return [
        ErrorDetails(
            loc=("data", "decontaminate", i),
            type="unknown_task",
            input=name,
            msg=_unknown("task", name, known) + " (registry tasks or downstream.custom names)",
        )
        for i, name in enumerate(cfg.data.decontaminate)
        if name not in known
    ]


def _resolve_paths(cfg: SweepConfig, base: Path) -> SweepConfig:
    """Relative corpus and task paths are relative to the sweep file's folder, else to the CWD."""

    def fix(p: Path) -> Path:
        return p if p.is_absolute() or p.exists() or not (base / p).exists() else base / p

    data = cfg.data.model_copy(update={"corpus": [fix(p) for p in cfg.data.corpus]})
    custom = [t.model_copy(update={"path": fix(t.path)}) for t in cfg.downstream.custom]
    return cfg.model_copy(update={"data": data, "downstream": cfg.downstream.model_copy(update={"custom": custom})})


def with_storage_root(
    cfg: SweepConfig, root: Path | str | None, *, cwd: Path | None = None, source: str = "the sweep file"
) -> SweepConfig:
    """`cfg` with `storage.root` replaced by `root` (from --storage-root or CLMSCALE_STORAGE_ROOT, named by
    `source`) when one is given, checked for where it lands.

    Inside a Ray job submitted with --working-dir, the working directory is Ray's temporary copy of it,
    deleted with the cluster's session: a relative root would put the results there, so it is refused
    before anything runs. Anywhere else a relative root is relative to the working directory, as usual.
    """
    if root is not None and str(root) != "":
        cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"root": Path(root)})})
    copy = ray_job_working_copy(Path.cwd() if cwd is None else cwd)
    if copy is not None and not cfg.storage.root.is_absolute():
        raise SweepFileError(
            f"{source}: storage.root={cfg.storage.root} is relative, and this runs inside a Ray job whose working "
            f"directory is Ray's temporary copy ({copy}), deleted with the cluster's session; pass an absolute "
            "path that every node shares: --storage-root /shared/runs or CLMSCALE_STORAGE_ROOT=/shared/runs"
        )
    return cfg


def ray_job_working_copy(cwd: Path) -> Path | None:
    """The copy of a job's working directory that `cwd` lies in, or None: `ray job submit --working-dir`
    unpacks it under <session>/runtime_resources/working_dir_files/_ray_pkg_<hash>/ and runs the job there."""
    parts = Path(cwd).parts
    for i in range(len(parts) - 2):
        if parts[i] == "runtime_resources" and parts[i + 1] == "working_dir_files":
            return Path(*parts[: i + 3])
    return None


def _line_index(node: yaml.Node | None) -> dict[tuple, int]:
    """Map every key path in the YAML document to its 1-based line number."""
    index: dict[tuple, int] = {}

    def walk(n: yaml.Node, loc: tuple) -> None:
        index.setdefault(loc, n.start_mark.line + 1)  # a key's own line was set first, keep it
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                index[loc + (k.value,)] = k.start_mark.line + 1
                walk(v, loc + (k.value,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, loc + (i,))

    if node is not None:
        walk(node, ())
    return index


def _describe(path: Path, error: ErrorDetails, lines: dict[tuple, int]) -> str:
    # pydantic adds union-branch tags such as 'str' or 'ModelSize' to loc; keep only real keys
    loc = tuple(p for p in error["loc"] if isinstance(p, int) or p in _ALL_FIELDS or _in_yaml(lines, p))
    field = ".".join(str(p) for p in loc) or "(top level)"
    line = next((lines[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in lines), None)
    where = f"{path}:{line}" if line else str(path)
    msg = error["msg"]
    if error["type"] == "extra_forbidden":
        msg = _unknown("key", str(loc[-1]), _fields_at(loc[:-1]))
    elif error["type"] == "missing":
        msg = "required field is missing"
    elif isinstance(error.get("input"), str | int | float | bool):
        msg = f"{msg} (got {error['input']!r})"
    return f"{where}: {field}: {msg}"


def _unknown(what: str, got: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(got, choices, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(sorted(choices))}"
    return f"unknown {what} '{got}'{hint}"


def _in_yaml(lines: dict[tuple, int], key: object) -> bool:
    return any(key in loc for loc in lines)


def _fields_at(loc: tuple) -> list[str]:
    """The field names that are allowed at a location in the document."""
    model: type[BaseModel] | None = SweepConfig
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        info = model.model_fields.get(str(part))
        model = _model_of(info.annotation) if info else None
    return list(model.model_fields) if model else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found:
            return found
    return None


def _collect_fields(model: type[BaseModel], out: set[str]) -> set[str]:
    for name, info in model.model_fields.items():
        out.add(name)
        sub = _model_of(info.annotation)
        if sub is not None and sub is not model:
            _collect_fields(sub, out)
    return out


_ALL_FIELDS = _collect_fields(SweepConfig, set())
