"""Downstream transfer of a pretrained checkpoint: fine-tune or probe it on a MoleculeNet-style task.

The story, in order: a task arrives as plain arrays (`FinetuneData`: SMILES, float32 labels with
NaN for missing, a split, the metric that selects on validation); the metrics themselves live in
engine/metrics.py (ROC-AUC and PRC-AUC, or RMSE and MAE, all computed for every run); the masked
loss follows; then the checkpoint is loaded as an encoder (`load_encoder`), each SMILES is encoded
the way pretraining saw it (mlm `[CLS] ... [SEP]`, clm `[BOS] ... [EOS]`), and one vector per
molecule is pooled from a layer's hidden states (`pool`):

    mean  the mask-aware mean over the molecule's tokens, specials included (the default, both families:
          masked-LM pretraining never trains the [CLS] vector, so a [CLS] probe under-reads an MLM)
    cls   the first token, [CLS] (mlm only; RoBERTa's own choice for sequence heads)
    last  the last real token ([SEP] / [EOS]): under causal attention the only one that has seen the molecule

`finetune(..., mode="finetune")` trains encoder + linear head with AdamW under a warmup + linear
decay schedule, early-stopped on the validation primary metric with the best weights restored; a
run whose best epoch is 0 or whose loss became non-finite carries a `flag`. `select_lr` runs that
at each learning rate of a grid on one split and picks on validation. `mode="probe"` freezes the
encoder, embeds every molecule once (from the last layer, or from the layer best on validation)
and fits an L2-regularised linear model on the embeddings by L-BFGS, with the penalty chosen on the
validation split (the linear evaluation of Chen et al. 2020, SimCLR, sec. B.5).
`fingerprint_baseline` fits the same linear model on Morgan fingerprints, so the probe and the
no-pretraining baseline differ only in their features; `random_init=True` gives the other baseline,
the same architecture with fresh weights (engine/baselines.py has the random-forest ones).

Seeds: `split_seed` says which molecules are in which part (it made `data.split`; here it is only
recorded), `finetune_seed` drives the head's initialisation, random-init weights and batch order.

Nothing here imports ray: the Ray task that runs these functions lives with the sweep.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import scipy.optimize
import scipy.special
import torch
import torch.nn.functional as F
from torch import nn

from clmscale.engine.ladder import Family, objective
from clmscale.engine.metrics import HIGHER_IS_BETTER, METRICS, better
from clmscale.engine.metrics import scores as metric_scores
from clmscale.engine.rundir import head_file

log = logging.getLogger(__name__)

TaskType = Literal["classification", "regression"]
Mode = Literal["finetune", "probe"]
Pooling = Literal["mean", "cls", "last"]
LrSchedule = Literal["linear", "constant"]
POOLINGS = ("mean", "cls", "last")
FLAGS = ("best_epoch_0", "non_finite_loss")  # "" for a run with neither

SPLIT_NAMES = ("train", "val", "test")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
L2_GRID = tuple(10.0**p for p in range(-2, 5))  # penalties tried on the validation split, per linear fit


# ---------------------------------------------------------------------------------------------
# the task, as plain arrays


@dataclass(frozen=True, eq=False)  # eq=False: fields are arrays
class FinetuneData:
    """One task on one split. `labels` is [n, k] float32 with NaN where a label is missing.

    n_classes=None: k independent binary (or regression) columns; n_classes=C: one column of
    class indices 0..C-1 (multi-class). `split` holds the train, val and test row indices.
    `primary_metric` selects epochs, penalties, layers and learning rates on val (default roc_auc or
    rmse; pass the registry's `TaskData.primary_metric`, e.g. prc_auc for MUV).
    """

    smiles: Sequence[str]
    labels: np.ndarray
    task_type: TaskType
    split: tuple[np.ndarray, np.ndarray, np.ndarray]
    n_classes: int | None = None
    name: str = "task"  # only for messages and the result dict
    primary_metric: str = ""  # "": the task type's default

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.float32)
        if labels.ndim == 1:
            labels = labels[:, None]
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "split", tuple(np.asarray(i, dtype=np.int64).reshape(-1) for i in self.split))
        if not self.primary_metric and self.task_type in METRICS:
            object.__setattr__(self, "primary_metric", metric_name(self.task_type))
        _validate(self)

    @property
    def n_outputs(self) -> int:
        return self.n_classes or self.labels.shape[1]

    def part(self, split_name: str) -> np.ndarray:
        return self.split[SPLIT_NAMES.index(split_name)]


def _validate(data: FinetuneData) -> None:
    """Every check that would otherwise surface as a NaN metric an hour into a sweep."""
    name, labels = data.name, data.labels
    if data.task_type not in ("classification", "regression"):
        raise ValueError(f"{name}: task_type must be 'classification' or 'regression' (got {data.task_type!r})")
    if data.primary_metric not in METRICS[data.task_type]:
        raise ValueError(f"{name}: primary_metric must be one of {METRICS[data.task_type]} for {data.task_type} "
                         f"(got {data.primary_metric!r})")  # fmt: skip
    if labels.ndim != 2 or labels.shape[0] != len(data.smiles):
        raise ValueError(
            f"{name}: labels must be [n_molecules, n_labels] with one row per SMILES "
            f"(got labels {labels.shape} for {len(data.smiles)} SMILES)"
        )
    observed = labels[~np.isnan(labels)]
    if data.n_classes is not None:
        if data.task_type != "classification" or data.n_classes < 2 or labels.shape[1] != 1:
            raise ValueError(
                f"{name}: n_classes={data.n_classes} needs task_type 'classification' and one label column "
                f"(got task_type {data.task_type!r} and {labels.shape[1]} columns)"
            )
        bad = observed[(observed != np.round(observed)) | (observed < 0) | (observed >= data.n_classes)]
        if bad.size:
            raise ValueError(f"{name}: class labels must be integers 0..{data.n_classes - 1} (got {bad[0]:g})")
    elif data.task_type == "classification":
        bad = observed[(observed != 0) & (observed != 1)]
        if bad.size:
            raise ValueError(f"{name}: binary labels must be 0, 1 or NaN (got {bad[0]:g}); multi-class needs n_classes")
    if len(data.split) != 3:
        raise ValueError(f"{name}: split must be (train_idx, val_idx, test_idx) (got {len(data.split)} arrays)")
    n = len(data.smiles)
    for split_name, idx in zip(SPLIT_NAMES, data.split, strict=True):
        if idx.size == 0:
            raise ValueError(f"{name}: the {split_name} split is empty")
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"{name}: {split_name} indices must lie in [0, {n}) (got {idx.min()}..{idx.max()})")
    for (a_name, a), (b_name, b) in itertools.combinations(zip(SPLIT_NAMES, data.split, strict=True), 2):
        shared = np.intersect1d(a, b)
        if shared.size:
            raise ValueError(
                f"{name}: the {a_name} and {b_name} splits share {shared.size} molecules (e.g. row {shared[0]})"
            )
    for split_name, idx in zip(SPLIT_NAMES, data.split, strict=True):
        part = labels[idx]
        if np.isnan(part).all():
            raise ValueError(f"{name}: the {split_name} split ({idx.size} molecules) has no labels, only NaN")
        if data.task_type == "classification" and split_name != "train" and not _has_both_classes(part, data.n_classes):
            raise ValueError(
                f"{name}: the {split_name} split ({idx.size} molecules) has a single class in every label column, "
                f"so ROC-AUC is undefined; use another split or seed"
            )


def _has_both_classes(labels: np.ndarray, n_classes: int | None) -> bool:
    if n_classes is not None:
        return np.unique(labels[~np.isnan(labels)]).size >= 2
    return any(np.unique(col[~np.isnan(col)]).size == 2 for col in labels.T)


# ---------------------------------------------------------------------------------------------
# metrics


def metric_name(task_type: TaskType) -> str:
    """The default primary metric of a task type (the one the registry's `Task.metric` names)."""
    return "roc_auc" if task_type == "classification" else "rmse"


def task_metric(data: FinetuneData, idx: np.ndarray, predictions: np.ndarray) -> float:
    """The task's primary metric on rows `idx`; predictions are in label units (scores, probabilities or values)."""
    return task_metrics(data, idx, predictions)[data.primary_metric]


def task_metrics(data: FinetuneData, idx: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Every metric of the task's type on rows `idx`, by name."""
    return metric_scores(data.task_type, data.labels[idx], predictions, data.n_classes)


def split_metrics(data: FinetuneData, predictions: np.ndarray) -> dict[str, Any]:
    """val and test of every metric from predictions for all rows: {"val", "test", "metrics": {m: {"val", "test"}}}."""
    _, val_idx, test_idx = data.split
    val, test = task_metrics(data, val_idx, predictions[val_idx]), task_metrics(data, test_idx, predictions[test_idx])
    return {"val": val[data.primary_metric], "test": test[data.primary_metric],
            "metrics": {m: {"val": val[m], "test": test[m]} for m in val}}  # fmt: skip


def task_loss(data: FinetuneData, idx: np.ndarray, predictions: np.ndarray) -> float:
    """The training objective on rows idx, from predictions in label units (binary: logits, multi-class:
    probabilities, regression: values): mean BCE / NLL over labelled entries, or the MSE of labels
    standardised by the train split (what `masked_loss` minimises). The task ladder's task loss."""
    labels = data.labels[idx]
    if data.n_classes is not None:
        y = labels[:, 0]
        keep = ~np.isnan(y)
        p = np.clip(predictions[keep, y[keep].astype(np.int64)], 1e-12, 1.0)
        return float(-np.log(p).mean()) if keep.any() else math.nan
    observed = ~np.isnan(labels)
    if not observed.any():
        return math.nan
    if data.task_type == "classification":
        z, y = predictions[observed], labels[observed]
        return float(np.mean(np.logaddexp(0.0, z) - y * z))  # BCE with logits, stable
    mean, std = _label_scale(data)
    return float(np.mean((((predictions - labels) / std)[observed]) ** 2))


# ---------------------------------------------------------------------------------------------
# the masked loss


def n_labelled(labels: torch.Tensor, n_classes: int | None = None) -> int:
    """The entries `masked_loss` averages over: non-NaN labels (the first column for multi-class)."""
    observed = ~torch.isnan(labels)
    return int((observed[:, 0] if n_classes is not None else observed).sum())


def masked_loss(
    outputs: torch.Tensor, labels: torch.Tensor, task_type: TaskType, n_classes: int | None = None
) -> torch.Tensor:
    """Mean loss over the labelled entries; NaN labels give neither loss nor gradient.

    outputs (B, k) logits or standardised values, multi-class (B, C); labels (B, k) with NaN for missing.
    BCE-with-logits per column (Tox21-style multi-task), cross-entropy for multi-class, MSE for regression.
    """
    observed = ~torch.isnan(labels)  # (B, k)
    targets = torch.where(observed, labels, torch.zeros_like(labels))
    if n_classes is not None:
        observed = observed[:, 0]  # (B,)
        per_entry = F.cross_entropy(outputs, targets[:, 0].long(), reduction="none")
    elif task_type == "classification":
        per_entry = F.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
    else:
        per_entry = (outputs - targets) ** 2
    # torch.where, not a multiply: the unselected branch gets an exact zero gradient
    total = torch.where(observed, per_entry, torch.zeros_like(per_entry)).sum()
    return total / observed.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# the checkpoint as an encoder


def load_encoder(checkpoint_dir: Path, *, random_init: bool = False) -> tuple[nn.Module, Any, Family]:
    """The checkpoint's encoder (no LM head), its tokenizer and its family (engine.ladder.Family).

    `AutoModel` gives RobertaModel for a RobertaForMaskedLM checkpoint, GPT2Model for GPT2LMHeadModel,
    LlamaModel for LlamaForCausalLM and ModernBertModel for ModernBertForMaskedLM. random_init: the
    same config with fresh weights (seed the RNG first).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # slow import, kept off module load

    from clmscale.engine.models import family_of

    checkpoint_dir = Path(checkpoint_dir)
    _check_checkpoint(checkpoint_dir, need_weights=not random_init)
    config = AutoConfig.from_pretrained(checkpoint_dir)
    family = family_of(config)
    # [CLS] is pooled by us, not by RoBERTa's tanh pooler (the other families have none)
    kwargs: dict[str, Any] = {"add_pooling_layer": False} if family == "mlm" else {}
    kwargs["dtype"] = torch.float32  # a bf16 pretraining checkpoint is fine-tuned in fp32, like its linear head
    if random_init:
        encoder = AutoModel.from_config(config, **kwargs)
    else:
        encoder = AutoModel.from_pretrained(checkpoint_dir, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    pad_id = getattr(config, "pad_token_id", None)
    if family == "mlm" and pad_id is not None and pad_id != tokenizer.pad_token_id:
        log.warning(
            "%s: config.pad_token_id=%s but the tokenizer pads with %s; RoBERTa derives positions from "
            "pad_token_id, so positions will be off",
            checkpoint_dir,
            pad_id,
            tokenizer.pad_token_id,
        )
    return encoder, tokenizer, family


def _check_checkpoint(checkpoint_dir: Path, need_weights: bool) -> None:
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint_dir}: no such checkpoint directory")
    missing = []
    if not (checkpoint_dir / "config.json").is_file():
        missing.append("config.json")
    if need_weights and not any((checkpoint_dir / f).is_file() for f in WEIGHT_FILES):
        missing.append("weights (model.safetensors or pytorch_model.bin, or their sharded index)")
    if not (checkpoint_dir / "tokenizer.json").is_file():
        missing.append("tokenizer.json")
    if missing:
        raise FileNotFoundError(f"{checkpoint_dir}: not a save_pretrained checkpoint, missing {', '.join(missing)}")


def max_positions(config: Any) -> int:
    """Longest sequence, specials included, that the position embeddings cover."""
    n = config.max_position_embeddings  # GPT2Config maps this to n_positions
    if config.model_type == "roberta":
        n -= config.pad_token_id + 1  # RoBERTa positions start at pad_token_id + 1
    return n


# ---------------------------------------------------------------------------------------------
# SMILES -> ids -> pooled vectors


class Encoded(NamedTuple):
    ids: list[list[int]]  # per molecule, wrapped in the family's special tokens
    unk_fraction: float  # of the SMILES tokens (specials not counted), mapped to [UNK]
    truncated_fraction: float  # of the molecules, cut to max_len


def encode_smiles(tokenizer: Any, smiles: Sequence[str], family: Family, max_len: int) -> Encoded:
    """Token ids per molecule wrapped as in pretraining (CONTRACTS.md), the fraction of [UNK] tokens and the
    fraction of molecules cut short. `smiles` should already be the corpus's canonical form (engine.analyze
    passes them through engine.prepare.canonical_smiles), the spelling the model was pretrained on."""
    masked = objective(family) == "mlm"
    if masked:
        first, last = tokenizer.cls_token_id, tokenizer.sep_token_id
    else:
        first, last = tokenizer.bos_token_id, tokenizer.eos_token_id
    if first is None or last is None:
        wanted = "[CLS]/[SEP]" if masked else "[BOS]/[EOS]"
        raise ValueError(f"the tokenizer has no {wanted} tokens, which a {family} model was pretrained with")
    encodings = tokenizer.backend_tokenizer.encode_batch(list(smiles), add_special_tokens=False)
    ids, n_truncated, n_unk, n_tokens = [], 0, 0, 0
    for encoding in encodings:
        body = encoding.ids
        n_unk += body.count(tokenizer.unk_token_id)
        n_tokens += len(body)
        if len(body) > max_len - 2:
            body = body[: max_len - 2]
            n_truncated += 1
        ids.append([first, *body, last])
    if n_truncated:
        log.warning("%d of %d SMILES truncated to %d tokens", n_truncated, len(ids), max_len)
    return Encoded(ids, n_unk / max(n_tokens, 1), n_truncated / max(len(ids), 1))


def _batches(
    ids: list[list[int]], rows: np.ndarray, batch_size: int, pad_id: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(rows, input_ids, attention_mask) per batch, right-padded to the longest molecule in the batch."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        length = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for b, i in enumerate(chunk):
            input_ids[b, : len(ids[i])] = torch.tensor(ids[i])
            attention_mask[b, : len(ids[i])] = 1
        yield chunk, input_ids, attention_mask


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling = "mean") -> torch.Tensor:
    """(B, T, H) -> (B, H): the mean over real tokens, the first token or the last real one (padding on the right)."""
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = attention_mask.sum(dim=1) - 1  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling must be one of {', '.join(map(repr, POOLINGS))} (got {pooling!r})")


def _check_pooling(pooling: str, family: Family) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(map(repr, POOLINGS))} (got {pooling!r})")
    if pooling == "cls" and objective(family) == "clm":
        raise ValueError("pooling 'cls' reads the first token, which under causal attention has seen only [BOS]; "
                         f"use 'mean' or 'last' for a {family} checkpoint")  # fmt: skip


class EncoderWithHead(nn.Module):
    """The pretrained encoder, a pooling of its hidden states and one linear layer to the task's outputs."""

    def __init__(self, encoder: nn.Module, family: Family, n_outputs: int, pooling: Pooling = "mean"):
        super().__init__()
        _check_pooling(pooling, family)
        self.encoder = encoder
        self.family = family
        self.pooling = pooling
        self.head = nn.Linear(encoder.config.hidden_size, n_outputs)  # type: ignore[union-attr,arg-type]  # a transformers model

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return pool(hidden, attention_mask, self.pooling)  # (B, H)

    def embed_layers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(n_layer + 1, B, H): the pooled embedding output and every layer's; the last equals `embed`."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return torch.stack([pool(h, attention_mask, self.pooling) for h in out.hidden_states])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))  # (B, n_outputs)


# ---------------------------------------------------------------------------------------------
# fine-tuning and probing


def finetune(
    checkpoint_dir: Path,
    data: FinetuneData,
    *,
    mode: Mode,
    epochs: int,
    patience: int,
    lr: float,
    batch_size: int,
    split_seed: int | None = None,
    finetune_seed: int | None = None,
    seed: int | None = None,
    max_seq_len: int | None = None,
    device: str | torch.device | None = None,
    random_init: bool = False,
    save_to: Path | None = None,
    pooling: Pooling = "mean",
    probe_layer: Literal["last", "best"] | int = "last",
    warmup_fraction: float = 0.1,
    lr_schedule: LrSchedule = "linear",
    weight_decay: float = 0.01,
    freeze_encoder: bool = False,
) -> dict[str, Any]:
    """Downstream score of one checkpoint on one task split: a dict ready to be a results row.

    mode "finetune": encoder + linear head trained with AdamW, the learning rate warmed up linearly
    from 0 to `lr` over `warmup_fraction` of epochs x batches, then decayed linearly to 0 at the last
    epoch ("linear"; "constant" holds it after the warmup), one validation pass per epoch, stopped
    after `patience` epochs without improvement of the primary metric, best weights restored (epoch
    0 is the untrained head). A loss that turns non-finite ends training at once. `flag` is
    "non_finite_loss", else "best_epoch_0" (the fine-tuned model is the pretrained one with a fresh
    head: the lr was wrong, not the checkpoint), else "".
    mode "probe": frozen encoder, embeddings computed once, an L2 linear model fitted by L-BFGS with
    the penalty chosen on val; epochs, patience, lr and the schedule are unused. probe_layer "last",
    an index (0 is the embedding output), or "best": every layer probed and the one best on val kept.
    save_to (finetune only): the fine-tuned encoder's state_dict as safetensors, keyed as in
    `AutoModel.from_pretrained(checkpoint_dir)`, for the pretrained -> fine-tuned landscape direction,
    and the head beside it (`head_file(save_to)`), for the Hessian of the fine-tuning loss.
    `split_seed` is recorded only (it made data.split); `finetune_seed` seeds everything here, and a
    run is deterministic for it; the global torch RNG is restored afterwards. `seed` is the old single
    seed (engine/analyze.py passes it until it passes the two): it sets both.
    freeze_encoder (finetune only): train the head alone on the frozen pretrained encoder, the probe head
    of the task loss at the pretrained weights; save_to then writes only the head (the encoder is the
    checkpoint's).
    """
    split_seed, finetune_seed = _seeds(split_seed, finetune_seed, seed)
    if mode not in ("finetune", "probe"):
        raise ValueError(f"mode must be 'finetune' or 'probe' (got {mode!r})")
    if max_seq_len is not None and max_seq_len < 3:
        raise ValueError(f"max_seq_len must leave room for two special tokens and one atom (got {max_seq_len})")
    if not 0 <= warmup_fraction < 1 or lr_schedule not in ("linear", "constant"):
        raise ValueError(f"need 0 <= warmup_fraction < 1 and lr_schedule 'linear' or 'constant' "
                         f"(got {warmup_fraction}, {lr_schedule!r})")  # fmt: skip
    t0 = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(finetune_seed)  # the head, random_init weights and dropout; restored on exit
        encoder, tokenizer, family = load_encoder(checkpoint_dir, random_init=random_init)
        max_len = int(min(max_seq_len or math.inf, max_positions(encoder.config)))  # finite: max_positions is
        ids, unk_fraction, truncated_fraction = encode_smiles(tokenizer, data.smiles, family, max_len)
        model = EncoderWithHead(encoder, family, data.n_outputs, pooling).to(device)
        if freeze_encoder:
            model.encoder.requires_grad_(False)  # AdamW skips parameters without a gradient
        if mode == "probe":
            result = _probe(model, data, ids, batch_size, tokenizer.pad_token_id, device, probe_layer)
        else:
            result = _train(model, data, ids, epochs, patience, lr, batch_size, finetune_seed, tokenizer.pad_token_id,
                            device, warmup_fraction=warmup_fraction, lr_schedule=lr_schedule,
                            weight_decay=weight_decay)  # fmt: skip
            result.update(lr=lr, warmup_fraction=warmup_fraction, lr_schedule=lr_schedule, weight_decay=weight_decay)
            if save_to is not None:
                result["weights_path"] = str(
                    _save_finetuned(model, Path(save_to), checkpoint_dir, data, finetune_seed, head_only=freeze_encoder)
                )
    return result_row(
        data, mode, result, split_seed, t0, finetune_seed=finetune_seed,
        checkpoint_dir=str(checkpoint_dir), random_init=random_init, unk_fraction=unk_fraction,
        truncated_fraction=truncated_fraction, pooling=pooling,
    )  # fmt: skip


def _seeds(split_seed: int | None, finetune_seed: int | None, seed: int | None) -> tuple[int, int]:
    if seed is not None and split_seed is None and finetune_seed is None:
        return seed, seed
    if seed is not None or split_seed is None or finetune_seed is None:
        raise TypeError(f"pass split_seed and finetune_seed (got split_seed={split_seed}, "
                        f"finetune_seed={finetune_seed}, seed={seed}); seed alone is the old single seed")  # fmt: skip
    return split_seed, finetune_seed


def result_row(
    data: FinetuneData, mode: str, fit: dict[str, Any], split_seed: int, t0: float, **extra: Any
) -> dict[str, Any]:
    """One row of results/finetune: the same keys for every mode and baseline.

    `metric`, `val` and `test` are the primary metric's; `metrics` holds every metric of the task
    type as {name: {"val", "test"}} (`metric_rows` makes one row per metric from it).
    """
    train_idx, val_idx, test_idx = data.split
    row = {
        "task": data.name,
        "mode": mode,  # finetune | probe | morgan_fp | ecfp4_rf | rdkit2d_rf
        "checkpoint_dir": None,
        "random_init": False,
        "seed": split_seed,  # the old name of split_seed, kept for readers of earlier rows
        "split_seed": split_seed,  # which molecules are in which part
        "finetune_seed": None,  # init and batch order (finetune, probe), the forest's seed (random forests)
        "metric": data.primary_metric,
        "higher_is_better": HIGHER_IS_BETTER[data.primary_metric],
        "test": fit["test"],
        "val": fit["val"],
        "val_loss": fit.get("val_loss", math.nan),  # the objective on val (finetune, probe, morgan_fp): the task loss
        "metrics": fit["metrics"],
        "flag": fit.get("flag", ""),  # finetune: best_epoch_0 / non_finite_loss; such rows stay out of means
        "best_epoch": fit.get("best_epoch"),  # finetune only; 0 is the untrained head
        "n_epochs": fit.get("n_epochs", 0),
        "lr": fit.get("lr"),  # finetune only
        "lr_schedule": fit.get("lr_schedule"),
        "warmup_fraction": fit.get("warmup_fraction"),
        "weight_decay": fit.get("weight_decay"),
        "l2": fit.get("l2"),  # probe and morgan_fp: the penalty chosen on val
        "pooling": None,  # finetune and probe: mean | cls | last
        "probe_layer": fit.get("probe_layer"),  # probe: the hidden layer read (0 = embeddings), chosen or given
        "n_layers_probed": fit.get("n_layers_probed"),  # probe: 1, or every layer with probe_layer "best"
        "n_train": int(train_idx.size),
        "n_val": int(val_idx.size),
        "n_test": int(test_idx.size),
        "unk_fraction": None,  # finetune and probe: [UNK] share of the task's tokens
        "truncated_fraction": None,  # finetune and probe: share of the task's molecules cut to the model's length
        "wall_s": time.perf_counter() - t0,
        "weights_path": fit.get("weights_path"),
        "history": fit.get("history", []),
    }
    row.update(extra)
    return row


def metric_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per metric of a result (metric, higher_is_better, primary, value = test, val_value), for long tables."""
    return [
        {"metric": m, "higher_is_better": HIGHER_IS_BETTER[m], "primary": m == result["metric"],
         "value": v["test"], "val_value": v["val"]}
        for m, v in result["metrics"].items()
    ]  # fmt: skip


def _schedule(optimizer: torch.optim.Optimizer, n_steps: int, warmup_fraction: float, lr_schedule: LrSchedule):
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    n_warmup = round(warmup_fraction * n_steps)
    if lr_schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, n_warmup)
    return get_linear_schedule_with_warmup(optimizer, n_warmup, n_steps)


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _train(
    model: EncoderWithHead,
    data: FinetuneData,
    ids: list[list[int]],
    epochs: int,
    patience: int,
    lr: float,
    batch_size: int,
    seed: int,
    pad_id: int,
    device: torch.device,
    *,
    warmup_fraction: float,
    lr_schedule: LrSchedule,
    weight_decay: float,
) -> dict[str, Any]:
    train_idx, val_idx, _ = data.split
    mean, std = _label_scale(data)
    targets = torch.from_numpy((data.labels - mean) / std)  # (n, k); NaN stays NaN
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    # planned over every epoch: early stopping cuts the decay short rather than compressing it
    scheduler = _schedule(optimizer, epochs * math.ceil(train_idx.size / batch_size), warmup_fraction, lr_schedule)
    shuffle = torch.Generator().manual_seed(seed)
    metric = data.primary_metric

    def predict_scored() -> np.ndarray:
        """Predictions for the val and test rows (NaN elsewhere): what `split_metrics` reads, without a train pass."""
        rows = np.concatenate(data.split[1:])
        out = np.full((len(ids), data.n_outputs), np.nan)
        out[rows] = _predict(model, data, ids, rows, batch_size, pad_id, device, mean, std)
        return out

    def evaluate() -> float:
        return task_metric(data, val_idx, _predict(model, data, ids, val_idx, batch_size, pad_id, device, mean, std))

    best_val, best_epoch = evaluate(), 0
    best_state = _copy_state(model)
    history = [{"epoch": 0, "train_loss": None, "val": best_val}]
    epoch, non_finite = 0, False
    for epoch in range(1, epochs + 1):
        model.train()
        order = train_idx[torch.randperm(train_idx.size, generator=shuffle).numpy()]
        losses = []
        for rows, input_ids, attention_mask in _batches(ids, order, batch_size, pad_id):
            y = targets[rows].to(device)
            if torch.isnan(y).all():
                continue  # nothing labelled in this batch (sparse multi-task labels)
            loss = masked_loss(
                model(input_ids.to(device), attention_mask.to(device)), y, data.task_type, data.n_classes
            )
            losses.append(loss.item())  # note: a device sync per step; negligible next to the backward pass
            if not math.isfinite(losses[-1]):
                non_finite = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
        non_finite = non_finite or not _finite(model)  # the last step can overflow the weights with a finite loss
        train_loss = float(np.mean(losses)) if losses else None
        if non_finite:
            history.append({"epoch": epoch, "train_loss": train_loss, "val": math.nan})
            log.warning("%s epoch %d: the loss became non-finite at lr %g; stopping, best epoch %d kept",
                        data.name, epoch, lr, best_epoch)  # fmt: skip
            break
        val = evaluate()
        history.append({"epoch": epoch, "train_loss": train_loss, "val": val, "lr": scheduler.get_last_lr()[0]})
        log.info("%s epoch %d: train loss %s, val %s %.4f", data.name, epoch, train_loss, metric, val)
        if better(metric, val, best_val):
            best_val, best_epoch, best_state = val, epoch, _copy_state(model)
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    flag = "non_finite_loss" if non_finite else "best_epoch_0" if best_epoch == 0 else ""
    # every metric recomputed from the restored weights, so a failed restore cannot go unnoticed
    predictions = predict_scored()
    return {**split_metrics(data, predictions), "val_loss": task_loss(data, val_idx, predictions[val_idx]),
            "best_epoch": best_epoch, "n_epochs": epoch, "history": history, "flag": flag}  # fmt: skip


def select_lr(
    checkpoint_dir: Path,
    data: FinetuneData,
    lrs: Sequence[float],
    *,
    split_seed: int,
    finetune_seed: int,
    **finetune_kwargs: Any,
) -> dict[str, Any]:
    """Fine-tune at every learning rate of a grid on one split and choose the best on validation.

    Meant for the first split seed; every split seed is then run at the chosen lr. Flagged runs
    (best epoch 0, non-finite loss) cannot be chosen. Returns {"lr" (None if every run is flagged),
    "metric", "higher_is_better", "val", "n_flagged", "records"}: one record per lr with its val
    metrics, best_epoch, n_epochs, flag and wall_s. Test numbers are left out of the records on purpose:
    the test split is read once, at the chosen lr (making-a-claim.md, "choose on validation").
    """
    lrs = sorted(float(lr) for lr in lrs)
    if not lrs or min(lrs) <= 0:
        raise ValueError(f"lrs must be a non-empty list of positive learning rates (got {lrs})")
    kwargs = {"mode": "finetune", **finetune_kwargs}
    if kwargs["mode"] != "finetune" or "save_to" in kwargs:
        raise ValueError("select_lr fine-tunes (mode 'finetune') and saves nothing; save at the chosen lr instead")
    metric = data.primary_metric
    records, best = [], None
    for lr in lrs:
        row = finetune(checkpoint_dir, data, lr=lr, split_seed=split_seed, finetune_seed=finetune_seed, **kwargs)
        records.append({"lr": lr, "val": row["val"], "val_metrics": {m: v["val"] for m, v in row["metrics"].items()},
                        "best_epoch": row["best_epoch"], "n_epochs": row["n_epochs"], "flag": row["flag"],
                        "wall_s": row["wall_s"]})  # fmt: skip
        if not row["flag"] and better(metric, row["val"], math.nan if best is None else best["val"]):
            best = records[-1]  # ties keep the smaller lr
    n_flagged = sum(bool(r["flag"]) for r in records)
    if best is None:
        log.warning("%s: every lr in %s was flagged (%s)", data.name, lrs, [r["flag"] for r in records])
    return {
        "lr": None if best is None else best["lr"], "metric": metric, "higher_is_better": HIGHER_IS_BETTER[metric],
        "val": math.nan if best is None else best["val"], "n_flagged": n_flagged, "records": records,
        "split_seed": split_seed, "finetune_seed": finetune_seed,
    }  # fmt: skip


def _label_scale(data: FinetuneData) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std of the train labels for regression (identity for classification)."""
    k = data.labels.shape[1]
    if data.task_type != "regression":
        return np.zeros(k, np.float32), np.ones(k, np.float32)
    train = data.labels[data.split[0]]
    mean = np.nanmean(train, axis=0)
    std = np.nanstd(train, axis=0)
    std = np.where(std > 0, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


@torch.no_grad()
def _predict(
    model: EncoderWithHead,
    data: FinetuneData,
    ids: list[list[int]],
    idx: np.ndarray,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    mean: np.ndarray,
    std: np.ndarray,
) -> np.ndarray:
    """Predictions in label units for rows idx: logits (binary), probabilities (multi-class) or values."""
    model.eval()
    outputs = [
        model(input_ids.to(device), attention_mask.to(device)).float().cpu()
        for _, input_ids, attention_mask in _batches(ids, idx, batch_size, pad_id)
    ]
    out = torch.cat(outputs).numpy().astype(np.float64)  # (n, n_outputs)
    if data.n_classes is not None:
        return scipy.special.softmax(out, axis=1)
    return out * std + mean


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_finetuned(
    model: EncoderWithHead, path: Path, checkpoint_dir: Path, data: FinetuneData, seed: int, head_only: bool = False
) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"checkpoint_dir": str(checkpoint_dir), "task": data.name, "seed": str(seed), "pooling": model.pooling}
    modules = [(model.head, head_file(path))] if head_only else [(model.encoder, path), (model.head, head_file(path))]
    for module, target in modules:
        # clone: no shared storage
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
        save_file(state, str(target), metadata=metadata)
    return path


def finetuning_loss(
    checkpoint_dir: Path,
    data: FinetuneData,
    weights: Path,
    *,
    n_batches: int,
    batch_size: int,
    device: str | torch.device = "cpu",
    sample_seed: int | None = None,
    pretrained_encoder: bool = False,
) -> tuple[EncoderWithHead, Any, list[dict[str, torch.Tensor]]]:
    """The fine-tuning loss at the fine-tuned weights, in the form `engine.hessian.spectrum` takes.

    Returns (model, loss_fn, batches): the encoder and head that `finetune(save_to=weights)` saved
    (with the pooling it was trained with), `loss_fn(model, batch)` the training objective
    (`masked_loss` on standardised labels, as in training), and `n_batches` training batches that
    hold a label: the first in split order, or with `sample_seed` a random sample of the train rows,
    so the Hessian does not depend on how the file happens to be sorted. pretrained_encoder: the
    checkpoint's own encoder with the head saved by `finetune(freeze_encoder=True, save_to=weights)`:
    the task loss at the pretrained weights.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(head_file(Path(weights))), framework="pt") as f:
        pooling = (f.metadata() or {}).get("pooling", "mean")
    encoder, tokenizer, family = load_encoder(checkpoint_dir)
    if not pretrained_encoder:
        encoder.load_state_dict(load_file(str(weights)))
    model = EncoderWithHead(encoder, family, data.n_outputs, pooling)
    model.head.load_state_dict(load_file(str(head_file(Path(weights)))))
    model.to(device)
    ids = encode_smiles(tokenizer, data.smiles, family, max_positions(encoder.config)).ids
    mean, std = _label_scale(data)
    targets = torch.from_numpy((data.labels - mean) / std)  # (n, k); NaN stays NaN
    rows_in_order = data.split[0]
    if sample_seed is not None:
        rows_in_order = np.random.default_rng(sample_seed).permutation(rows_in_order)
    batches: list[dict[str, torch.Tensor]] = []
    for rows, input_ids, attention_mask in _batches(ids, rows_in_order, batch_size, tokenizer.pad_token_id):
        if len(batches) == n_batches:
            break
        if not torch.isnan(targets[rows]).all():
            batches.append(
                {
                    "input_ids": input_ids.to(device),
                    "attention_mask": attention_mask.to(device),
                    "labels": targets[rows].to(device),
                }
            )

    def loss_fn(m: EncoderWithHead, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return masked_loss(
            m(batch["input_ids"], batch["attention_mask"]), batch["labels"], data.task_type, data.n_classes
        )

    return model, loss_fn, batches


def _probe(
    model: EncoderWithHead,
    data: FinetuneData,
    ids: list[list[int]],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    probe_layer: Literal["last", "best"] | int,
) -> dict[str, Any]:
    """A linear probe on pooled hidden states: the last layer, a given one, or each in turn and the best on val."""
    model.requires_grad_(False)
    model.eval()
    rows = np.arange(len(ids))
    with torch.no_grad():
        layers = torch.cat([model.embed_layers(input_ids.to(device), attention_mask.to(device)).float().cpu()
                            for _, input_ids, attention_mask in _batches(ids, rows, batch_size, pad_id)],
                           dim=1).numpy()  # (n_layer + 1, n, H)  # fmt: skip
    n_layers = layers.shape[0]
    if probe_layer == "last":
        candidates = [n_layers - 1]
    elif probe_layer == "best":
        candidates = list(range(n_layers))
    elif isinstance(probe_layer, int) and not isinstance(probe_layer, bool) and 0 <= probe_layer < n_layers:
        candidates = [probe_layer]
    else:
        raise ValueError(f"probe_layer must be 'last', 'best' or a layer index 0..{n_layers - 1} (got {probe_layer!r})")
    best: dict[str, Any] = {"val": math.nan}
    for layer in candidates:
        train = layers[layer][data.split[0]]
        scale = train.std(axis=0)
        # standardised, so the L2 penalty sees every dimension alike
        features = (layers[layer] - train.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
        fit = fit_linear(features.astype(np.float64), data)
        if better(data.primary_metric, fit["val"], best["val"]):
            best = {**fit, "probe_layer": layer}  # ties keep the lower layer
    if "probe_layer" not in best:
        raise ValueError(f"{data.name}: no layer of {candidates} gave a finite validation metric")
    best["n_layers_probed"] = len(candidates)
    return best


# ---------------------------------------------------------------------------------------------
# linear models on fixed features: the probe and the fingerprint baseline


def fit_linear(features: np.ndarray, data: FinetuneData, l2_grid: Sequence[float] = L2_GRID) -> dict[str, Any]:
    """L2 logistic regression (classification) or ridge (regression) on features [n, d], penalty chosen on val.

    Each label column is fitted on its own labelled train rows; multi-class is one softmax model.
    Returns {"val", "test" (primary metric), "metrics" (all, val and test), "l2"}.
    """
    val_idx = data.split[1]
    l2_grid = sorted(l2_grid, reverse=True)  # strongest penalty first: ties keep the simpler model
    best: dict[str, Any] = {"val": math.nan}
    for l2, predictions in zip(l2_grid, _linear_path(features, data, l2_grid), strict=True):
        val = task_metric(data, val_idx, predictions[val_idx])
        if better(data.primary_metric, val, best["val"]):
            best = {
                **split_metrics(data, predictions),
                "l2": l2,
                "val_loss": task_loss(data, val_idx, predictions[val_idx]),
            }
    if "l2" not in best:
        raise ValueError(f"{data.name}: no penalty in {l2_grid} gave a finite validation metric")
    return best


def _linear_path(features: np.ndarray, data: FinetuneData, l2_grid: Sequence[float]) -> np.ndarray:
    """Predictions (n_l2, n, n_outputs) for every row, of the models fitted on the train rows, one per penalty."""
    train_idx = data.split[0]
    x_train = features[train_idx]
    if data.n_classes is not None:
        y = data.labels[train_idx, 0]
        keep = ~np.isnan(y)
        path = _softmax_path(x_train[keep], y[keep].astype(np.int64), data.n_classes, l2_grid)
        return np.stack([scipy.special.softmax(features @ w + b, axis=1) for w, b in path])
    out = np.zeros((len(l2_grid), len(features), data.labels.shape[1]))
    for j in range(data.labels.shape[1]):
        y = data.labels[train_idx, j]
        keep = ~np.isnan(y)
        x, y = x_train[keep], y[keep].astype(np.float64)
        if data.task_type == "regression":
            out[:, :, j] = _ridge_path(x, y, l2_grid, features)
        elif np.unique(y).size < 2:
            log.warning("%s: label column %d has a single class in train; predicting a constant", data.name, j)
        else:
            for i, (w, b) in enumerate(_softmax_path(x, y.astype(np.int64), 2, l2_grid)):
                logits = features @ w + b  # (n, 2)
                out[i, :, j] = logits[:, 1] - logits[:, 0]  # the log-odds: binary logistic regression
    return out


def _softmax_path(
    x: np.ndarray, y: np.ndarray, n_classes: int, l2_grid: Sequence[float]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Multinomial logistic regression, sum of log-losses + l2/2 ||W||^2 (bias not penalised), by L-BFGS.

    Yields (W [d, C], b [C]) per penalty, each fit warm-started from the previous one.
    """
    n, d = x.shape
    onehot = np.eye(n_classes)[y]  # (n, C)
    theta = np.zeros(d * n_classes + n_classes)
    for l2 in l2_grid:

        def loss_and_grad(theta: np.ndarray, l2: float = l2) -> tuple[float, np.ndarray]:
            w, b = theta[: d * n_classes].reshape(d, n_classes), theta[d * n_classes :]
            logits = x @ w + b  # (n, C)
            log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
            residual = np.exp(log_p) - onehot  # d loss / d logits
            loss = -(onehot * log_p).sum() + 0.5 * l2 * (w**2).sum()
            return loss, np.concatenate([(x.T @ residual + l2 * w).ravel(), residual.sum(axis=0)])

        fit = scipy.optimize.minimize(loss_and_grad, theta, jac=True, method="L-BFGS-B", options={"maxiter": 500})
        if not fit.success:
            log.debug("logistic fit (l2=%g) stopped early: %s", l2, fit.message)  # the val grid judges the result
        theta = fit.x
        yield theta[: d * n_classes].reshape(d, n_classes), theta[d * n_classes :]


def _ridge_path(x: np.ndarray, y: np.ndarray, l2_grid: Sequence[float], x_all: np.ndarray) -> np.ndarray:
    """Closed-form ridge with an unpenalised intercept on (x, y): predictions (n_l2, n_all).

    One eigendecomposition serves every penalty; it is of the smaller Gram matrix, the n x n one
    (dual form) when features outnumber molecules, as 2048 fingerprint bits usually do.
    """
    x_mean, y_mean = x.mean(axis=0), y.mean()
    xc, yc, x_all = x - x_mean, y - y_mean, x_all - x_mean
    if xc.shape[0] <= xc.shape[1]:  # w = Xc^T (Xc Xc^T + l2 I)^-1 yc
        eigenvalues, q = np.linalg.eigh(xc @ xc.T)
        basis, coef = (x_all @ xc.T) @ q, q.T @ yc  # (n_all, n), (n,)
    else:  # w = (Xc^T Xc + l2 I)^-1 Xc^T yc
        eigenvalues, q = np.linalg.eigh(xc.T @ xc)
        basis, coef = x_all @ q, q.T @ (xc.T @ yc)  # (n_all, d), (d,)
    eigenvalues = np.clip(eigenvalues, 0, None)  # round-off can leave tiny negatives
    return np.stack([basis @ (coef / (eigenvalues + l2)) + y_mean for l2 in l2_grid])


# ---------------------------------------------------------------------------------------------
# the fingerprint baseline


def morgan_fingerprints(smiles: Sequence[str], *, radius: int = 2, n_bits: int = 2048) -> np.ndarray:
    """Bit vectors [n, n_bits] (uint8) from RDKit's Morgan generator (ECFP4 at radius 2)."""
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    out = np.zeros((len(smiles), n_bits), dtype=np.uint8)
    unparsable: list[str] = []
    for i, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(s)
        if mol is None:
            unparsable.append(f"row {i}: {s!r}")
            continue
        out[i] = generator.GetFingerprintAsNumPy(mol)
    if unparsable:
        raise ValueError(
            f"RDKit cannot parse {len(unparsable)} SMILES ({'; '.join(unparsable[:3])});"
            " drop them when the task is loaded"
        )
    return out


def fingerprint_baseline(
    data: FinetuneData, *, split_seed: int | None = None, radius: int = 2, n_bits: int = 2048, seed: int | None = None
) -> dict[str, Any]:
    """The no-pretraining baseline: the probe's linear model on Morgan fingerprints instead of embeddings.

    The fit is deterministic (L-BFGS from zeros, closed-form ridge), so there is no fitting seed;
    `split_seed` is only recorded (`seed`: its old name, still passed by engine/analyze.py).
    """
    recorded = split_seed if seed is None else seed
    if recorded is None or (split_seed is not None and seed is not None):
        raise TypeError(f"pass split_seed (got split_seed={split_seed}, seed={seed})")
    t0 = time.perf_counter()
    try:
        features = morgan_fingerprints(data.smiles, radius=radius, n_bits=n_bits).astype(np.float64)
    except ValueError as err:
        raise ValueError(f"{data.name}: {err}") from None
    return result_row(data, "morgan_fp", fit_linear(features, data), recorded, t0)
