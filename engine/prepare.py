"""prepare: corpus files -> canonical, deduplicated train/val shards + manifest.json + tokenizer/.

The story, in order: read the sweep's downstream tasks (local files only) and canonicalise them as
the corpus will be, with InChIKeys; read SMILES from CSV / SMI / Parquet files (optionally gzipped)
on the driver, canonicalise them with RDKit in chunks (Ray tasks across the cluster, or in-process
with `parallel=False`; both run the same `canonicalize_chunk`, which also computes the InChIKeys
when there is something to decontaminate), drop exact duplicates (first occurrence wins), drop
molecules whose InChIKey (or its connectivity layer) is a task molecule's, apply the size filters,
split train/val (random or Bemis-Murcko scaffold), write Parquet shards, `rejects.csv`, the
tokenizer built from the train split plus the tasks' token types, and last `manifest.json`, all
through `engine.rundir.DataDir`. The manifest is written last: its presence means the data
directory is complete. The steps after canonicalisation are `_tally` (dedup, decontamination and
filters), `_check_tally` (a corpus that leaves nothing to train on) and the split.
`canonical_smiles` is the same canonicalisation for task SMILES downstream (engine.analyze).

Counts add up: n_in = n_invalid + n_duplicate + n_decontaminated + n_filtered + n_kept.
Rerunning with the same input bytes and options returns the existing manifest ("already prepared").
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from rdkit import Chem, rdBase
from rdkit.Chem.Scaffolds import MurckoScaffold

from clmscale.engine.config import DataConfig, DownstreamConfig
from clmscale.engine.files import sha256_file
from clmscale.engine.rundir import (
    Counts,
    DataDir,
    InputFile,
    Manifest,
    ManifestError,
    ShardFile,
    Split,
    SplitCounts,
    TaskOverlap,
    TokenizerInfo,
)
from clmscale.engine.tokenizer import build_vocab, count_unk, extend_vocab, smiles_tokens, tokenizer_from_vocab

log = logging.getLogger("clmscale.prepare")

SHOW_INVALID = 3  # invalid SMILES logged one by one; the rest are only in rejects.csv
PROGRESS_EVERY_S = 5.0  # at most one progress line per this many seconds, plus one at the end


class DataError(ValueError):
    """A corpus that cannot be prepared; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------
# the core: canonicalise one chunk of SMILES (runs on Ray workers and in-process alike)


_WHITESPACE = re.compile(r"\s")


class Canonical(NamedTuple):
    smiles: str | None  # RDKit canonical SMILES; None when the input is invalid
    error: str | None  # why it is invalid
    n_heavy_atoms: int
    n_tokens: int  # regex tokens of the canonical SMILES
    scaffold: str | None  # Bemis-Murcko scaffold SMILES ('' when acyclic); only when asked for
    inchikey: str | None = None  # standard InChIKey of the canonical molecule; only when asked for ('' if InChI fails)


def canonicalize_chunk(
    smiles: Sequence[str], isomeric: bool = True, scaffolds: bool = False, inchikeys: bool = False
) -> list[Canonical]:
    """Canonicalise each SMILES with RDKit: one `Canonical` per input, in order; never raises.

    RDKit's own log lines are blocked here; the reason for each failure is returned instead.
    `isomeric=False` removes stereochemistry only (isotopes stay). `inchikeys`: also the InChIKey of
    the molecule as canonicalised (decontamination), here so it runs in the same Ray tasks.
    """
    with rdBase.BlockLogs():
        return [_canonicalize_one(s, isomeric, scaffolds, inchikeys) for s in smiles]


def canonical_smiles(smiles: Sequence[str], isomeric: bool = True, what: str = "SMILES") -> list[str]:
    """The corpus's canonicalisation of SMILES that must all be valid (task SMILES before tokenisation):
    the very function prepare runs, so a task molecule is spelled as the model saw molecules in pretraining.
    Raises ValueError naming `what` and the first SMILES it cannot use."""
    out = canonicalize_chunk(smiles, isomeric)
    bad = [(i, s, c.error) for i, (s, c) in enumerate(zip(smiles, out, strict=True)) if c.smiles is None]
    if bad:
        i, s, error = bad[0]
        raise ValueError(
            f"{what}: {len(bad)} SMILES cannot be canonicalised as the corpus was, e.g. molecule {i}: {s!r}: {error}"
        )
    return [c.smiles for c in out if c.smiles is not None]


def _canonicalize_one(smiles: str, isomeric: bool, scaffolds: bool, inchikeys: bool = False) -> Canonical:
    text = smiles.strip() if isinstance(smiles, str) else ""
    if not text:
        return _invalid("empty SMILES")
    if _WHITESPACE.search(text):
        # RDKit would read 'CCO foo' as CCO named foo; a field with spaces is not a clean SMILES
        return _invalid("whitespace inside SMILES")
    try:
        mol = Chem.MolFromSmiles(text)
        if mol is None:
            return _invalid(_why_invalid(text))
        if not isomeric:
            Chem.RemoveStereochemistry(mol)
        canonical = Chem.MolToSmiles(mol)
        scaffold = MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False) if scaffolds else None
        n_heavy_atoms = mol.GetNumHeavyAtoms()
        inchikey = (Chem.MolToInchiKey(mol) or "") if inchikeys and canonical else None
    except Exception as err:  # e.g. a lone surrogate cannot be encoded for RDKit
        return _invalid(f"RDKit error: {type(err).__name__}: {' '.join(str(err).split())}")
    if not canonical:
        return _invalid("no atoms")
    return Canonical(canonical, None, n_heavy_atoms, len(smiles_tokens(canonical)), scaffold, inchikey)


def _invalid(reason: str) -> Canonical:
    return Canonical(None, reason, 0, 0, None)


def _why_invalid(text: str) -> str:
    """Parse again with RDKit's error log captured: its first message is the reason."""
    with rdBase.CaptureErrorLog() as capture:
        Chem.MolFromSmiles(text)
    lines = [line.split("] ", 1)[-1].strip() for line in capture.messages.splitlines()]  # drop '[hh:mm:ss]'
    lines = [line.removeprefix("SMILES Parse Error: ").rstrip(":") for line in lines if line]
    if not lines:
        return "RDKit cannot parse"
    where = [line for line in lines[1:] if line.startswith("check for mistakes")]
    return "; ".join(lines[:1] + where[:1])


# ---------------------------------------------------------------------------------------------
# reading the corpus: (line, smiles) records per file, line numbers as a person counts them


class Chunk(NamedTuple):
    file_index: int
    lines: list[int]  # 1-based line (CSV / SMI, header is line 1) or row (Parquet) per SMILES
    smiles: list[str]


def corpus_format(path: Path) -> tuple[str, bool]:
    """('csv' | 'tsv' | 'smi' | 'parquet', gzipped) from the file name."""
    name = path.name.lower()
    gzipped = name.endswith(".gz")
    stem = name.removesuffix(".gz")
    for kind, suffixes in {
        "csv": (".csv",),
        "tsv": (".tsv",),
        "smi": (".smi", ".smiles", ".txt"),
        "parquet": (".parquet", ".pq"),
    }.items():
        if stem.endswith(suffixes):
            return kind, gzipped
    raise DataError(
        f"{path}: unknown corpus format '{Path(stem).suffix}'; expected .csv, .tsv, .smi or .parquet, optionally .gz"
    )


def read_corpus(path: Path, smiles_column: str | None = None) -> Iterator[tuple[int, str]]:
    """(line, smiles) for every record of one corpus file; DataError when it cannot be read."""
    kind, gzipped = corpus_format(path)
    what = f"{'gzip-compressed ' if gzipped else ''}{kind.upper() if kind != 'parquet' else 'Parquet'}"
    try:
        if kind == "parquet":
            yield from _read_parquet(path, gzipped, smiles_column)
        else:
            opener = gzip.open if gzipped else open
            # utf-8-sig: a byte-order mark (Excel's CSVs) would otherwise stick to the first column name
            with opener(path, "rt", encoding="utf-8-sig", newline="" if kind != "smi" else None) as f:
                if kind == "smi":
                    yield from _read_smi(f)
                else:
                    yield from _read_delimited(f, path, "," if kind == "csv" else "\t", smiles_column)
    except DataError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, csv.Error, pa.ArrowException) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: cannot read as {what}: {reason}") from err


def _pick_column(path: Path, columns: list[str], wanted: str | None) -> int:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{path}: no SMILES column '{wanted}' (columns: {', '.join(map(repr, columns))})")
        return columns.index(wanted)
    lower = [c.strip().lower() for c in columns]
    if "smiles" in lower:
        return lower.index("smiles")
    log.info("%s: no column named smiles; using the first column %r", path, columns[0])
    return 0


def _read_delimited(
    f: io.TextIOBase, path: Path, delimiter: str, smiles_column: str | None
) -> Iterator[tuple[int, str]]:
    reader = csv.reader(f, delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return  # an empty file: counted as no records
    col = _pick_column(path, header, smiles_column)
    while True:
        line = reader.line_num + 1  # where the next record starts (a quoted field may span lines)
        row = next(reader, None)
        if row is None:
            return
        if not row:
            continue  # a blank line is not a record
        yield line, row[col] if col < len(row) else ""


def _read_smi(f: io.TextIOBase) -> Iterator[tuple[int, str]]:
    """One 'SMILES [name ...]' per line; a first line whose first field is 'smiles' is a header."""
    first = True
    for line_number, line in enumerate(f, 1):
        fields = line.split()
        if not fields:
            continue
        if first and fields[0].lower() == "smiles":
            first = False
            continue
        first = False
        yield line_number, fields[0]


def _read_parquet(path: Path, gzipped: bool, smiles_column: str | None) -> Iterator[tuple[int, str]]:
    source = io.BytesIO(gzip.decompress(path.read_bytes())) if gzipped else path
    parquet = pq.ParquetFile(source)
    columns = parquet.schema_arrow.names
    if not columns:
        return
    col = columns[_pick_column(path, columns, smiles_column)]
    dtype = parquet.schema_arrow.field(col).type
    if not (pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)):
        raise DataError(f"{path}: SMILES column '{col}' holds {dtype}, expected strings")
    row = 0
    for batch in parquet.iter_batches(columns=[col], batch_size=65_536):
        for value in batch.column(0).to_pylist():
            row += 1
            yield row, value or ""


def read_chunks(
    paths: Sequence[Path], smiles_column: str | None, chunk_rows: int, max_molecules: int | None
) -> Iterator[Chunk]:
    """The corpus in file order, in chunks of at most `chunk_rows`, stopping after `max_molecules`."""
    remaining = max_molecules if max_molecules is not None else float("inf")
    for file_index, path in enumerate(paths):
        records = read_corpus(path, smiles_column)
        while remaining > 0:
            batch = list(itertools.islice(records, int(min(chunk_rows, remaining))))
            if not batch:
                break
            remaining -= len(batch)
            yield Chunk(file_index, [line for line, _ in batch], [smiles for _, smiles in batch])
        if remaining <= 0:
            return


# ---------------------------------------------------------------------------------------------
# running the core over the chunks: in-process, or as Ray tasks


def _canonicalize_serial(
    chunks: Iterable[Chunk], isomeric: bool, scaffolds: bool, inchikeys: bool = False
) -> Iterator[tuple[Chunk, list[Canonical]]]:
    for chunk in chunks:
        yield chunk, canonicalize_chunk(chunk.smiles, isomeric, scaffolds, inchikeys)


def _canonicalize_on_ray(
    chunks: Iterable[Chunk], isomeric: bool, scaffolds: bool, inchikeys: bool = False, stall_warning_s: float = 60.0
) -> Iterator[tuple[Chunk, list[Canonical]]]:
    """Ray tasks over the chunks, results yielded in input order (so dedup is deterministic).

    Reading stays a few chunks ahead of the cluster: 2 per CPU in flight, never the whole corpus.
    """
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS / a running local cluster, else a new local one
    task = ray.remote(num_cpus=1)(canonicalize_chunk)
    window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1))) + 1
    chunks = iter(chunks)
    inputs: dict[int, Chunk] = {}
    running: dict[ray.ObjectRef, int] = {}
    finished: dict[int, ray.ObjectRef] = {}
    n_submitted = n_yielded = 0
    exhausted = False
    while True:
        while not exhausted and len(running) < window:
            chunk = next(chunks, None)
            if chunk is None:
                exhausted = True
                break
            inputs[n_submitted] = chunk
            running[task.remote(chunk.smiles, isomeric, scaffolds, inchikeys)] = n_submitted  # type: ignore[call-arg]  # ray's stubs see no arguments of a wrapped function
            n_submitted += 1
        if running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=stall_warning_s)
            if not ready:
                log.warning(
                    "no chunk finished in %.0f s (%d running); free cluster resources: %s",
                    stall_warning_s,
                    len(running),
                    ray.available_resources(),
                )
            for ref in ready:
                finished[running.pop(ref)] = ref
        while n_yielded in finished:
            yield inputs.pop(n_yielded), ray.get(finished.pop(n_yielded))
            n_yielded += 1
        if exhausted and not running and not finished:
            return


@dataclass(frozen=True)
class Progress:
    n_chunks: int
    n_done: int  # SMILES canonicalised so far
    n_invalid: int
    n_duplicate: int
    elapsed_s: float


def log_progress(p: Progress) -> None:
    rate = p.n_done / p.elapsed_s if p.elapsed_s > 0 else 0.0
    log.info(
        "canonicalised %s SMILES in %d chunks (%s invalid, %s duplicates), %.0f mol/s",
        f"{p.n_done:,}",
        p.n_chunks,
        f"{p.n_invalid:,}",
        f"{p.n_duplicate:,}",
        rate,
    )


# ---------------------------------------------------------------------------------------------
# prepare


def prepare(
    cfg: DataConfig,
    data: DataDir | Path,
    *,
    downstream: DownstreamConfig | None = None,
    parallel: bool = True,
    overwrite: bool = False,
    chunk_rows: int = 2_000,  # SMILES per Ray task: ~0.5 s of RDKit work, small enough to balance
    progress: Callable[[Progress], None] = log_progress,
) -> Manifest:
    """Turn `cfg.corpus` into shards, rejects.csv, tokenizer/ and manifest.json in `data` (a run's data/).

    `downstream` (the sweep's section): its tasks are read here, canonicalised as the corpus is, for
    decontamination (`cfg.decontaminate`) and so that the vocabulary covers their tokens.
    `parallel=True` canonicalises on Ray (initialising it only if the caller has not).
    """
    data = data if isinstance(data, DataDir) else DataDir(data)
    inputs = [_describe_input(p) for p in cfg.corpus]
    vocab_tasks, decon_tasks = task_roles(cfg, downstream)
    run = _canonicalize_on_ray if parallel else _canonicalize_serial
    molecules = load_task_molecules(
        [*dict.fromkeys([*vocab_tasks, *decon_tasks])], downstream, cfg.isomeric, run, chunk_rows
    )
    options = cfg.model_dump(mode="json", exclude={"corpus"})
    # the task molecule sets as read: a changed task file makes a different preparation
    options["task_molecules"] = {name: m.sha256 for name, m in molecules.items()}
    done = _existing_manifest(data, inputs, options, overwrite)
    if done is not None:
        log.info("%s: already prepared from the same inputs and options; nothing to do", data.path)
        return done
    data.path.mkdir(parents=True, exist_ok=True)

    # ---- canonicalise (the expensive part), dedup, decontaminate and filter as chunks come back, in order
    scaffolds = cfg.split == "scaffold"
    contaminants = contaminant_keys([molecules[n] for n in decon_tasks], cfg.decontaminate_key)
    chunks = read_chunks(cfg.corpus, cfg.smiles_column, chunk_rows, cfg.max_molecules)
    results = run(chunks, cfg.isomeric, scaffolds, bool(decon_tasks))
    tally = _tally(results, cfg, progress, contaminants)
    data.write_rejects(tally.rejects)
    _check_tally(tally, cfg, data)

    # ---- split, then write shards, tokenizer, manifest (last: it marks the directory complete)
    kept = tally.kept
    if scaffolds:
        train_idx, val_idx = scaffold_val_split([c.scaffold or "" for c in kept], cfg.val_fraction, cfg.seed)
    else:
        train_idx, val_idx = random_val_split(len(kept), cfg.val_fraction, cfg.seed)
    splits: dict[Split, list[Canonical]] = {"train": [kept[i] for i in train_idx], "val": [kept[i] for i in val_idx]}
    tally.kept = kept = []  # the split lists hold the molecules now
    shards = [s for split, rows in splits.items() for s in _write_shards(data, split, rows, cfg.shard_rows)]
    # the vocabulary: the train split's tokens, then the token types only the tasks' canonical SMILES have
    # (types, never labels; without them a MOSES vocabulary reads a task's [C@@H] as [UNK])
    corpus_vocab = build_vocab(c.smiles for c in splits["train"] if c.smiles is not None)
    vocab = extend_vocab(corpus_vocab, (s for name in vocab_tasks for s in molecules[name].smiles))
    tokenizer = tokenizer_from_vocab(vocab, out_dir=data.tokenizer)
    manifest = Manifest(
        inputs=inputs,
        options=options,
        rdkit_version=rdBase.rdkitVersion,
        counts=tally.counts(splits),
        shards=shards,
        tokenizer=TokenizerInfo(
            path=data.tokenizer.name,
            vocab_size=len(tokenizer),
            n_unk=count_unk(tokenizer, (c.smiles for c in splits["val"] if c.smiles is not None)),
            tasks=list(vocab_tasks),
            task_tokens=list(vocab)[len(corpus_vocab) :],
        ),
        decontamination={
            name: TaskOverlap(
                task_molecules=len(molecules[name].keys(cfg.decontaminate_key)), removed=tally.removed.get(name, 0)
            )
            for name in decon_tasks
        },
        decontamination_key=cfg.decontaminate_key if decon_tasks else None,
    )
    data.write_manifest(manifest)
    c = manifest.counts
    log.info(
        "%s: kept %s of %s SMILES (%s invalid, %s duplicates, %s task molecules, %s filtered): %s train / %s val, "
        "vocab %d (%d token types from the tasks only), %d [UNK] in val",
        data.path,
        f"{c.n_kept:,}",
        f"{c.n_in:,}",
        f"{c.n_invalid:,}",
        f"{c.n_duplicate:,}",
        f"{c.n_decontaminated:,}",
        f"{c.n_filtered:,}",
        f"{c.train.n_molecules:,}",
        f"{c.val.n_molecules:,}",
        manifest.tokenizer.vocab_size,
        len(manifest.tokenizer.task_tokens),
        manifest.tokenizer.n_unk,
    )
    return manifest


# ---------------------------------------------------------------------------------------------
# the downstream tasks at prepare: decontamination and the vocabulary


@dataclass(frozen=True)
class TaskMolecules:
    """One downstream task's molecules as prepare sees them: through the corpus's canonicalisation."""

    name: str
    smiles: list[str]  # canonical, in file order (every labelled row RDKit can parse)
    inchikeys: list[str]  # one per SMILES; '' where InChI fails (such a molecule cannot be matched)

    def keys(self, mode: str) -> set[str]:
        """The distinct keys: whole InChIKeys, or their first 14 characters (the connectivity layer)."""
        return {k if mode == "inchikey" else k[:14] for k in self.inchikeys if k}

    @property
    def sha256(self) -> str:
        text = "\n".join(sorted({f"{s}\t{k}" for s, k in zip(self.smiles, self.inchikeys, strict=True)}))
        return hashlib.sha256(text.encode()).hexdigest()


def task_roles(cfg: DataConfig, downstream: DownstreamConfig | None) -> tuple[list[str], list[str]]:
    """(tasks whose tokens the vocabulary covers: every downstream task, tasks the corpus is cleaned of)."""
    vocab = list(downstream.tasks) if downstream is not None else []
    if cfg.decontaminate is True:
        return vocab, list(vocab)
    return vocab, list(cfg.decontaminate or [])


def load_task_molecules(
    names: Sequence[str],
    downstream: DownstreamConfig | None,
    isomeric: bool,
    run: Callable[..., Iterator[tuple[Chunk, list[Canonical]]]] = _canonicalize_serial,
    chunk_rows: int = 2_000,
) -> dict[str, TaskMolecules]:
    """Each task's SMILES (all splits, no max_molecules cap) canonicalised with InChIKeys by `run` (Ray tasks or
    in-process). Task files are found as analyze finds them (data_dir, CLMSCALE_DATA_DIR, the cache, else a download
    checked by sha256); a task that cannot be loaded is a DataError naming it."""
    if not names:
        return {}
    from clmscale.engine import tasks  # pandas; only when there are tasks

    custom = {t.name: t for t in downstream.custom} if downstream is not None else {}
    data_dir = downstream.data_dir if downstream is not None else None
    loaded = []
    for name in names:
        try:
            loaded.append(tasks.load_task(custom.get(name, name), data_dir=data_dir))
        except (ValueError, OSError) as err:  # TaskError is a ValueError
            raise DataError(
                f"task {name!r} is read at prepare (decontamination, vocabulary) but cannot be loaded: {err}"
            ) from None
    chunks = (
        Chunk(i, list(range(start, min(start + chunk_rows, len(t)))), t.smiles[start : start + chunk_rows])
        for i, t in enumerate(loaded)
        for start in range(0, len(t), chunk_rows)
    )
    smiles: list[list[str]] = [[] for _ in loaded]
    keys: list[list[str]] = [[] for _ in loaded]
    for chunk, canonical in run(chunks, isomeric, False, True):
        for raw, c in zip(chunk.smiles, canonical, strict=True):
            if c.smiles is None:  # the loader keeps what RDKit parses; e.g. a SMILES with a space inside
                log.warning(
                    "task %s: %r cannot be canonicalised as the corpus is (%s); left out",
                    names[chunk.file_index],
                    raw,
                    c.error,
                )
                continue
            smiles[chunk.file_index].append(c.smiles)
            keys[chunk.file_index].append(c.inchikey or "")
    out = {}
    for name, s, k in zip(names, smiles, keys, strict=True):
        if k.count(""):
            log.warning("task %s: %d molecules without an InChIKey cannot be matched in the corpus", name, k.count(""))
        out[name] = TaskMolecules(name, s, k)
    return out


def contaminant_keys(molecules: Iterable[TaskMolecules], mode: str) -> dict[str, list[str]]:
    """Key -> the tasks that hold a molecule with it (a key may be in several tasks)."""
    found: dict[str, list[str]] = {}
    for m in molecules:
        for key in sorted(m.keys(mode)):
            found.setdefault(key, []).append(m.name)
    return found


# ---------------------------------------------------------------------------------------------
# dedup, decontamination and filters


@dataclass
class Tally:
    """What the dedup-and-filter pass saw: counts, the kept molecules in corpus order, the rejects."""

    files: str  # the corpus files, for messages
    n_in: int = 0
    n_invalid: int = 0
    n_duplicate: int = 0
    n_decontaminated: int = 0  # the same molecule as a downstream task's
    n_heavy: int = 0  # removed by max_heavy_atoms
    n_long: int = 0  # removed by max_tokens
    kept: list[Canonical] = field(default_factory=list)
    rejects: list[tuple[str, int, str, str]] = field(default_factory=list)  # file, line, smiles, reason
    removed: Counter[str] = field(default_factory=Counter)  # task -> corpus molecules removed as its molecules

    def counts(self, splits: dict[Split, list[Canonical]]) -> Counts:
        """Counts add up: n_in = n_invalid + n_duplicate + n_decontaminated + n_filtered + n_kept (= train + val)."""
        n_filtered = self.n_heavy + self.n_long
        per_split = {
            split: SplitCounts(n_molecules=len(rows), n_tokens=sum(c.n_tokens for c in rows))
            for split, rows in splits.items()
        }
        counts = Counts(
            n_in=self.n_in,
            n_invalid=self.n_invalid,
            n_duplicate=self.n_duplicate,
            n_decontaminated=self.n_decontaminated,
            n_filtered=n_filtered,
            n_filtered_heavy_atoms=self.n_heavy,
            n_filtered_tokens=self.n_long,
            n_kept=self.n_in - self.n_invalid - self.n_duplicate - self.n_decontaminated - n_filtered,
            **per_split,
        )
        assert counts.n_kept == counts.train.n_molecules + counts.val.n_molecules
        return counts


def _tally(
    results: Iterable[tuple[Chunk, list[Canonical]]],
    cfg: DataConfig,
    progress: Callable[[Progress], None],
    contaminants: dict[str, list[str]] | None = None,
) -> Tally:
    """Exact duplicates dropped (first occurrence wins), then task molecules (`contaminants`: key -> tasks, keys
    as `cfg.decontaminate_key`), then the size filters, chunk by chunk in order."""
    tally = Tally(files=", ".join(str(p) for p in cfg.corpus))
    seen: set[str] = set()
    t0 = last_report = time.perf_counter()
    n_chunks = 0
    for chunk, canonical in results:
        source = str(cfg.corpus[chunk.file_index])
        for line, raw, c in zip(chunk.lines, chunk.smiles, canonical, strict=True):
            tally.n_in += 1
            if c.smiles is None:
                tally.n_invalid += 1
                tally.rejects.append((source, line, raw, c.error or "invalid"))
                if tally.n_invalid <= SHOW_INVALID:
                    log.warning("%s:%d: RDKit cannot use %r: %s", source, line, raw, c.error)
            elif c.smiles in seen:
                tally.n_duplicate += 1
            else:
                seen.add(c.smiles)
                key = _key(c.inchikey, cfg.decontaminate_key) if contaminants else ""
                if key and key in contaminants:  # type: ignore[operator]  # not None: `key` is "" without them
                    names = contaminants[key]  # type: ignore[index]
                    tally.n_decontaminated += 1
                    tally.removed.update(names)
                    tally.rejects.append(
                        (
                            source,
                            line,
                            raw,
                            f"decontaminated: a molecule of task {', '.join(names)} ({cfg.decontaminate_key} {key})",
                        )
                    )
                elif cfg.max_heavy_atoms is not None and c.n_heavy_atoms > cfg.max_heavy_atoms:
                    tally.n_heavy += 1
                    reason = f"filtered: {c.n_heavy_atoms} heavy atoms > max_heavy_atoms {cfg.max_heavy_atoms}"
                    tally.rejects.append((source, line, raw, reason))
                elif cfg.max_tokens is not None and c.n_tokens > cfg.max_tokens:
                    tally.n_long += 1
                    reason = f"filtered: {c.n_tokens} tokens > max_tokens {cfg.max_tokens}"
                    tally.rejects.append((source, line, raw, reason))
                else:
                    tally.kept.append(c)
        n_chunks += 1
        if time.perf_counter() - last_report >= PROGRESS_EVERY_S:
            progress(Progress(n_chunks, tally.n_in, tally.n_invalid, tally.n_duplicate, time.perf_counter() - t0))
            last_report = time.perf_counter()
    progress(Progress(n_chunks, tally.n_in, tally.n_invalid, tally.n_duplicate, time.perf_counter() - t0))
    return tally


def _key(inchikey: str | None, mode: str) -> str:
    if not inchikey:
        return ""
    return inchikey if mode == "inchikey" else inchikey[:14]


def _check_tally(tally: Tally, cfg: DataConfig, data: DataDir) -> None:
    """A corpus that leaves nothing to train on is an error that says why (rejects.csv is written first)."""
    files, n_in, n_invalid = tally.files, tally.n_in, tally.n_invalid
    if n_in == 0:
        raise DataError(f"{files}: empty corpus, no SMILES records found")
    if n_invalid == n_in:
        source, line, raw, reason = tally.rejects[0]
        raise DataError(
            f"{files}: all {n_in:,} SMILES are invalid, e.g. {source}:{line}: {raw!r}: {reason}"
            f" (see {data.rejects_path})"
        )
    if n_invalid:
        log.warning(
            "%s invalid SMILES of %s (%.2f%%), all in %s",
            f"{n_invalid:,}",
            f"{n_in:,}",
            100 * n_invalid / n_in,
            data.rejects_path,
        )
    if not tally.kept:
        which = [f"decontaminate (task molecules) removed {tally.n_decontaminated:,}"] if tally.n_decontaminated else []
        which += [f"max_heavy_atoms={cfg.max_heavy_atoms} removed {tally.n_heavy:,}"] if tally.n_heavy else []
        which += [f"max_tokens={cfg.max_tokens} removed {tally.n_long:,}"] if tally.n_long else []
        n_unique = n_in - n_invalid - tally.n_duplicate
        raise DataError(
            f"{files}: nothing left after filtering: {' and '.join(which)} of {n_unique:,} valid unique molecules"
        )
    if len(tally.kept) < 2:
        raise DataError(
            f"{files}: only {len(tally.kept)} molecule left after cleaning; need at least 2 for a train/val split"
        )


# ---------------------------------------------------------------------------------------------
# splits


def _n_val(n: int, val_fraction: float) -> int:
    """At least one molecule on each side."""
    return min(n - 1, max(1, round(n * val_fraction)))


def random_val_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train and val indices; every shard is then a random sample."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = _n_val(n, val_fraction)
    return order[n_val:], order[:n_val]


def scaffold_val_split(scaffolds: Sequence[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole Bemis-Murcko scaffold groups go to one side; groups are drawn in a seeded order.

    Groups larger than half the validation target always go to train (as in chemprop's balanced
    scaffold split), so one big group cannot swallow the validation set. Acyclic molecules share
    the empty scaffold.
    """
    groups: dict[str, list[int]] = {}
    for i, scaffold in enumerate(scaffolds):
        groups.setdefault(scaffold, []).append(i)
    n_val_target = _n_val(len(scaffolds), val_fraction)
    rng = np.random.default_rng(seed)
    keys = sorted(groups)
    train: list[int] = []
    val: list[int] = []
    for k in rng.permutation(len(keys)):
        members = groups[keys[k]]
        if len(members) <= n_val_target / 2 and len(val) + len(members) <= n_val_target:
            val.extend(members)
        else:
            train.extend(members)
    if not val:
        raise DataError(
            f"scaffold split: no scaffold group fits a validation set of {n_val_target} "
            f"({len(scaffolds)} molecules in {len(groups)} scaffolds); use split: random"
        )
    return rng.permutation(train), rng.permutation(val)


# ---------------------------------------------------------------------------------------------
# writing


def _write_shards(data: DataDir, split: Split, rows: list[Canonical], shard_rows: int) -> list[ShardFile]:
    shards = []
    for k, start in enumerate(range(0, len(rows), shard_rows)):
        part = rows[start : start + shard_rows]
        table = pa.table(
            {
                "smiles": pa.array([c.smiles for c in part], pa.string()),
                "n_tokens": pa.array([c.n_tokens for c in part], pa.int32()),
            }
        )
        path = data.shard(split, k)
        pq.write_table(table, path)
        shards.append(ShardFile(path=path.name, split=split, n_rows=len(part), sha256=sha256_file(path)))
    return shards


def _describe_input(path: Path) -> InputFile:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such corpus file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    corpus_format(path)  # an unknown suffix fails here, before anything is written
    return InputFile(path=str(path), size_bytes=path.stat().st_size, sha256=sha256_file(path))


# ---------------------------------------------------------------------------------------------
# idempotence: same inputs -> no-op; anything else in the way -> a clear error


def _existing_manifest(data: DataDir, inputs: list[InputFile], options: dict, overwrite: bool) -> Manifest | None:
    """The manifest when `data` already holds this exact preparation; else clear the way or raise."""
    entries = data.entries()
    if not entries:
        return None
    manifest, problem = None, None
    if not data.has_manifest():
        problem = f"no {data.manifest_path.name} (an earlier prepare did not finish)"
    else:
        try:
            manifest = data.manifest()
        except ManifestError as err:
            problem = str(err).removeprefix(f"{data.manifest_path}: ")
    if manifest is not None:
        problem = _difference(manifest, inputs, options) or _damage(manifest, data)
        if problem is None:
            return manifest
    foreign = [p.name for p in entries if not data.is_output(p)]
    if overwrite or (manifest is None and not foreign):
        log.info("%s: clearing earlier prepare outputs: %s", data.path, problem if not overwrite else "overwrite=True")
        data.clear_outputs()
        return None
    extra = f"; it also holds {', '.join(foreign[:5])}" if foreign else ""
    raise DataError(
        f"{data.path}: not empty and not (or no longer) prepared from these inputs: {problem}{extra}; "
        f"use overwrite=True (clmscale prepare --overwrite) to replace it"
    )


def _difference(manifest: Manifest, inputs: list[InputFile], options: dict) -> str | None:
    old = [(i.sha256, i.size_bytes) for i in manifest.inputs]
    new = [(i.sha256, i.size_bytes) for i in inputs]
    if old != new:
        return (
            f"prepared from {', '.join(i.path for i in manifest.inputs)}, whose sha256 differ from "
            f"{', '.join(i.path for i in inputs)}"
        )
    changed = sorted(k for k in manifest.options.keys() | options.keys() if manifest.options.get(k) != options.get(k))
    if changed:
        return "options differ: " + ", ".join(f"{k} {manifest.options.get(k)!r} -> {options.get(k)!r}" for k in changed)
    if manifest.rdkit_version != rdBase.rdkitVersion:
        return f"prepared with RDKit {manifest.rdkit_version}, this is RDKit {rdBase.rdkitVersion}"
    return None


def _damage(manifest: Manifest, data: DataDir) -> str | None:
    name = data.manifest_path.name
    for shard in manifest.shards:
        path = data.path / shard.path
        if not path.is_file():
            return f"{shard.path} is missing ({name} lists it)"
        digest = sha256_file(path)
        if digest != shard.sha256:
            return (
                f"{shard.path} has sha256 {digest[:16]}..., {name} records {shard.sha256[:16]}..."
                " (changed since prepare)"
            )
    if not data.has_tokenizer():
        return f"{manifest.tokenizer.path}/ is missing"
    return None
