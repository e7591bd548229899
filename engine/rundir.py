"""The run directory: the only channel between stages.

    runs/<sweep>/sweep.yaml          the resolved config, written before anything runs
    runs/<sweep>/data/               prepare: train-*.parquet, val-*.parquet, manifest.json,
                                     rejects.csv, tokenizer/
    runs/<sweep>/trials/<trial>/     one pretraining run: trial.json, metrics.jsonl,
                                     checkpoints/<tokens>/ (HF save_pretrained + tokenizer)
    runs/<sweep>/tune/               Ray Tune's experiment state (for --resume)
    runs/<sweep>/results/            pretrain / finetune / hessian / landscape .parquet, fits.json
    runs/<sweep>/report/             index.html and figures, built only from results/
    runs/<sweep>/events.jsonl        what a stage did about a fault (e.g. a corrupt checkpoint replaced)

A stage reads only what earlier stages wrote and writes only its own folder, so any stage can be
rerun alone. `RunDir` names these paths in one place; it creates nothing by itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def sweep_yaml(self) -> Path:
        return self.root / "sweep.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.json"

    @property
    def tokenizer(self) -> Path:
        return self.data / "tokenizer"

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    def trial(self, trial_id: str) -> Path:
        return self.trials / trial_id

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def table(self, kind: str) -> Path:
        """results/<kind>.parquet, for kind in pretrain, finetune, hessian, landscape, ..."""
        return self.results / f"{kind}.parquet"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    def record_event(self, event: dict) -> None:
        """Append one JSON line to events.jsonl (with the time); see `fault_events`."""
        import time

        with open(self.events, "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **event}, default=str) + "\n")

    def fault_events(self) -> list[dict]:
        """Every fault the run survived: events.jsonl, then each trial's restarts and corrupt checkpoints
        from its metrics.jsonl (with the trial id), as one list of dicts."""
        events = _jsonl(self.events)
        for metrics in sorted(self.trials.glob("*/metrics.jsonl")):
            events += [{"stage": "sweep", "trial_id": metrics.parent.name, **r} for r in _jsonl(metrics)
                       if r.get("event") in ("resumed", "corrupt_checkpoint")]
        return events


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def sha256_stream(f) -> str:
    """sha256 of everything a binary file object yields, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via a temporary file and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)
