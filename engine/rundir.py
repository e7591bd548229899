"""The run directory: the only channel between stages, and the only module that opens its files.

    runs/<sweep>/sweep.yaml                         config() / write_config()
    runs/<sweep>/data/manifest.json                 manifest() / write_manifest()
    runs/<sweep>/data/{train,val}-*.parquet         shard_paths(split); written by prepare, named by shard_name()
    runs/<sweep>/data/rejects.csv                   write_rejects()
    runs/<sweep>/data/tokenizer/                    tokenizer (a save_pretrained directory)
    runs/<sweep>/data/<representation>/             data_of(trial): selfies, deepsmiles, safe (data.representation),
                                                    each a data directory of its own (manifest, shards, tokenizer)
    runs/<sweep>/trials/<trial>/                    trial(id) -> TrialDir: trial.json, metrics.jsonl, nodes.txt,
                                                    result.json, checkpoints/<tokens:012d>/, stable/ (wsd)
    runs/<sweep>/tune/                              Ray Tune's and Ray Train's own state (for --resume)
    runs/<sweep>/results/<table>.parquet            read_table() / write_table(), columns in TABLES
    runs/<sweep>/results/fits.json                  fits() / write_fits()
    runs/<sweep>/analysis/finetuned/<trial>/<tokens>/<task>.safetensors (+ .head)   finetuned_weights()
    runs/<sweep>/report/index.html                  write_report()
    runs/<sweep>/events.jsonl                       record_event() / fault_events()
    runs/<sweep>/.lock                              lock(command) / lock_holder(): one driver at a time
    runs/<sweep>/logs/<name>.log                    open_log(name): Ray's own output, kept off the console

A stage reads only what earlier stages wrote and writes only its own files, so any stage can be
rerun alone. Every file has one typed reader and one writer here; tables are checked against
`TABLES` (the column lists of docs/CONTRACTS.md) on both ends. Paths inside tables and JSON files
are relative to the run directory, so a run directory copied from cluster storage to a laptop
still analyses, fits and reports. Writers are atomic (temporary file + rename): a crash never
leaves half a file. Nothing here imports ray, torch or rdkit.
"""

from __future__ import annotations

import csv
import dataclasses
import heapq
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np
import pandas as pd
import yaml

from clmscale.engine.config import Strict, SweepConfig, Trial, expand_grid
from clmscale.engine.files import (
    append_jsonl,
    atomic_path,
    read_jsonl,
    sha256_file,
    write_json_atomic,
    write_parquet_atomic,
    write_text_atomic,
)
from clmscale.engine.representations import REPRESENTATIONS

Split = Literal["train", "val"]

log = logging.getLogger("clmscale")


# ---------------------------------------------------------------------------------------------
# data/manifest.json (written by prepare)


class InputFile(Strict):
    path: str  # as given in the config
    size_bytes: int
    sha256: str


class ShardFile(Strict):
    path: str  # relative to the data directory
    split: Split
    n_rows: int
    sha256: str


class SplitCounts(Strict):
    n_molecules: int
    n_tokens: int  # regex tokens, no special tokens


class Counts(Strict):
    n_in: int  # records read (after max_molecules)
    n_invalid: int  # RDKit could not parse or sanitise them (see rejects.csv)
    n_duplicate: int  # same canonical SMILES as an earlier record
    n_decontaminated: int = 0  # the same molecule as a downstream task's (rejects.csv names the task)
    n_filtered: int  # removed by max_heavy_atoms or max_tokens (also in rejects.csv)
    n_filtered_heavy_atoms: int
    n_filtered_tokens: int
    n_unconverted: int = 0  # a representation of the grid cannot write them, or reads them back wrong (rejects.csv)
    unconverted: dict[str, int] = {}  # representation -> molecules it rejected (the first that failed each)
    n_kept: int
    train: SplitCounts  # n_tokens: of this data directory's representation
    val: SplitCounts


class TokenizerInfo(Strict):
    path: str  # relative to the data directory; a PreTrainedTokenizerFast directory
    vocab_size: int  # including the 7 special tokens
    n_unk: int  # validation-split tokens that map to [UNK]
    tasks: list[str] = []  # downstream tasks whose canonical SMILES' token types the vocabulary covers
    task_tokens: list[str] = []  # token types only those tasks have (after the corpus's ids; no labels involved)


class TaskOverlap(Strict):
    task_molecules: int  # distinct molecules of the task (by the decontamination key), after canonicalisation
    removed: int  # corpus molecules (distinct canonical SMILES) dropped because they match one of them


class Manifest(Strict):
    format_version: int = 1
    # the molecular string of this directory's shards and tokenizer: data/ holds the canonical SMILES; each other
    # representation of the grid is a data directory of its own inside it, data/<representation>/ (same molecules,
    # same split, same order), listed in `representations` of data/'s manifest
    representation: str = "smiles"
    representations: list[str] = []
    inputs: list[InputFile]
    options: dict[str, Any]  # the DataConfig without `corpus`
    rdkit_version: str
    counts: Counts
    shards: list[ShardFile]
    tokenizer: TokenizerInfo
    rejects: str = "rejects.csv"
    decontamination: dict[str, TaskOverlap] = {}  # task -> overlap with the corpus; {} when off or no tasks
    decontamination_key: Literal["inchikey", "connectivity"] | None = None  # None when decontamination is off

    def shard_paths(self, data_dir: Path, split: Split) -> list[Path]:
        return [Path(data_dir) / s.path for s in self.shards if s.split == split]


class ManifestError(ValueError):
    """A data directory without a (readable) manifest: prepare has not finished there."""


class DataDir:
    """data/: what prepare writes (shards, manifest.json, rejects.csv, tokenizer/) and the sweep reads."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"DataDir({str(self.path)!r})"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def rejects_path(self) -> Path:
        return self.path / "rejects.csv"

    def has_manifest(self) -> bool:
        return self.manifest_path.is_file()

    def has_tokenizer(self) -> bool:
        return (self.tokenizer / "tokenizer.json").is_file()

    def manifest(self) -> Manifest:
        if not self.manifest_path.is_file():
            raise ManifestError(f"{self.manifest_path}: no manifest; run `prepare` first")
        try:
            return Manifest.model_validate_json(self.manifest_path.read_text())
        except ValueError as err:
            raise ManifestError(f"{self.manifest_path}: unreadable manifest ({str(err).splitlines()[0]})") from None

    def write_manifest(self, manifest: Manifest) -> None:
        """Written last by prepare: its presence means the data directory is complete."""
        write_json_atomic(self.manifest_path, manifest.model_dump(mode="json"))

    def shard_paths(self, split: Split) -> list[Path]:
        return self.manifest().shard_paths(self.path, split)

    def pass_tokens(self, n_molecules: int | None = None) -> int:
        """Tokens of one pass over the first n_molecules of the train split in shard order (None: all of it),
        as training counts them: 2 special tokens per molecule. The train split is written in a seeded random
        order, so the first n are a random subset, nested in every larger one (`budget.unique_molecules`)."""
        train = self.manifest().counts.train
        if n_molecules is None:
            return train.n_tokens + 2 * train.n_molecules
        if not 0 < n_molecules <= train.n_molecules:
            raise ValueError(
                f"budget.unique_molecules: {n_molecules:,} molecules asked for, but the train split of "
                f"{self.manifest_path} has {train.n_molecules:,}"
            )
        return self._train_prefix_sum(n_molecules, lambda names: "n_tokens", lambda a: a) + 2 * n_molecules

    def pass_characters(self, n_molecules: int | None = None) -> int:
        """Characters of one pass over the first n_molecules of the train split (None: all of it): of the text
        the model reads (the `text` column of another representation's shards, else the SMILES)."""
        import pyarrow.compute as pc

        n = n_molecules if n_molecules is not None else self.manifest().counts.train.n_molecules
        return self._train_prefix_sum(n, lambda names: "text" if "text" in names else "smiles", pc.utf8_length)

    def _train_prefix_sum(self, n_molecules: int, column_of: Callable, value: Callable) -> int:
        """The sum of `value(column)` over the first n_molecules rows of the train shards, in shard order, the
        column chosen per shard from its column names (`column_of`); only the shards that hold them are read."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        total, left = 0, n_molecules
        for path in self.shard_paths("train"):
            column = column_of(pq.read_schema(path).names)
            rows = pq.read_table(path, columns=[column]).column(column).slice(0, left)
            total, left = total + int(pc.sum(value(rows)).as_py() or 0), left - len(rows)
            if left == 0:
                break
        return total

    def shard(self, split: Split, index: int) -> Path:
        return self.path / f"{split}-{index:05d}.parquet"

    def representation(self, name: str) -> DataDir:
        """The data directory of a representation: this one for smiles, data/<name>/ for the others."""
        return self if name == "smiles" else DataDir(self.path / name)

    def write_rejects(self, rows: Iterable[tuple[str, int, str, str]]) -> None:
        """rejects.csv: file, line (1-based), smiles, reason."""
        # backslashreplace: a rejected string may hold characters UTF-8 cannot encode (lone surrogates)
        with (
            atomic_path(self.rejects_path) as tmp,
            open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f,
        ):
            writer = csv.writer(f)
            writer.writerow(["file", "line", "smiles", "reason"])
            writer.writerows(rows)

    @property
    def rejects_parts(self) -> Path:
        """Where prepare's workers write rejects.csv in parts before the driver joins them (an output, cleared)."""
        return self.path / ".rejects.csv.parts"

    def write_rejects_part(self, index: int, rows: Iterable[tuple[str, int, str, str]]) -> None:
        """Part `index` of rejects.csv, without the header (a worker writes it; `join_rejects` joins the parts)."""
        self.rejects_parts.mkdir(parents=True, exist_ok=True)
        path = self.rejects_parts / f"part-{index:06d}.csv"
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
            csv.writer(f).writerows(rows)

    def join_rejects(self, n_parts: int, files: Sequence[str]) -> None:
        """rejects.csv: the header, then the rows of parts 0 .. n_parts-1 (each in file and line order, `files`
        giving the files' order) merged into file and line order; streamed, so no part is held whole."""
        rank = {name: i for i, name in enumerate(files)}
        with ExitStack() as stack:
            parts = [csv.reader(stack.enter_context(open(self.rejects_parts / f"part-{k:06d}.csv", encoding="utf-8",
                                                         newline="")))
                     for k in range(n_parts)]  # fmt: skip
            tmp = stack.enter_context(atomic_path(self.rejects_path))
            out = csv.writer(stack.enter_context(open(tmp, "w", newline="", encoding="utf-8")))
            out.writerow(["file", "line", "smiles", "reason"])
            out.writerows(heapq.merge(*parts, key=lambda row: (rank[row[0]], int(row[1]))))  # type: ignore[index]
        shutil.rmtree(self.rejects_parts, ignore_errors=True)

    def entries(self) -> list[Path]:
        return sorted(self.path.iterdir()) if self.path.is_dir() else []

    @staticmethod
    def is_output(path: Path) -> bool:
        """A file or folder that prepare writes here (an earlier prepare's output, safe to clear)."""
        name = Path(path).name
        return (
            name in ("manifest.json", "rejects.csv", "tokenizer", *REPRESENTATIONS)
            or name.startswith((".manifest.json.", ".rejects.csv."))  # an atomic writer's temporary file
            or (name.endswith(".parquet") and name.startswith(("train-", "val-")))
        )

    def clear_outputs(self) -> None:
        for p in self.entries():
            if self.is_output(p):
                shutil.rmtree(p) if p.is_dir() else p.unlink()


# ---------------------------------------------------------------------------------------------
# trials/<trial>/result.json (written by engine.train at the end of a run)


@dataclass
class CheckpointInfo:
    n_tokens: int  # D at this checkpoint: the tokens this model has seen
    path: str  # relative to the trial folder: checkpoints/<n_tokens:012d>
    step: int  # optimizer steps of this model (a wsd branch's steps continue its stable state's)
    val_loss: float
    train_loss: float  # mean over the log window that ends here
    flops: float  # C = flops_per_token * n_tokens (a wsd branch's own tokens included)
    wall_s: float  # training time of the run so far (earlier cooldown branches included)
    tokens_per_s: float
    mfu: float
    # the defaults below are what a result.json written before these fields existed reads as
    annealed: bool | None = None  # the lr has decayed to its floor here (None: not recorded)
    epochs: float = math.nan  # passes over the train split: n_tokens / train split tokens (NaN: size not given)
    unique_tokens: float = math.nan  # tokens of distinct molecules seen: min(n_tokens, train split tokens)
    tokens_spent: int | None = None  # tokens the run had processed when this was written, cooldown branches included
    flops_spent: float = math.nan  # flops_per_token * tokens_spent: the compute the run had spent
    milestone: int | None = None  # the token milestone it was taken for (n_tokens is the first step's count past it)
    warning: str = ""  # e.g. over 4 epochs (Muennighoff et al. 2023); "" when none


@dataclass
class TrainResult:
    trial_id: str
    status: Literal["finished", "diverged"]
    n_steps: int
    n_tokens: int  # D: tokens seen, >= budget_tokens when finished (wsd: by the last branch's end)
    budget_tokens: int
    n_params: int
    n_params_non_embedding: int  # N of the scaling laws
    flops: float
    train_loss: float
    val_loss: float  # at the last checkpoint
    wall_s: float
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    diverged_at_step: int | None = None
    tokens_spent: int | None = None  # every token the run processed (wsd: the stable run plus its branches)
    flops_spent: float = math.nan  # flops_per_token * tokens_spent
    epochs: float = math.nan  # at n_tokens
    unique_tokens: float = math.nan  # at n_tokens
    train_split_tokens: int | None = None  # the train split in tokens, as train() was given it

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> TrainResult:
        """The dataclass from its JSON form (nulls back to NaN where the field is a float)."""
        values: dict[str, Any] = {
            k: (math.nan if v is None and k in _FLOATS[cls] else v) for k, v in record.items() if k != "checkpoints"
        }
        checkpoints = [
            CheckpointInfo(
                **{
                    k: (math.nan if v is None and k in _FLOATS[CheckpointInfo] else v)  # type: ignore[arg-type]  # JSON: Any per field
                    for k, v in c.items()
                }
            )
            for c in record.get("checkpoints") or []
        ]
        return cls(**values, checkpoints=checkpoints)


# the fields JSON stores as null when NaN (json_safe), by class
_FLOATS: dict[type, set[str]] = {
    c: {f.name for f in fields(c) if f.type == "float"} for c in (CheckpointInfo, TrainResult)
}


# ---------------------------------------------------------------------------------------------
# one trial's folder


CHECKPOINT_NAME = "[0-9]" * 12  # checkpoints/<n_tokens:012d>
DS_TAG = "ds"  # DeepSpeed's sub-folder of state/: one checkpoint per milestone folder, so one tag
WEIGHTS_FILE = "model.safetensors"  # what save_pretrained writes and from_pretrained reads


class TrialDir:
    """trials/<trial>/: everything one pretraining run reads and writes, on shared storage.

        trial.json                       the trial's spec as the sweep launched it (enough to rerun it)
        metrics.jsonl                    one record per log point, plus `resumed` / `corrupt_checkpoint` events
        nodes.txt                        the Ray node id of rank 0 at each (re)start
        .placement_group                 the run's Ray Train placement group id (for cleaning up after Train)
        result.json                      the TrainResult
        checkpoints/<n_tokens:012d>/     HF save_pretrained + tokenizer; state/ (trainer_state.json, and for
                                         cosine / constant_cooldown DeepSpeed's ds/ and rank_<r>.pt);
                                         sha256.json (every file); COMPLETE (written last)
        checkpoints/<n_tokens>.corrupt/  a checkpoint that failed its sha256 check, set aside (kept)
        stable/<milestone:012d>/         wsd only: the stable-phase state a milestone's cooldown branch starts
                                         from (state/: DeepSpeed ds/, rank_<r>.pt, trainer_state.json; no HF
                                         copy), sealed like a checkpoint; the newest sound one is kept, and it
                                         is where a wsd run resumes. A `.corrupt` suffix as above.

    A wsd checkpoint is the end of a cooldown branch: it holds the weights but no optimizer state,
    since nothing continues from a decayed model; the run goes on (and resumes) from stable/.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"TrialDir({str(self.path)!r})"

    @property
    def trial_id(self) -> str:
        return self.path.name

    # ---- the spec, the log, the result -------------------------------------------------------
    def write_spec(self, spec: Mapping[str, Any]) -> None:
        write_json_atomic(self.path / "trial.json", spec)

    def spec(self) -> dict[str, Any] | None:
        """The spec the sweep launched the trial with, or None for a trial not started yet."""
        path = self.path / "trial.json"
        return json.loads(path.read_text()) if path.exists() else None

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        append_jsonl(self.metrics_path, record)

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def last_metrics(self) -> dict[str, Any]:
        records = self.metrics()
        return records[-1] if records else {}

    def truncate_metrics(self, step: int, keep_branches: Collection[int] = ()) -> None:
        """Drop records written after `step` (a crashed run's tail, before it resumes from there), except
        those of a wsd cooldown branch whose checkpoint is done (`branch` in keep_branches) and events
        that carry no step."""
        records = self.metrics()
        keep = [r for r in records if r.get("step", 0) <= step or r.get("branch", -1) in keep_branches]
        if len(keep) != len(records):
            write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))

    def write_result(self, result: TrainResult) -> None:
        write_json_atomic(self.path / "result.json", result)

    def result(self) -> TrainResult | None:
        """The TrainResult of a run that ended (finished or diverged), or None."""
        path = self.path / "result.json"
        return TrainResult.from_json(json.loads(path.read_text())) if path.exists() else None

    def append_node(self, node_id: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / "nodes.txt", "a") as f:
            f.write(node_id + "\n")

    def nodes(self) -> list[str]:
        path = self.path / "nodes.txt"
        return path.read_text().split() if path.exists() else []

    def write_placement_group(self, pg_id: str) -> None:
        write_text_atomic(self.path / ".placement_group", pg_id)

    def pop_placement_group(self) -> str | None:
        """The recorded placement group id, removing the record."""
        path = self.path / ".placement_group"
        if not path.exists():
            return None
        pg_id = path.read_text().strip()
        path.unlink()
        return pg_id

    # ---- checkpoints --------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, n_tokens: int) -> Path:
        return self.checkpoint_root / f"{n_tokens:012d}"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (with their COMPLETE marker), fewest tokens first."""
        return _complete(self.checkpoint_root)

    def remove_incomplete_checkpoints(self) -> None:
        """Checkpoint and stable-state folders a crash left without their COMPLETE marker."""
        for root in (self.checkpoint_root, self.stable_root):
            complete = set(_complete(root))
            for stale in root.glob(CHECKPOINT_NAME):
                if stale not in complete:
                    shutil.rmtree(stale)

    def new_checkpoint(self, n_tokens: int) -> Path:
        """An empty checkpoint folder (one left half-written by a crash is removed first)."""
        return _new_folder(self.checkpoint(n_tokens))

    # ---- wsd: the stable-phase states cooldown branches start from -----------------------------
    @property
    def stable_root(self) -> Path:
        return self.path / "stable"

    def stable(self, milestone: int) -> Path:
        """The stable state saved where `milestone`'s cooldown branch starts."""
        return self.stable_root / f"{milestone:012d}"

    def stable_states(self) -> list[Path]:
        """Complete stable states, earliest milestone first."""
        return _complete(self.stable_root)

    def new_stable(self, milestone: int) -> Path:
        """An empty stable-state folder, with its state/ (one left half-written is removed first)."""
        return _new_folder(self.stable(milestone))

    def remove_stable_before(self, milestone: int) -> None:
        """Stable states older than `milestone`'s, once that one is sealed: a run resumes only from its newest."""
        for old in self.stable_root.glob(CHECKPOINT_NAME):
            if int(old.name) < milestone:
                shutil.rmtree(old)

    @staticmethod
    def state_dir(checkpoint: Path) -> Path:
        """The DeepSpeed / trainer state of a checkpoint (exact resume)."""
        return Path(checkpoint) / "state"

    @staticmethod
    def rng_file(checkpoint: Path, rank: int) -> Path:
        return Path(checkpoint) / "state" / f"rank_{rank:05d}.pt"

    @staticmethod
    def write_trainer_state(checkpoint: Path, state: Mapping[str, Any]) -> None:
        write_json_atomic(Path(checkpoint) / "state" / "trainer_state.json", state)

    @staticmethod
    def trainer_state(checkpoint: Path) -> dict[str, Any]:
        return json.loads((Path(checkpoint) / "state" / "trainer_state.json").read_text())

    @staticmethod
    def seal(checkpoint: Path) -> None:
        """sha256.json over every file of the checkpoint, then COMPLETE: only now does it count."""
        checkpoint = Path(checkpoint)
        digests = {str(f.relative_to(checkpoint)): sha256_file(f) for f in sorted(checkpoint.rglob("*")) if f.is_file()}
        write_json_atomic(checkpoint / "sha256.json", digests)
        write_text_atomic(checkpoint / "COMPLETE", f"{int(checkpoint.name)}\n")

    @staticmethod
    def weights(checkpoint: Path) -> Path:
        return Path(checkpoint) / WEIGHTS_FILE

    @staticmethod
    def verify(checkpoint: Path, *, weights_only: bool = False) -> list[str]:
        """Files of the checkpoint whose sha256 differs from sha256.json, or that are missing
        (["sha256.json"] when that file is missing or unreadable). weights_only: just the HF copy
        (what from_pretrained reads), not the DeepSpeed state under state/."""
        checkpoint = Path(checkpoint)
        try:
            expected = json.loads((checkpoint / "sha256.json").read_text())
        except (OSError, ValueError):
            return ["sha256.json"]
        names = [n for n in expected if not (weights_only and n.startswith("state/"))]
        return sorted(n for n in names if not (checkpoint / n).is_file() or sha256_file(checkpoint / n) != expected[n])

    def set_aside_corrupt(self, found: list[Path]) -> tuple[list[Path], list[dict[str, Any]]]:
        """Drop corrupt checkpoints from the newest end of `found` (complete checkpoints, oldest first).

        Each one whose files fail `verify` is renamed to `<name>.corrupt` (kept for a look, never
        deleted) until the newest is sound. Returns the sound list and one event per checkpoint set aside.
        """
        found, events = list(found), []
        while found and (bad := self.verify(found[-1])):
            path = found.pop()
            kept = path.with_name(f"{path.name}.corrupt")
            shutil.rmtree(kept, ignore_errors=True)  # an older copy set aside from the same milestone
            path.rename(kept)
            events.append(
                {
                    "event": "corrupt_checkpoint",
                    "checkpoint": path.name,
                    "files": bad,
                    "kept_as": kept.name,
                    "resumed_from": found[-1].name if found else None,
                }
            )
        return found, events


def _complete(root: Path) -> list[Path]:
    """The sealed folders (with their COMPLETE marker) under `root`, in name order (= token order)."""
    return sorted(p for p in root.glob(CHECKPOINT_NAME) if (p / "COMPLETE").is_file())


def _new_folder(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    (path / "state").mkdir(parents=True)
    return path


# ---------------------------------------------------------------------------------------------
# results/*.parquet: the schema of every table (docs/CONTRACTS.md says the same, and a test checks)


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]  # every column the table may have, in this order
    required: tuple[str, ...]  # columns a file must have to be read at all
    key: tuple[str, ...] = ()  # analysis tables: a job's key; a rerun skips keys present with status ok


# every table carries the checkpoint's identity and scale, so the fits never join on paths;
# `checkpoint` is relative to the run directory ("" for rows of no checkpoint, e.g. fingerprints)
IDENTITY = ("checkpoint", "trial_id", "rung", "seed", "n_params", "n_params_non_embedding", "tokens", "flops")
MEASURED = ("status", "error", "node_id")  # analysis rows: ok / error, the message, the Ray node

TABLES: dict[str, Table] = {
    "pretrain": Table(
        columns=(
            "checkpoint",
            "trial_id",
            "family",
            "mlm_probability",
            "representation",
            "rung",
            "seed",
            "n_params",
            "n_params_non_embedding",
            "budget_tokens",
            "tokens",
            "molecules_seen",
            "characters_seen",
            "flops",
            "annealed",
            "epochs",
            "unique_tokens",
            "unique_molecules",
            "tokens_spent",
            "flops_spent",
            "step",
            "train_loss",
            "val_loss",
            "wall_time_s",
            "tokens_per_s",
            "mfu",
            "status",
            "warning",
        ),
        required=IDENTITY + ("val_loss", "status"),
    ),
    "finetune": Table(
        columns=IDENTITY
        + (
            "pretrain_val_loss",
            "task",
            "split",
            "split_seed",
            "finetune_seed",
            "mode",
            "metric",
            "primary",
            "higher_is_better",
            "value",
            "val_value",
            "label_sd",
            "task_val_loss",
            "lr",
            "flag",
            "best_epoch",
            "n_epochs",
            "pooling",
            "probe_layer",
            "unk_fraction",
            "truncated_fraction",
            "wall_time_s",
        )
        + MEASURED,
        required=("checkpoint", "trial_id", "task", "split_seed", "mode", "status"),
        key=("checkpoint", "task", "split_seed", "finetune_seed", "mode"),
    ),
    "lr_search": Table(
        columns=IDENTITY
        + (
            "pretrain_val_loss",
            "task",
            "mode",
            "lr",
            "split_seed",
            "finetune_seed",
            "metric",
            "higher_is_better",
            "val_value",
            "flag",
            "best_epoch",
            "n_epochs",
            "wall_time_s",
        )
        + MEASURED,
        required=("checkpoint", "task", "mode", "lr", "status"),
        key=("checkpoint", "task", "mode", "lr"),
    ),
    "splits": Table(
        columns=("task", "split", "split_seed", "row", "smiles", "part") + MEASURED,
        required=("task", "split", "split_seed", "status"),
        key=("task", "split_seed"),
    ),
    "tasks": Table(
        columns=(
            "task",
            "task_type",
            "n_molecules",
            "n_labels",
            "n_classes",
            "missing_fraction",
            "n_scaffolds",
            "scaffold_diversity",
            "largest_scaffold_fraction",
            "acyclic_fraction",
            "positive_fraction",
            "class_fractions",
            "min_positive_fraction",
            "label_sd",
            "label_iqr",
            "max_label_sd",
            "nn_tanimoto_mean",
            "nn_tanimoto_median",
            "nn_tanimoto_q10",
            "nn_tanimoto_q90",
            "fraction_nn_tanimoto_1",
            "fraction_nn_unrelated",
            "n_corpus_sample",
        )
        + MEASURED,
        required=("task", "status"),
        key=("task",),
    ),
    "hessian": Table(
        columns=IDENTITY
        + (
            "pretrain_val_loss",
            "loss",
            "lambda_max",
            "eigenvalues",
            "eigenvalue_residuals",
            "converged",
            "lambda_max_half",
            "lambda_max_half_rel_diff",
            "lambda_max_half_converged",
            "n_batches_half",
            "trace",
            "trace_stderr",
            "density_grid",
            "density",
            "n_matvecs",
            "n_matvecs_half",
            "n_workers",
            "n_batches",
            "weight_total",
            "n_basis",
            "tf32",
            "hessian_dim",
            "loss_value",
            "grad_norm",
            "wall_time_s",
        )
        + MEASURED,
        required=("checkpoint", "trial_id", "loss", "status"),
        key=("checkpoint", "loss"),
    ),
    "landscape": Table(
        columns=IDENTITY
        + ("pretrain_val_loss", "surface", "kind", "alpha", "beta", "loss", "eps_sharpness", "adaptive_sharpness")
        + MEASURED,
        required=("checkpoint", "trial_id", "surface", "status"),
        key=("checkpoint", "surface"),
    ),
    "pca": Table(
        columns=(
            "kind",
            "group",
            "label",
            "split_seed",
            "pc1",
            "pc2",
            "distance_from_origin",
            "explained_1",
            "explained_2",
        ),
        required=("kind", "group", "label", "pc1", "pc2"),
    ),
    "fits": Table(
        columns=("arm", "what", "task", "mode", "x", "parameter", "estimate", "ci_lo", "ci_hi", "n_points", "note"),
        required=("what", "parameter", "estimate"),
    ),
}
ANALYSIS_TABLES = ("finetune", "hessian", "landscape", "lr_search", "splits", "tasks")  # rows appended by jobs
MEASUREMENT_TABLES = ("finetune", "hessian", "landscape")  # what the fits read


class TableError(ValueError):
    """A result table whose columns are not the ones docs/CONTRACTS.md lists."""


def check_columns(name: str, table: pd.DataFrame, where: Path | str) -> pd.DataFrame:
    """`table` with exactly TABLES[name]'s columns, in order (absent ones as missing values).

    An unknown column is an error (a writer that adds one must add it to TABLES and CONTRACTS.md);
    so is a missing required column.
    """
    schema = TABLES[name]
    unknown = [c for c in table.columns if c not in schema.columns]
    if unknown:
        raise TableError(
            f"{where}: column(s) {unknown} are not in the {name} table's schema "
            f"(engine/rundir.py TABLES, docs/CONTRACTS.md)"
        )
    if len(table.columns):
        missing = [c for c in schema.required if c not in table.columns]
        if missing:
            raise TableError(f"{where}: no column(s) {missing}; it has {list(table.columns)}")
    return table.reindex(columns=list(schema.columns))


# ---------------------------------------------------------------------------------------------
# which checkpoints count: one decision, used by analyze, fit and report


@dataclass(frozen=True)
class Counted:
    """The pretraining checkpoints that enter analyses and fits, and a note for every row left out."""

    checkpoints: pd.DataFrame  # rows of results/pretrain.parquet
    excluded: list[dict[str, Any]]  # {table, trial_id, status, n_rows, reason}
    # annealed_only: the finished, usable checkpoints left out for not being annealed (a trajectory, not points)
    trajectory: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def left_out_trials(self) -> set[str]:
        return {e["trial_id"] for e in self.excluded if e["table"] == "pretrain" and e["status"] != "finished"}


def counted_checkpoints(pretrain: pd.DataFrame, annealed_only: bool = False) -> Counted:
    """Checkpoints of finished trials with weights on disk, a finite validation loss and positive N, D.

    A diverged trial keeps its earlier checkpoints' rows in pretrain.parquet (docs/CONTRACTS.md);
    none of them count, since the run that produced them did not follow its schedule to the end.
    annealed_only: only checkpoints whose learning rate had decayed to its floor (`annealed`) count,
    the (N, D) points of a scaling law (a mid-schedule checkpoint overstates the loss at its D); the
    others are returned as `trajectory`, with one note per trial. Rows with no `annealed` value (a
    table written before that column) are left out as well.
    """
    excluded = []
    not_finished = (pretrain["status"] != "finished").to_numpy()
    for trial_id, rows in pretrain[not_finished].groupby("trial_id", sort=True, dropna=False):
        status = rows["status"].iloc[0]
        finite = rows[np.isfinite(rows["val_loss"].to_numpy(float))].sort_values("tokens")
        last = (
            f" after {float(finite['tokens'].iloc[-1]):,.0f} tokens; last finite validation loss "
            f"{finite['val_loss'].iloc[-1]:.3f} nats/token"
            if len(finite)
            else ""
        )
        excluded.append(
            {
                "table": "pretrain",
                "trial_id": str(trial_id),
                "status": str(status),
                "n_rows": len(rows),
                "reason": f"{status}{last}",
            }
        )
    kept = pretrain[~not_finished]
    scale = kept[["n_params_non_embedding", "tokens", "val_loss"]].to_numpy(float)
    has_weights = kept["checkpoint"].fillna("").astype(str).str.len().to_numpy() > 0
    usable = np.isfinite(scale).all(axis=1) & (scale[:, :2] > 0).all(axis=1) & has_weights
    for row in kept[~usable].to_dict("records"):
        excluded.append(
            {
                "table": "pretrain",
                "trial_id": str(row["trial_id"]),
                "status": "finished",
                "n_rows": 1,
                "reason": f"checkpoint at tokens={row['tokens']} has val_loss={row['val_loss']}, "
                f"n_params_non_embedding={row['n_params_non_embedding']}; left out",
            }
        )
    checkpoints = kept[usable].sort_values(["n_params", "tokens"], kind="stable").reset_index(drop=True)
    if not annealed_only:
        return Counted(checkpoints, excluded)
    flag = checkpoints["annealed"] if "annealed" in checkpoints else pd.Series(None, checkpoints.index, object)
    annealed = flag.eq(True).to_numpy()  # None / NaN: not recorded, so not known to be
    trajectory = checkpoints[~annealed].reset_index(drop=True)
    unknown = pd.isna(flag[~annealed]).to_numpy()
    for trial_id, rows in trajectory.groupby("trial_id", sort=True):
        n_unknown = int(unknown[rows.index].sum())
        tokens = ", ".join(f"{float(t):,.0f}" for t in rows["tokens"])
        reason = f"{len(rows)} checkpoint(s) not annealed (tokens {tokens}): mid-schedule, trajectory only" + (
            f"; {n_unknown} without an annealed value (pretrain table written before that column)" if n_unknown else ""
        )
        excluded.append(
            {
                "table": "pretrain",
                "trial_id": str(trial_id),
                "status": "finished",
                "n_rows": len(rows),
                "reason": reason,
            }
        )
    return Counted(checkpoints[annealed].reset_index(drop=True), excluded, trajectory)


def usable_measurements(table: pd.DataFrame, kind: str, left_out_trials: set[str]) -> tuple[pd.DataFrame, list[dict]]:
    """Rows with status ok from trials that count; a note per failure (grouped) and per left-out trial.

    finetune: only each run's primary metric (the others stay in the table, for the reader), and a run
    flagged `best_epoch_0` or `non_finite_loss` is left out of every mean with a note, never averaged in.
    """
    if table.empty:
        return table, []
    excluded = []
    if kind == "finetune":
        table = table[table["primary"].astype(object).fillna(True).astype(bool)]  # all-null columns read as float
        flagged = (table["flag"].astype(object).fillna("").astype(str) != "").to_numpy() & (
            table["status"] == "ok"
        ).to_numpy()
        for (trial_id, task, mode, flag), rows in table[flagged].groupby(
            ["trial_id", "task", "mode", "flag"], sort=True, dropna=False
        ):
            excluded.append(
                {
                    "table": kind,
                    "trial_id": "" if pd.isna(trial_id) else str(trial_id),
                    "status": "flagged",
                    "n_rows": len(rows),
                    "reason": f"{task} {mode}: {len(rows)} run(s) flagged {flag} "
                    "(the selected weights are the untrained head, or the loss diverged); left out of means",
                }
            )
        table = table[~flagged]
    failed = (table["status"] != "ok").to_numpy()
    if failed.any():
        described = table[failed].assign(
            _what=[_measurement(kind, row) for row in table[failed].to_dict("records")],
            _error=table.loc[failed, "error"].fillna(""),
        )
        for (trial_id, what, error), rows in described.groupby(
            ["trial_id", "_what", "_error"], sort=True, dropna=False
        ):
            excluded.append(
                {
                    "table": kind,
                    "trial_id": "" if pd.isna(trial_id) else str(trial_id),
                    "status": "error",
                    "n_rows": len(rows),
                    "reason": f"{what}: {error or 'no error message'}",
                }
            )
    from_left_out = table["trial_id"].isin(left_out_trials).to_numpy()
    for trial_id, rows in table[from_left_out & ~failed].groupby("trial_id", sort=True):
        excluded.append(
            {
                "table": kind,
                "trial_id": str(trial_id),
                "status": "left out",
                "n_rows": len(rows),
                "reason": f"{len(rows)} {kind} row(s) measured on checkpoints of a trial that did not finish; left out",
            }
        )
    return table[~failed & ~from_left_out].reset_index(drop=True), excluded


def usable_task_characteristics(table: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """tasks.parquet's rows with status ok, one per task (the last written); a note per failed task."""
    if table.empty:
        return table.reset_index(drop=True), []
    ok = (table["status"] == "ok").to_numpy()
    excluded = [
        {
            "table": "tasks",
            "trial_id": "",
            "status": "error",
            "n_rows": len(rows),
            "reason": f"characteristics of {task}: {rows['error'].fillna('').iloc[-1] or 'no error message'}",
        }
        for task, rows in table[~ok].groupby("task", sort=True)
        if task not in set(table.loc[ok, "task"])
    ]
    kept = table[ok].drop_duplicates("task", keep="last").sort_values("task").reset_index(drop=True)
    return kept, excluded


def _measurement(kind: str, row: dict) -> str:
    """Words for one measurement, e.g. 'solubility probe with split seed 1' or 'Hessian of the pretrain loss'."""
    if kind == "finetune":
        return f"{row.get('task')} {row.get('mode')} with split seed {row.get('split_seed')}"
    if kind == "hessian":
        return f"Hessian of the {row.get('loss')} loss"
    return f"loss surface {row.get('surface')}"


PRETRAINED_MODES = ("finetune", "probe")  # downstream modes of a pretrained checkpoint (the rest are baselines)


def downstream_points(finetune: pd.DataFrame, checkpoints: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, mode, checkpoint) of the pretrained modes: mean, sd and count over split seeds,
    with the checkpoint's validation loss where the fine-tuning rows did not carry it."""
    if finetune.empty:
        return pd.DataFrame()
    rows = finetune[finetune["mode"].isin(PRETRAINED_MODES) & np.isfinite(finetune["value"].to_numpy(float))]
    counted = set(zip(checkpoints["trial_id"], checkpoints["tokens"].astype(float), strict=True))
    # the counted points only
    rows = rows[[(t, float(d)) in counted for t, d in zip(rows["trial_id"], rows["tokens"], strict=True)]]
    if rows.empty:
        return pd.DataFrame()
    first = {
        name: (name, "first")
        for name in (
            "metric",
            "higher_is_better",
            "rung",
            "n_params",
            "n_params_non_embedding",
            "flops",
            "pretrain_val_loss",
        )
    }
    points = (
        rows.groupby(["task", "mode", "trial_id", "tokens"], sort=True)
        .agg(mean=("value", "mean"), sd=("value", "std"), n_seeds=("value", "size"), **first)
        .reset_index()
    )
    losses = checkpoints[["trial_id", "tokens", "val_loss"]].astype({"tokens": float})
    points = points.astype({"tokens": float}).merge(losses, on=["trial_id", "tokens"], how="left")
    points["pretrain_val_loss"] = points["pretrain_val_loss"].astype(float).fillna(points.pop("val_loss"))
    return points


@dataclass(frozen=True)
class FitInputs:
    """What the fit and the report read: the config, every table, and the rows that count."""

    config: SweepConfig
    tables: dict[str, pd.DataFrame]  # every result table, raw (a missing one is empty)
    present: dict[str, bool]  # which tables have a file
    checkpoints: pd.DataFrame  # counted_checkpoints(...).checkpoints: annealed ones unless fits.annealed_only is false
    trajectory: pd.DataFrame  # counted but mid-schedule (not annealed): drawn, not fitted
    left_out: pd.DataFrame  # pretrain rows of trials that did not finish, with finite C and loss
    measured: dict[str, pd.DataFrame]  # finetune (primary metric, unflagged) / hessian / landscape: usable rows
    points: pd.DataFrame  # downstream_points(measured["finetune"], checkpoints)
    excluded: list[dict[str, Any]]  # every row left out, with the reason
    characteristics: pd.DataFrame = field(default_factory=pd.DataFrame)  # usable_task_characteristics(tasks)

    @property
    def left_out_trials(self) -> set[str]:
        return {e["trial_id"] for e in self.excluded if e["table"] == "pretrain" and e["status"] != "finished"}


# ---------------------------------------------------------------------------------------------
# .lock: one driver per run directory (prepare, sweep, analyze, demo)

LOCK_HEARTBEAT_S = 5.0  # how often the holder rewrites its heartbeat
LOCK_STALE_S = 60.0  # a heartbeat this old means the holder is gone (killed, its node lost, or hung that long)


class RunDirLocked(ValueError):
    """Another driver holds the run directory: a user error (the CLI prints it and exits 2)."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run directory's lock, as its .lock file records it."""

    pid: int
    host: str
    command: str
    since: str  # local time the lock was taken, ISO 8601
    heartbeat: float  # time.time() of the holder's last heartbeat
    token: str  # tells this holding apart from any later one of the same pid and host

    def describe(self) -> str:
        return f"`{self.command}` (pid {self.pid} on {self.host}, since {self.since})"


def _read_holder(path: Path) -> LockHolder | None:
    """The holder in a lock file; None when there is no file or it is still being written."""
    try:
        record = json.loads(path.read_text())
        return LockHolder(**{f.name: record[f.name] for f in fields(LockHolder)})
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunDirLock:
    """An exclusive lock on a run directory that holds on the shared file systems clusters use.

    The lock file is created with O_CREAT | O_EXCL (atomic on local disks and NFS v3+), so of two
    drivers started at the same moment exactly one gets it. It names its holder (pid, host, command,
    start time) and carries a heartbeat that a background thread rewrites every `heartbeat_s`. A lock
    whose heartbeat is older than `stale_s`, or whose holder's process is gone (same host), is taken
    over with a warning; takers pass one at a time through a second O_EXCL file, so two drivers that
    find the same stale lock cannot both take it. Released on exit from the `with` block, exceptions
    and Ctrl-C included.
    """

    def __init__(
        self,
        path: Path,
        command: str,
        *,
        heartbeat_s: float = LOCK_HEARTBEAT_S,
        stale_s: float = LOCK_STALE_S,
        wait_s: float = 5.0,
    ):
        self.path, self.command = Path(path), command
        self.heartbeat_s, self.stale_s, self.wait_s = heartbeat_s, stale_s, wait_s
        self.holder: LockHolder | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"RunDirLock({str(self.path)!r}, held={self.holder is not None})"

    def acquire(self) -> RunDirLock:
        """Take the lock, or raise RunDirLocked naming its holder. Waits at most `wait_s` (for a lock
        being written or taken over by another driver), never for a live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline, seen = time.monotonic() + self.wait_s, None
        while not self._create():
            current = _read_holder(self.path)
            if current is not None:
                seen = current
                if (reason := self.stale_reason(current)) is None:
                    raise RunDirLocked(
                        f"{self.path.parent} is in use by {current.describe()}, whose heartbeat is "
                        f"{time.time() - current.heartbeat:.0f} s old; one driver per run directory: "
                        "wait for it to finish, or stop it"
                    )
                if self._take_over(current, reason):
                    break
            elif self._age(self.path) > self.stale_s and self._take_over(None, "its lock file is unreadable"):
                break  # a driver that died between creating its lock file and writing it
            if time.monotonic() > deadline:
                who = seen.describe() if seen else "another driver"
                raise RunDirLocked(
                    f"{self.path.parent} is in use by {who}: its lock {self.path} did not come free "
                    f"in {self.wait_s:g} s"
                )
            time.sleep(0.05)  # being written, or being taken over by another driver: look again
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lock {self.path}", daemon=True)
        self._beat.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.holder is not None and self._still_mine():
            self.path.unlink(missing_ok=True)
        self.holder = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---- inside ------------------------------------------------------------------------------------
    def _create(self) -> bool:
        now = time.time()
        holder = LockHolder(
            pid=os.getpid(),
            host=socket.gethostname(),
            command=self.command,
            since=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
            heartbeat=now,
            token=os.urandom(8).hex(),
        )
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(dataclasses.asdict(holder)))
            f.flush()
            os.fsync(f.fileno())
        self.holder = holder
        return True

    def stale_reason(self, holder: LockHolder) -> str | None:
        """Why the holder is gone, or None while it may still be running."""
        age = time.time() - holder.heartbeat
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        if holder.host == socket.gethostname() and not _process_alive(holder.pid):
            return f"process {holder.pid} is gone"
        return None

    @staticmethod
    def _age(path: Path) -> float:
        try:
            return time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _take_over(self, stale: LockHolder | None, reason: str) -> bool:
        """Replace a stale lock by ours, one taker at a time (the guard file); False if another driver
        is taking it over or got it first."""
        guard = self.path.with_name(f"{self.path.name}.takeover")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            if self._age(guard) > self.stale_s:  # a taker died between its two steps
                guard.unlink(missing_ok=True)
            return False
        try:
            current = _read_holder(self.path)
            if (current.token if current else None) != (stale.token if stale else None):
                return False  # it changed hands meanwhile: the caller looks again
            log.warning(
                f"{self.path}: taking over the lock of "
                f"{stale.describe() if stale else 'a driver that died while taking it'}: {reason}"
            )
            self.path.unlink(missing_ok=True)
            return self._create()
        finally:
            guard.unlink(missing_ok=True)

    def _still_mine(self) -> bool:
        current = _read_holder(self.path)
        return current is not None and self.holder is not None and current.token == self.holder.token

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._still_mine():
                log.error(
                    f"{self.path}: this driver lost its lock (taken over as stale); another driver may now "
                    "write the run directory"
                )
                return
            assert self.holder is not None  # _still_mine checked it
            self.holder = dataclasses.replace(self.holder, heartbeat=time.time())
            write_text_atomic(self.path, json.dumps(dataclasses.asdict(self.holder)))


# ---------------------------------------------------------------------------------------------
# the run directory


class RunDir:
    """runs/<sweep>/: one typed reader and writer per file (see the module docstring)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and self.root == other.root

    def __hash__(self) -> int:
        return hash(self.root)

    # ---- paths inside tables: relative to the run directory -------------------------------------
    def path(self, relative: str | Path) -> Path:
        """A path that a table or JSON file stores (relative to the run directory) as a real path."""
        return self.root / relative

    def relative(self, path: Path | str) -> str:
        return str(Path(path).relative_to(self.root))

    # ---- sweep.yaml --------------------------------------------------------------------------
    @property
    def sweep_yaml(self) -> Path:
        return self.root / "sweep.yaml"

    def exists(self) -> bool:
        return self.sweep_yaml.is_file()

    def config(self) -> SweepConfig:
        """The resolved sweep this run directory was made for."""
        if not self.sweep_yaml.is_file():
            raise FileNotFoundError(f"{self.root}: not a run directory (no sweep.yaml)")
        return SweepConfig.model_validate(yaml.safe_load(self.sweep_yaml.read_text()))

    def config_text(self) -> str:
        return self.sweep_yaml.read_text()

    def write_config(self, cfg: SweepConfig) -> None:
        write_text_atomic(self.sweep_yaml, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    def trials_by_id(self) -> dict[str, Trial]:
        """The grid of the sweep.yaml, by trial id (each with its rung's overrides applied); a trial that
        started is as its trial.json records it (`auto` settings made concrete by the sweep)."""
        trials = {t.trial_id: t for t in expand_grid(self.config())}
        for trial_id in trials:
            spec = self.trial(trial_id).spec()
            if spec is not None:
                trials[trial_id] = Trial.model_validate(spec["trial"])
        return trials

    # ---- data/ ---------------------------------------------------------------------------------
    @property
    def data(self) -> DataDir:
        return DataDir(self.root / "data")

    @property
    def tokenizer(self) -> Path:
        return self.data.tokenizer

    def manifest(self) -> Manifest:
        return self.data.manifest()

    def shard_paths(self, split: Split) -> list[Path]:
        return self.data.shard_paths(split)

    def data_of(self, trial: Trial) -> DataDir:
        """The data directory a trial reads: its representation's (data/ itself for smiles)."""
        return self.data.representation(trial.representation)

    # ---- trials/ --------------------------------------------------------------------------------
    @property
    def trials(self) -> Path:
        return self.root / "trials"

    def trial(self, trial_id: str) -> TrialDir:
        return TrialDir(self.trials / trial_id)

    def trial_of(self, checkpoint: str) -> TrialDir:
        """The trial folder a checkpoint path (relative, as tables store it) lies in."""
        return TrialDir(self.path(checkpoint).parent.parent)

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    # ---- results/ -----------------------------------------------------------------------------
    @property
    def results(self) -> Path:
        return self.root / "results"

    def table_path(self, name: str) -> Path:
        if name not in TABLES:
            raise KeyError(f"no result table {name!r}; the tables are {', '.join(TABLES)}")
        return self.results / f"{name}.parquet"

    def has_table(self, name: str) -> bool:
        return self.table_path(name).is_file()

    def read_table(self, name: str) -> pd.DataFrame:
        """results/<name>.parquet with TABLES[name]'s columns; an empty frame when there is no file."""
        path = self.table_path(name)
        if not path.is_file():
            return pd.DataFrame(columns=list(TABLES[name].columns))
        return check_columns(name, pd.read_parquet(path), path)

    def write_table(self, name: str, table: pd.DataFrame) -> Path:
        path = self.table_path(name)
        write_parquet_atomic(path, check_columns(name, table, path))
        return path

    def fits_path(self) -> Path:
        return self.results / "fits.json"

    def has_fits(self) -> bool:
        return self.fits_path().is_file()

    def fits(self) -> dict[str, Any]:
        if not self.has_fits():
            raise FileNotFoundError(f"{self.fits_path()}: no fits; run `clmscale fit {self.root}` first")
        return json.loads(self.fits_path().read_text())

    def write_fits(self, fits: Mapping[str, Any], table: pd.DataFrame) -> tuple[Path, Path]:
        """fits.json and its long-format twin fits.parquet."""
        write_json_atomic(self.fits_path(), fits)
        return self.fits_path(), self.write_table("fits", table)

    def pretrain(self) -> pd.DataFrame:
        """results/pretrain.parquet, which every later stage starts from."""
        if not self.has_table("pretrain"):
            raise FileNotFoundError(
                f"{self.table_path('pretrain')}: no pretraining results; run `clmscale sweep` first"
            )
        return self.read_table("pretrain")

    def counted_checkpoints(self) -> Counted:
        return counted_checkpoints(self.pretrain())

    def fit_inputs(self) -> FitInputs:
        """The config and tables, with the rows that count: one derivation for the fit and the report."""
        cfg = self.config()
        tables = {name: self.read_table(name) for name in ("pretrain", *ANALYSIS_TABLES, "pca")}
        present = {name: self.has_table(name) for name in tables}
        if not present["pretrain"]:
            self.pretrain()  # raises with the message that says to run the sweep
        # the (N, D) points of the laws and trends: annealed checkpoints (fits.annealed_only), the rest drawn
        # as trajectory only; analyze measures every counted checkpoint (RunDir.counted_checkpoints)
        counted = counted_checkpoints(tables["pretrain"], annealed_only=cfg.fits.annealed_only)
        excluded = list(counted.excluded)
        measured = {}
        for kind in MEASUREMENT_TABLES:
            measured[kind], notes = usable_measurements(tables[kind], kind, counted.left_out_trials)
            excluded += notes
        characteristics, notes = usable_task_characteristics(tables["tasks"])
        excluded += notes
        pretrain = tables["pretrain"]
        left_out = pretrain[pretrain["trial_id"].isin(counted.left_out_trials)]
        left_out = left_out[np.isfinite(left_out[["flops", "val_loss"]].to_numpy(float)).all(axis=1)]
        return FitInputs(
            config=cfg,
            tables=tables,
            present=present,
            checkpoints=counted.checkpoints,
            trajectory=counted.trajectory,
            left_out=left_out,
            measured=measured,
            points=downstream_points(measured["finetune"], counted.checkpoints),
            excluded=excluded,
            characteristics=characteristics,
        )

    # ---- analysis/ ------------------------------------------------------------------------------
    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    def finetuned_weights(self, trial_id: str, tokens: float, task: str, split_seed: int) -> Path:
        """The encoder fine-tuned from one checkpoint on one task and split seed (first fine-tuning seed);
        its head is `head_file` of it."""
        return self.analysis / "finetuned" / trial_id / str(int(tokens)) / f"{task}.split{split_seed}.safetensors"

    def probe_head(self, trial_id: str, tokens: float, task: str) -> Path:
        """The linear head fitted on the frozen pretrained encoder (first split seed), for the task loss at
        the pretrained weights; the encoder is the checkpoint itself."""
        return self.analysis / "pretrained_task" / trial_id / str(int(tokens)) / f"{task}.safetensors"

    @property
    def ray_train_storage(self) -> Path:
        """Ray Train's storage for the analysis' worker groups (each run's folder removed when it returns)."""
        return self.analysis / "ray_train"

    # ---- report/ ----------------------------------------------------------------------------------
    @property
    def report(self) -> Path:
        return self.root / "report"

    def figure(self, name: str) -> Path:
        """report/<name>.png: one figure of the report (embedded in index.html, kept beside it)."""
        return self.report / f"{name}.png"

    def write_report(self, html: str) -> Path:
        path = self.report / "index.html"
        write_text_atomic(path, html)
        return path

    # ---- .lock ------------------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def lock(self, command: str, **options: float) -> RunDirLock:
        """The run directory's driver lock, for `with rd.lock("clmscale sweep x.yaml"):` (see RunDirLock)."""
        return RunDirLock(self.lock_path, command, **options)

    def lock_holder(self) -> LockHolder | None:
        """Who holds the lock now (a stale holder included), or None."""
        return _read_holder(self.lock_path)

    # ---- logs/ ------------------------------------------------------------------------------------
    @property
    def logs(self) -> Path:
        """logs/: what Ray and the driver print (worker output, progress bars, Ray's logging), for people."""
        return self.root / "logs"

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def open_log(self, name: str) -> TextIO:
        """logs/<name>.log opened for appending, line-buffered (a log, not a result: no atomic rename)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        return open(self.log_file(name), "a", buffering=1, encoding="utf-8", errors="replace")

    # ---- events.jsonl -------------------------------------------------------------------------
    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    def record_event(self, event: Mapping[str, Any]) -> None:
        """Append one JSON line to events.jsonl (with the time); see `fault_events`."""
        append_jsonl(self.events, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **event})

    def fault_events(self) -> list[dict[str, Any]]:
        """Every fault the run survived: events.jsonl, then each trial's restarts and corrupt checkpoints
        from its metrics.jsonl (with the trial id), as one list of dicts."""
        events = read_jsonl(self.events)
        for folder in sorted(self.trials.glob("*/")):
            events += [
                {"stage": "sweep", "trial_id": folder.name, **r}
                for r in TrialDir(folder).metrics()
                if r.get("event") in ("resumed", "corrupt_checkpoint")
            ]
        return events


def head_file(weights: Path) -> Path:
    """Where a fine-tuned encoder's linear head lies: `<stem>.head.safetensors` beside it."""
    weights = Path(weights)
    return weights.with_name(f"{weights.stem}.head.safetensors")
