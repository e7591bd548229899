"""Downstream transfer of a pretrained checkpoint: fine-tune or probe it on a MoleculeNet-style task.

The story, in order: a task arrives as plain arrays (`FinetuneData`: SMILES, float32 labels with
NaN for missing, a split); the metrics (`roc_auc` by the Mann-Whitney rank formula, `rmse`) and the
masked loss follow; then the checkpoint is loaded as an encoder (`load_encoder`), each SMILES is
encoded the way pretraining saw it (mlm `[CLS] ... [SEP]`, clm `[BOS] ... [EOS]`), and one vector
per molecule is pooled from the last hidden states:

    mlm  the first token, [CLS] (RoBERTa's own choice for sequence heads)
    clm  the last real token, [EOS]: under causal attention it is the only one that has seen the
         whole molecule (mean pooling would average in prefixes that have not)

`finetune(..., mode="finetune")` trains encoder + linear head with AdamW, early-stopped on the
validation metric with the best weights restored. `mode="probe"` freezes the encoder, embeds every
molecule once and fits an L2-regularised linear model on the embeddings by L-BFGS, with the
penalty chosen on the validation split (the linear evaluation of Chen et al. 2020, SimCLR, sec. B.5).
`fingerprint_baseline` fits the same linear model on Morgan fingerprints, so the probe and the
no-pretraining baseline differ only in their features; `random_init=True` gives the other baseline,
the same architecture with fresh weights.

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
from typing import Any, Literal

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from engine.ladder import Family
from engine.rundir import head_file

log = logging.getLogger(__name__)

TaskType = Literal["classification", "regression"]
Mode = Literal["finetune", "probe"]

SPLIT_NAMES = ("train", "val", "test")
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
L2_GRID = tuple(10.0**p for p in range(-2, 5))  # penalties tried on the validation split, per linear fit


# ---------------------------------------------------------------------------------------------
# the task, as plain arrays


@dataclass(frozen=True, eq=False)  # eq=False: fields are arrays
class FinetuneData:
    """One task on one split. `labels` is [n, k] float32 with NaN where a label is missing.

    n_classes=None: k independent binary (or regression) columns; n_classes=C: one column of
    class indices 0..C-1 (multi-class). `split` holds the train, val and test row indices.
    """

    smiles: Sequence[str]
    labels: np.ndarray
    task_type: TaskType
    split: tuple[np.ndarray, np.ndarray, np.ndarray]
    n_classes: int | None = None
    name: str = "task"  # only for messages and the result dict

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.float32)
        if labels.ndim == 1:
            labels = labels[:, None]
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "split", tuple(np.asarray(i, dtype=np.int64).reshape(-1) for i in self.split))
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
    for split_name, idx in zip(SPLIT_NAMES, data.split):
        if idx.size == 0:
            raise ValueError(f"{name}: the {split_name} split is empty")
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"{name}: {split_name} indices must lie in [0, {n}) (got {idx.min()}..{idx.max()})")
    for (a_name, a), (b_name, b) in itertools.combinations(zip(SPLIT_NAMES, data.split), 2):
        shared = np.intersect1d(a, b)
        if shared.size:
            raise ValueError(f"{name}: the {a_name} and {b_name} splits share {shared.size} molecules (e.g. row {shared[0]})")
    for split_name, idx in zip(SPLIT_NAMES, data.split):
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


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of one binary column by the Mann-Whitney U statistic; ties count one half.

    AUC = (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg), with average ranks for
    tied scores. NaN when only one class is present.
    """
    y_true = np.asarray(y_true).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = y_true == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = scipy.stats.rankdata(scores)  # average ranks for ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mean_roc_auc(labels: np.ndarray, predictions: np.ndarray, n_classes: int | None = None) -> float:
    """Mean ROC-AUC over label columns with both classes, NaN labels skipped; multi-class: macro one-vs-rest.

    labels [n, k] (multi-class: [n, 1] of class indices), predictions [n, k] scores
    (multi-class: [n, C] probabilities).
    """
    if n_classes is not None:
        y = labels[:, 0]
        keep = ~np.isnan(y)
        columns = [((y[keep] == c).astype(np.int64), predictions[keep, c]) for c in range(n_classes)]
    else:
        columns = [(y[~np.isnan(y)], s[~np.isnan(y)]) for y, s in zip(labels.T, predictions.T)]
    aucs = [roc_auc(y, s) for y, s in columns]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def rmse(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Root-mean-square error per label column over its non-NaN labels, averaged over columns."""
    errors = []
    for y, p in zip(labels.T, predictions.T):
        keep = ~np.isnan(y)
        if keep.any():
            errors.append(float(np.sqrt(np.mean((p[keep].astype(np.float64) - y[keep]) ** 2))))
    return float(np.mean(errors)) if errors else math.nan


def metric_name(task_type: TaskType) -> str:
    return "roc_auc" if task_type == "classification" else "rmse"


def task_metric(data: FinetuneData, idx: np.ndarray, predictions: np.ndarray) -> float:
    """The task's metric on rows `idx`; predictions are in label units (scores, probabilities or values)."""
    if data.task_type == "classification":
        return mean_roc_auc(data.labels[idx], predictions, data.n_classes)
    return rmse(data.labels[idx], predictions)


def _better(new: float, best: float, task_type: TaskType) -> bool:
    if math.isnan(new):
        return False
    if math.isnan(best):
        return True
    return new > best if task_type == "classification" else new < best


# ---------------------------------------------------------------------------------------------
# the masked loss


def n_labelled(labels: torch.Tensor, n_classes: int | None = None) -> int:
    """The entries `masked_loss` averages over: non-NaN labels (the first column for multi-class)."""
    observed = ~torch.isnan(labels)
    return int((observed[:, 0] if n_classes is not None else observed).sum())


def masked_loss(outputs: torch.Tensor, labels: torch.Tensor, task_type: TaskType, n_classes: int | None = None) -> torch.Tensor:
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
    """The checkpoint's encoder (no LM head), its tokenizer and its family ("mlm" or "clm").

    `AutoModel` gives RobertaModel for a RobertaForMaskedLM checkpoint and GPT2Model for a
    GPT2LMHeadModel one. random_init: the same config with fresh weights (seed the RNG first).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # slow import, kept off module load

    from engine.models import family_of

    checkpoint_dir = Path(checkpoint_dir)
    _check_checkpoint(checkpoint_dir, need_weights=not random_init)
    config = AutoConfig.from_pretrained(checkpoint_dir)
    family = family_of(config)
    kwargs = {"add_pooling_layer": False} if family == "mlm" else {}  # [CLS] is pooled by us, not by RoBERTa's tanh pooler
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
            "pad_token_id, so positions will be off", checkpoint_dir, pad_id, tokenizer.pad_token_id,
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
        raise FileNotFoundError(
            f"{checkpoint_dir}: not a save_pretrained checkpoint, missing {', '.join(missing)}"
        )


def max_positions(config: Any) -> int:
    """Longest sequence, specials included, that the position embeddings cover."""
    n = config.max_position_embeddings  # GPT2Config maps this to n_positions
    if config.model_type == "roberta":
        n -= config.pad_token_id + 1  # RoBERTa positions start at pad_token_id + 1
    return n


# ---------------------------------------------------------------------------------------------
# SMILES -> ids -> pooled vectors


def encode_smiles(tokenizer: Any, smiles: Sequence[str], family: Family, max_len: int) -> tuple[list[list[int]], float]:
    """Token ids per molecule wrapped as in pretraining (CONTRACTS.md), and the fraction of [UNK] tokens."""
    if family == "mlm":
        first, last = tokenizer.cls_token_id, tokenizer.sep_token_id
    else:
        first, last = tokenizer.bos_token_id, tokenizer.eos_token_id
    if first is None or last is None:
        wanted = "[CLS]/[SEP]" if family == "mlm" else "[BOS]/[EOS]"
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
    return ids, n_unk / max(n_tokens, 1)


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


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, family: Family) -> torch.Tensor:
    """(B, T, H) -> (B, H): [CLS] for mlm, the last real token ([EOS]) for clm; padding is on the right."""
    if family == "mlm":
        return hidden[:, 0]
    last = attention_mask.sum(dim=1) - 1  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class EncoderWithHead(nn.Module):
    """The pretrained encoder, the pooling of its family and one linear layer to the task's outputs."""

    def __init__(self, encoder: nn.Module, family: Family, n_outputs: int):
        super().__init__()
        self.encoder = encoder
        self.family = family
        self.head = nn.Linear(encoder.config.hidden_size, n_outputs)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return pool(hidden, attention_mask, self.family)  # (B, H)

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
    seed: int,
    max_seq_len: int | None = None,
    device: str | torch.device | None = None,
    random_init: bool = False,
    save_to: Path | None = None,
) -> dict[str, Any]:
    """Downstream score of one checkpoint on one task split: a dict ready to be a results row.

    mode "finetune": encoder + linear head trained with AdamW at a constant `lr`, one validation
    pass per epoch, stopped after `patience` epochs without improvement, best weights restored
    (epoch 0 is the untrained head). mode "probe": frozen encoder, embeddings computed once, an
    L2 linear model fitted by L-BFGS with the penalty chosen on val; epochs, patience and lr unused.
    save_to (finetune only): the fine-tuned encoder's state_dict as safetensors, keyed as in
    `AutoModel.from_pretrained(checkpoint_dir)`, for the pretrained -> fine-tuned landscape direction,
    and the head beside it (`head_file(save_to)`), for the Hessian of the fine-tuning loss.
    Deterministic for a seed; the global torch RNG is restored afterwards.
    """
    if mode not in ("finetune", "probe"):
        raise ValueError(f"mode must be 'finetune' or 'probe' (got {mode!r})")
    if max_seq_len is not None and max_seq_len < 3:
        raise ValueError(f"max_seq_len must leave room for two special tokens and one atom (got {max_seq_len})")
    t0 = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)  # the head, random_init weights and dropout; restored on exit
        encoder, tokenizer, family = load_encoder(checkpoint_dir, random_init=random_init)
        max_len = min(max_seq_len or math.inf, max_positions(encoder.config))
        ids, unk_fraction = encode_smiles(tokenizer, data.smiles, family, max_len)
        model = EncoderWithHead(encoder, family, data.n_outputs).to(device)
        if mode == "probe":
            result = _probe(model, data, ids, batch_size, tokenizer.pad_token_id, device)
        else:
            result = _train(model, data, ids, epochs, patience, lr, batch_size, seed, tokenizer.pad_token_id, device)
            if save_to is not None:
                result["weights_path"] = str(_save_finetuned(model, Path(save_to), checkpoint_dir, data, seed))
    return _result_row(
        data, mode, result, seed, t0,
        checkpoint_dir=str(checkpoint_dir), random_init=random_init, unk_fraction=unk_fraction,
    )


def _result_row(data: FinetuneData, mode: str, fit: dict[str, Any], seed: int, t0: float, **extra: Any) -> dict[str, Any]:
    """One row of results/finetune: the same keys for every mode and baseline."""
    train_idx, val_idx, test_idx = data.split
    row = {
        "task": data.name,
        "mode": mode,  # finetune | probe | morgan_fp
        "checkpoint_dir": None,
        "random_init": False,
        "seed": seed,
        "metric": metric_name(data.task_type),
        "test": fit["test"],
        "val": fit["val"],
        "best_epoch": fit.get("best_epoch"),  # finetune only; 0 is the untrained head
        "n_epochs": fit.get("n_epochs", 0),
        "l2": fit.get("l2"),  # probe and morgan_fp: the penalty chosen on val
        "n_train": int(train_idx.size),
        "n_val": int(val_idx.size),
        "n_test": int(test_idx.size),
        "unk_fraction": None,
        "wall_s": time.perf_counter() - t0,
        "weights_path": fit.get("weights_path"),
        "history": fit.get("history", []),
    }
    row.update(extra)
    return row


def _train(model: EncoderWithHead, data: FinetuneData, ids: list[list[int]], epochs: int, patience: int, lr: float,
           batch_size: int, seed: int, pad_id: int, device: torch.device) -> dict[str, Any]:
    train_idx, val_idx, test_idx = data.split
    mean, std = _label_scale(data)
    targets = torch.from_numpy((data.labels - mean) / std)  # (n, k); NaN stays NaN
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    shuffle = torch.Generator().manual_seed(seed)

    def evaluate(idx: np.ndarray) -> float:
        return task_metric(data, idx, _predict(model, data, ids, idx, batch_size, pad_id, device, mean, std))

    best_val, best_epoch = evaluate(val_idx), 0
    best_state = _copy_state(model)
    history = [{"epoch": 0, "train_loss": None, "val": best_val}]
    epoch = 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = train_idx[torch.randperm(train_idx.size, generator=shuffle).numpy()]
        losses = []
        for rows, input_ids, attention_mask in _batches(ids, order, batch_size, pad_id):
            y = targets[rows].to(device)
            if torch.isnan(y).all():
                continue  # nothing labelled in this batch (sparse multi-task labels)
            loss = masked_loss(model(input_ids.to(device), attention_mask.to(device)), y, data.task_type, data.n_classes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())  # note: a device sync per step; negligible next to the backward pass
        val = evaluate(val_idx)
        train_loss = float(np.mean(losses)) if losses else None
        history.append({"epoch": epoch, "train_loss": train_loss, "val": val})
        log.info("%s epoch %d: train loss %s, val %s %.4f", data.name, epoch, train_loss, metric_name(data.task_type), val)
        if _better(val, best_val, data.task_type):
            best_val, best_epoch, best_state = val, epoch, _copy_state(model)
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    # both metrics recomputed from the restored weights, so a failed restore cannot go unnoticed
    return {
        "val": evaluate(val_idx), "test": evaluate(test_idx), "best_epoch": best_epoch, "n_epochs": epoch, "history": history,
    }


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
def _predict(model: EncoderWithHead, data: FinetuneData, ids: list[list[int]], idx: np.ndarray, batch_size: int,
             pad_id: int, device: torch.device, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Predictions in label units for rows idx: logits (binary), probabilities (multi-class) or values."""
    model.eval()
    outputs = [model(input_ids.to(device), attention_mask.to(device)).float().cpu()
               for _, input_ids, attention_mask in _batches(ids, idx, batch_size, pad_id)]
    out = torch.cat(outputs).numpy().astype(np.float64)  # (n, n_outputs)
    if data.n_classes is not None:
        return scipy.special.softmax(out, axis=1)
    return out * std + mean


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_finetuned(model: EncoderWithHead, path: Path, checkpoint_dir: Path, data: FinetuneData, seed: int) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"checkpoint_dir": str(checkpoint_dir), "task": data.name, "seed": str(seed)}
    for module, target in ((model.encoder, path), (model.head, head_file(path))):
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}  # clone: no shared storage
        save_file(state, str(target), metadata=metadata)
    return path


def finetuning_loss(
    checkpoint_dir: Path, data: FinetuneData, weights: Path, *, n_batches: int, batch_size: int,
    device: str | torch.device = "cpu",
) -> tuple[EncoderWithHead, Any, list[dict[str, torch.Tensor]]]:
    """The fine-tuning loss at the fine-tuned weights, in the form `engine.hessian.spectrum` takes.

    Returns (model, loss_fn, batches): the encoder and head that `finetune(save_to=weights)` saved,
    `loss_fn(model, batch)` the training objective (`masked_loss` on standardised labels, as in
    training), and the first `n_batches` training batches in split order that hold a label.
    """
    from safetensors.torch import load_file

    encoder, tokenizer, family = load_encoder(checkpoint_dir)
    encoder.load_state_dict(load_file(str(weights)))
    model = EncoderWithHead(encoder, family, data.n_outputs)
    model.head.load_state_dict(load_file(str(head_file(Path(weights)))))
    model.to(device)
    ids, _ = encode_smiles(tokenizer, data.smiles, family, max_positions(encoder.config))
    mean, std = _label_scale(data)
    targets = torch.from_numpy((data.labels - mean) / std)  # (n, k); NaN stays NaN
    batches = []
    for rows, input_ids, attention_mask in _batches(ids, data.split[0], batch_size, tokenizer.pad_token_id):
        if len(batches) == n_batches:
            break
        if not torch.isnan(targets[rows]).all():
            batches.append({"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                            "labels": targets[rows].to(device)})

    def loss_fn(m: EncoderWithHead, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return masked_loss(m(batch["input_ids"], batch["attention_mask"]), batch["labels"], data.task_type, data.n_classes)

    return model, loss_fn, batches


def _probe(model: EncoderWithHead, data: FinetuneData, ids: list[list[int]], batch_size: int, pad_id: int,
           device: torch.device) -> dict[str, Any]:
    model.requires_grad_(False)
    model.eval()
    rows = np.arange(len(ids))
    with torch.no_grad():
        features = torch.cat([model.embed(input_ids.to(device), attention_mask.to(device)).float().cpu()
                              for _, input_ids, attention_mask in _batches(ids, rows, batch_size, pad_id)]).numpy()
    train = features[data.split[0]]
    scale = train.std(axis=0)
    features = (features - train.mean(axis=0)) / np.where(scale > 0, scale, 1.0)  # L2 penalty sees every dimension alike
    return fit_linear(features.astype(np.float64), data)


# ---------------------------------------------------------------------------------------------
# linear models on fixed features: the probe and the fingerprint baseline


def fit_linear(features: np.ndarray, data: FinetuneData, l2_grid: Sequence[float] = L2_GRID) -> dict[str, Any]:
    """L2 logistic regression (classification) or ridge (regression) on features [n, d], penalty chosen on val.

    Each label column is fitted on its own labelled train rows; multi-class is one softmax model.
    """
    _, val_idx, test_idx = data.split
    l2_grid = sorted(l2_grid, reverse=True)  # strongest penalty first: ties keep the simpler model
    best: dict[str, Any] = {"val": math.nan}
    for l2, predictions in zip(l2_grid, _linear_path(features, data, l2_grid)):
        val = task_metric(data, val_idx, predictions[val_idx])
        if _better(val, best["val"], data.task_type):
            best = {"val": val, "l2": l2, "test": task_metric(data, test_idx, predictions[test_idx])}
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
    unparsable = []
    for i, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(s)
        if mol is None:
            unparsable.append(f"row {i}: {s!r}")
            continue
        out[i] = generator.GetFingerprintAsNumPy(mol)
    if unparsable:
        raise ValueError(
            f"RDKit cannot parse {len(unparsable)} SMILES ({'; '.join(unparsable[:3])}); drop them when the task is loaded"
        )
    return out


def fingerprint_baseline(data: FinetuneData, *, seed: int, radius: int = 2, n_bits: int = 2048) -> dict[str, Any]:
    """The no-pretraining baseline: the probe's linear model on Morgan fingerprints instead of embeddings.

    The fit is deterministic (L-BFGS from zeros, closed-form ridge); `seed` is only recorded.
    """
    t0 = time.perf_counter()
    try:
        features = morgan_fingerprints(data.smiles, radius=radius, n_bits=n_bits).astype(np.float64)
    except ValueError as err:
        raise ValueError(f"{data.name}: {err}") from None
    return _result_row(data, "morgan_fp", fit_linear(features, data), seed, t0)
