"""prepare: corpus files -> canonical, deduplicated, pre-tokenised train/val shards + manifest.json + tokenizer/.

The story, in order: read the sweep's downstream tasks (local files only) and canonicalise them as the corpus
will be, with InChIKeys. Then one pipeline, run by Ray Data across the cluster (`_OnRay`) or in this process on
the whole corpus (`_Local`, `parallel=False`), both calling the same per-table steps:
  read_blocks         records (file, line, text) from CSV / SMI / Parquet files, optionally gzipped;
  canonical_block     RDKit canonical SMILES, heavy atoms, regex tokens, scaffold, InChIKey (`canonicalize_chunk`);
  classify_partition  per hash partition of the canonical SMILES: the first occurrence (file, line) is the
                      molecule, later ones duplicates; then a task molecule by key (decontamination), the
                      size filters, else kept with its split hash and order hash (`stable_hash`, seeded);
  tally_block / token_block   one-row counts per partition, summed on the driver (the manifest's counts are exact);
  split_histogram     (scaffold split) where the val threshold meets the val target;
  range_pieces + sorted_range   each split cut into ranges of its order hash, each range sorted: the split in order;
  write_shard         SMILES, n_tokens and token ids (`ids`), one Ray task per shard;
and rejects.csv (invalid, decontaminated, filtered rows, in file and line order) written per partition by the
workers and merged. On Ray, only the first steps (to classify_partition) are a Ray Data execution; the later ones
are plain Ray tasks on its materialised partitions, which start in milliseconds where an execution takes seconds.
The vocabulary is the train split's token types (counted per block) plus the tasks' token types. The manifest is
written last: its presence means the data directory is complete. `canonical_smiles` is the same canonicalisation
for task SMILES downstream (engine.analyze).

Counts add up: n_in = n_invalid + n_duplicate + n_decontaminated + n_filtered + n_kept.
Nothing depends on the corpus's order, its blocks or the number of workers, except which line of a duplicated
molecule rejects.csv names (the first). Rerunning with the same input bytes and options returns the existing
manifest ("already prepared").
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import json
import logging
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from rdkit import Chem, rdBase
from rdkit.Chem.Scaffolds import MurckoScaffold

from clmscale.engine.config import DataConfig, DownstreamConfig
from clmscale.engine.files import sha256_file
from clmscale.engine.representations import (
    Representation,
    codec,
    convert,
    convert_with_reasons,
    ordered,
    randomized_smiles,
)
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
from clmscale.engine.tokenizer import (
    SPECIAL_TOKENS,
    extend_vocab,
    extend_vocab_from_counts,
    smiles_tokens,
    tokenizer_from_vocab,
    tokens_of,
)

log = logging.getLogger("clmscale.prepare")
RAY_DATA_LOG = logging.getLogger("ray.data")

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
    except (
        OSError,
        EOFError,
        UnicodeDecodeError,
        csv.Error,
        pa.ArrowException,
        zlib.error,
    ) as err:  # zlib: a bad member
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
    n_duplicate: int | None  # known once dedup has run
    elapsed_s: float


def log_progress(p: Progress) -> None:
    rate = p.n_done / p.elapsed_s if p.elapsed_s > 0 else 0.0
    log.info(
        "canonicalised %s SMILES in %d chunks (%s invalid%s), %.0f mol/s",
        f"{p.n_done:,}",
        p.n_chunks,
        f"{p.n_invalid:,}",
        f", {p.n_duplicate:,} duplicates" if p.n_duplicate is not None else "",
        rate,
    )


# ---------------------------------------------------------------------------------------------
# prepare


def prepare(
    cfg: DataConfig,
    data: DataDir | Path,
    *,
    downstream: DownstreamConfig | None = None,
    parallel: bool | None = None,
    overwrite: bool = False,
    chunk_rows: int = 2_000,  # records per block: ~0.5 s of RDKit work, small enough to balance
    workers: int | None = None,  # Ray: CPUs Ray Data may use at once, and 2x as many partitions at least
    progress: Callable[[Progress], None] = log_progress,
) -> Manifest:
    """Turn `cfg.corpus` into shards, rejects.csv, tokenizer/ and manifest.json in `data` (a run's data/).

    `downstream` (the sweep's section): its tasks are read here, canonicalised as the corpus is, for
    decontamination (`cfg.decontaminate`) and so that the vocabulary covers their tokens.
    `parallel=True` runs the pipeline on Ray Data (initialising Ray only if the caller has not): the corpus
    lives in the cluster's object store, the driver holds block references and counts. `parallel=False`
    runs the same steps in this process on the whole corpus at once. `None` (the default) chooses by size:
    in process below RAY_MIN_RECORDS records (about, from the files' sizes), where Ray Data's start-up costs
    more than it saves (1e5 MOSES molecules: 12.6 s in process, 14-15 s on Ray, benchmarks/RESULTS.md)
    and the driver's memory stays small; on Ray above.
    """
    data = data if isinstance(data, DataDir) else DataDir(data)
    inputs = [_describe_input(p) for p in cfg.corpus]
    vocab_tasks, decon_tasks = task_roles(cfg, downstream)
    if parallel is None:
        n_records = _estimated_records([Path(p) for p in cfg.corpus])
        parallel = min(n_records, cfg.max_molecules or n_records) >= RAY_MIN_RECORDS
    if parallel and not ray.is_initialized():
        ray.init()  # RAY_ADDRESS / a running local cluster, else a new local one
    run = _canonicalize_on_ray if parallel else _canonicalize_serial
    molecules = load_task_molecules(
        [*dict.fromkeys([*vocab_tasks, *decon_tasks])], downstream, cfg.isomeric, run, chunk_rows
    )
    others = [r for r in ordered(cfg.representations()) if r != "smiles"]
    options = cfg.model_dump(mode="json", exclude={"corpus", "representation", "randomized_smiles"})
    if cfg.randomized_smiles:  # recorded only when on, as `representations` below
        options["randomized_smiles"] = cfg.randomized_smiles
    if others:  # recorded only when there are any, so data directories prepared before the axis stay valid
        options["representations"] = others
        for r in others:
            codec(r)  # a missing package is an error here, before any work, not in a Ray task
    # the task molecule sets as read: a changed task file makes a different preparation
    options["task_molecules"] = {name: m.sha256 for name, m in molecules.items()}
    done = _existing_manifest(data, inputs, options, overwrite)
    if done is not None:
        log.info("%s: already prepared from the same inputs and options; nothing to do", data.path)
        return done
    data.path.mkdir(parents=True, exist_ok=True)

    # ---- read, canonicalise, dedup, decontaminate, filter, hash the split and the order: one pass
    rules = Rules(
        contaminants=contaminant_keys([molecules[n] for n in decon_tasks], cfg.decontaminate_key),
        key_mode=cfg.decontaminate_key,
        max_heavy_atoms=cfg.max_heavy_atoms,
        max_tokens=cfg.max_tokens,
        split=cfg.split,
        seed=cfg.seed,
        representations=tuple(others),
        isomeric=cfg.isomeric,
    )
    paths = [Path(p).resolve() for p in cfg.corpus]  # Ray workers may not share the driver's working directory
    names = [str(p) for p in cfg.corpus]  # as given, for rejects.csv and messages
    t0 = time.perf_counter()
    try:
        with _data_context(parallel, workers):
            ex: _Local | _OnRay = (
                _OnRay(cfg, paths, rules, bool(decon_tasks), chunk_rows, progress, workers)
                if parallel
                else _Local(cfg, paths, rules, bool(decon_tasks), chunk_rows, progress)
            )
            return _finish(cfg, data, ex, inputs, options, molecules, vocab_tasks, decon_tasks, names, progress, t0)
    except Exception as err:  # a DataError raised in a Ray task arrives wrapped (RayTaskError(DataError))
        found = _data_error_in(err)
        if found is None or found is err:
            raise
        raise DataError(str(found).splitlines()[0]) from None  # Ray appends its retry advice on later lines


def _finish(cfg, data, ex, inputs, options, molecules, vocab_tasks, decon_tasks, names, progress, t0) -> Manifest:
    """Counts, rejects.csv, the split, the vocabulary, the shards and last the manifest, from the classified records."""
    val_threshold = min(int(cfg.val_fraction * HASH_SPAN), HASH_SPAN - 1)
    tallies = ex.per_block(tally_block)
    t = {name: int(pc.sum(tallies.column(name)).as_py() or 0) for name in _TALLY_SCHEMA.names if name.startswith("n_")}
    removed: Counter[str] = Counter()
    for text in tallies.column("removed").to_pylist():
        removed.update(json.loads(text))
    unconverted: Counter[str] = Counter()
    for text in tallies.column("unconverted").to_pylist():
        unconverted.update(json.loads(text))
    first_invalid = sorted(tuple(r) for text in tallies.column("first_invalid").to_pylist() for r in json.loads(text))
    progress(Progress(ex.n_blocks, t["n_in"], t["n_invalid"], t["n_duplicate"], time.perf_counter() - t0))
    for f, line, raw, why in first_invalid[:SHOW_INVALID]:
        log.warning("%s:%d: RDKit cannot use %r: %s", names[f], line, raw, why)

    # ---- rejects.csv: each partition's rejects written by a worker in file and line order, merged here (streamed)
    n_rejects = t["n_invalid"] + t["n_decontaminated"] + t["n_heavy"] + t["n_long"] + t["n_unconverted"]
    n_parts = (
        sum(ex.run(write_rejects_part, [(data, k, b, names) for k, b in enumerate(ex.partitions)])) if n_rejects else 0
    )
    data.join_rejects(len(ex.partitions) if n_parts else 0, names)
    _check_counts(t, cfg, data, names, first_invalid)

    # ---- the split: a split hash below the threshold is val, except scaffold groups over half the val target;
    # a part that would be empty gets the one group nearest the threshold (tiny corpora)
    n_val_target = min(t["n_kept"] - 1, max(1, round(t["n_kept"] * cfg.val_fraction)))
    # random split: a fixed threshold, so a molecule's part does not depend on the rest of the corpus (a smaller
    # corpus's train split is inside a larger one's); scaffold split: the threshold is placed where the val part
    # meets its target, since a few large groups would otherwise swing it by tens of percent
    to_train: list[int] = []
    if cfg.split == "scaffold":
        to_train = ex.large_groups(n_val_target / 2)
        width = max(1, min(HASH_SPAN, 4 * val_threshold) // HIST_BINS)
        hist = ex.per_block(split_histogram, to_train=to_train, width=width).column("counts").to_pylist()
        edge = int(np.argmin(np.abs(np.cumsum(np.sum(hist, axis=0)) - n_val_target)))  # the edge nearest the target
        val_threshold = min((edge + 1) * width, HASH_SPAN - 1)
    randomized = bool(cfg.randomized_smiles)
    tokens = ex.per_block(token_block, val_threshold=val_threshold, to_train=to_train, randomized=randomized)
    n_val = int(pc.sum(tokens.column("n_val")).as_py() or 0)
    if n_val in (0, t["n_kept"]):
        min_train = int(pc.min(tokens.column("min_train")).as_py())
        max_val = int(pc.max(tokens.column("max_val")).as_py())
        val_threshold = min(min_train + 1, HASH_SPAN - 1) if n_val == 0 else max_val
        tokens = ex.per_block(token_block, val_threshold=val_threshold, to_train=to_train, randomized=randomized)
    others: list[Representation] = options.get("representations", [])
    train_tokens = {r: Counter[str]() for r in ["smiles", *others]}
    val_tokens = {r: Counter[str]() for r in ["smiles", *others]}
    for a, b, o in zip(*(tokens.column(c).to_pylist() for c in ("train", "val", "others")), strict=True):
        train_tokens["smiles"].update(json.loads(a))
        val_tokens["smiles"].update(json.loads(b))
        for r, (train_r, val_r) in json.loads(o).items():
            train_tokens[r].update(train_r)
            val_tokens[r].update(val_r)
    n_part = {s: int(pc.sum(tokens.column(f"n_{s}")).as_py() or 0) for s in ("train", "val")}
    if not all(n_part.values()):
        raise DataError(
            f"{', '.join(names)}: scaffold split: no scaffold group fits a validation set of {n_val_target} "
            f"({t['n_kept']:,} molecules); use split: random"
        )

    # ---- the vocabulary of each representation: the train split's tokens, then the token types only the tasks'
    # canonical SMILES (or their texts) have (types, never labels; without them a MOSES vocabulary reads a task's
    # [C@@H] as [UNK])
    specials = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    task_smiles = [s for name in vocab_tasks for s in molecules[name].smiles]
    vocabs, infos = {}, {}
    random_tokens = Counter[str]()
    for text in tokens.column("random").to_pylist():
        random_tokens.update(json.loads(text))
    for r in ["smiles", *others]:
        corpus_vocab = extend_vocab_from_counts(specials, train_tokens[r])
        if r == "smiles":  # after the canonical SMILES' own: their ids do not change
            corpus_vocab = extend_vocab_from_counts(corpus_vocab, random_tokens)
        task_texts = [x for x in convert(task_smiles, r, cfg.isomeric) if x is not None]
        vocabs[r] = extend_vocab(corpus_vocab, task_texts, r)
        tokenizer = tokenizer_from_vocab(vocabs[r], out_dir=data.representation(r).tokenizer, representation=r)
        unk_id = specials[SPECIAL_TOKENS["unk_token"]]
        infos[r] = TokenizerInfo(
            path=data.tokenizer.name,
            vocab_size=len(tokenizer),
            n_unk=sum(n for token, n in val_tokens[r].items() if vocabs[r].get(token, unk_id) == unk_id),
            tasks=list(vocab_tasks),
            task_tokens=list(vocabs[r])[len(corpus_vocab) :],
        )

    # ---- shards: each part sorted by its seeded order hash (in ranges of it, one sort task per range), cut into
    # shard_rows, tokenised and written by workers
    shards: dict[str, list[ShardFile]] = {r: [] for r in vocabs}
    for r in others:
        data.representation(r).path.mkdir(exist_ok=True)
    parts = ex.sorted_parts(val_threshold, to_train, {s: -(-n // RANGE_ROWS) for s, n in n_part.items()})
    for split, (blocks, sizes) in parts.items():
        plan = shard_plan(sizes, cfg.shard_rows)
        calls = [(data, split, k, [(blocks[b], s, e) for b, s, e in piece], vocabs) for k, piece in enumerate(plan)]
        for written in ex.run(write_shard, calls):
            for r, shard in written.items():
                shards[r].append(shard)
    del parts
    n_tokens = {s: int(pc.sum(tokens.column(f"n_tokens_{s}")).as_py() or 0) for s in ("train", "val")}
    counts = Counts(
        n_in=t["n_in"],
        n_invalid=t["n_invalid"],
        n_duplicate=t["n_duplicate"],
        n_decontaminated=t["n_decontaminated"],
        n_filtered=t["n_heavy"] + t["n_long"],
        n_filtered_heavy_atoms=t["n_heavy"],
        n_filtered_tokens=t["n_long"],
        n_unconverted=t["n_unconverted"],
        unconverted=dict(unconverted),
        n_kept=t["n_kept"],
        train=SplitCounts(n_molecules=n_part["train"], n_tokens=n_tokens["train"]),
        val=SplitCounts(n_molecules=n_part["val"], n_tokens=n_tokens["val"]),
    )
    assert all(counts.n_kept == sum(s.n_rows for s in written) for written in shards.values())
    assert counts.n_kept == counts.train.n_molecules + counts.val.n_molecules
    assert counts.n_in == (counts.n_invalid + counts.n_duplicate + counts.n_decontaminated + counts.n_filtered
                           + counts.n_unconverted + counts.n_kept)  # fmt: skip
    decontamination = {
        name: TaskOverlap(task_molecules=len(molecules[name].keys(cfg.decontaminate_key)), removed=removed.get(name, 0))
        for name in decon_tasks
    }
    for r in [*others, "smiles"]:  # data/'s own manifest last: it marks the whole directory complete
        r_tokens = {s: sum(c.values()) for s, c in (("train", train_tokens[r]), ("val", val_tokens[r]))}
        r_counts = counts if r == "smiles" else counts.model_copy(update={
            "train": SplitCounts(n_molecules=n_part["train"], n_tokens=r_tokens["train"]),
            "val": SplitCounts(n_molecules=n_part["val"], n_tokens=r_tokens["val"]),
        })  # fmt: skip
        manifest = Manifest(
            representation=r,
            representations=others if r == "smiles" else [],
            inputs=inputs,
            options=options,
            rdkit_version=rdBase.rdkitVersion,
            counts=r_counts,
            shards=shards[r],
            tokenizer=infos[r],
            decontamination=decontamination,
            decontamination_key=cfg.decontaminate_key if decon_tasks else None,
        )
        data.representation(r).write_manifest(manifest)
    c = manifest.counts
    log.info(
        "%s: kept %s of %s SMILES (%s invalid, %s duplicates, %s task molecules, %s filtered, %s unconverted): "
        "%s train / %s val, vocab %d (%d token types from the tasks only), %d [UNK] in val%s",
        data.path,
        f"{c.n_kept:,}",
        f"{c.n_in:,}",
        f"{c.n_invalid:,}",
        f"{c.n_duplicate:,}",
        f"{c.n_decontaminated:,}",
        f"{c.n_filtered:,}",
        f"{c.n_unconverted:,}",
        f"{c.train.n_molecules:,}",
        f"{c.val.n_molecules:,}",
        manifest.tokenizer.vocab_size,
        len(manifest.tokenizer.task_tokens),
        manifest.tokenizer.n_unk,
        "".join(f"; {r}: vocab {infos[r].vocab_size}, {infos[r].n_unk} [UNK] in val" for r in others),
    )
    return manifest


@contextmanager
def _data_context(parallel: bool, workers: int | None) -> Iterator[None]:
    """Ray Data settings for prepare's pipeline, put back afterwards (the sweep's stream sets its own)."""
    if not parallel:
        yield
        return
    from ray.data import DataContext

    context = DataContext.get_current()
    options = context.execution_options
    before = (options.preserve_order, options.resource_limits, context.op_resource_reservation_enabled,
              context.hash_shuffle_operator_actor_num_cpus_override)  # fmt: skip
    options.preserve_order = True  # blocks come back in the order the sort made
    if workers is not None:
        options.resource_limits = options.resource_limits.copy(cpu=workers)
    # The canonicaliser is the only step that needs the CPUs. Ray Data would reserve a share of them for each
    # step and a quarter of the cluster for the shuffle's aggregators (which only concatenate), and on 2 CPUs
    # that left one canonicalising task at a time.
    context.op_resource_reservation_enabled = False
    context.hash_shuffle_operator_actor_num_cpus_override = AGGREGATOR_CPUS
    # prepare reports its own progress; Ray Data's plan and progress lines would fill the console (and the
    # output a CLI error message is read from)
    quiet = (context.enable_progress_bars, context.print_on_execution_start, RAY_DATA_LOG.level)
    context.enable_progress_bars, context.print_on_execution_start = False, False
    RAY_DATA_LOG.setLevel(logging.CRITICAL)  # a task's error reaches the caller as an exception; logged, it came twice
    try:
        yield
    finally:
        (options.preserve_order, options.resource_limits, context.op_resource_reservation_enabled,
         context.hash_shuffle_operator_actor_num_cpus_override) = before  # fmt: skip
        context.enable_progress_bars, context.print_on_execution_start, level = quiet
        RAY_DATA_LOG.setLevel(level)


def _check_counts(t: dict[str, int], cfg: DataConfig, data: DataDir, names: list[str], first_invalid: list) -> None:
    """A corpus that leaves nothing to train on is an error that says why (rejects.csv is written first)."""
    files, n_in, n_invalid = ", ".join(names), t["n_in"], t["n_invalid"]
    if n_in == 0:
        raise DataError(f"{files}: empty corpus, no SMILES records found")
    if n_invalid == n_in:
        f, line, raw, reason = first_invalid[0]
        raise DataError(
            f"{files}: all {n_in:,} SMILES are invalid, e.g. {names[f]}:{line}: {raw!r}: {reason}"
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
    if not t["n_kept"]:
        which = [f"decontaminate (task molecules) removed {t['n_decontaminated']:,}"] if t["n_decontaminated"] else []
        which += [f"max_heavy_atoms={cfg.max_heavy_atoms} removed {t['n_heavy']:,}"] if t["n_heavy"] else []
        which += [f"max_tokens={cfg.max_tokens} removed {t['n_long']:,}"] if t["n_long"] else []
        n_unique = n_in - n_invalid - t["n_duplicate"]
        raise DataError(
            f"{files}: nothing left after filtering: {' and '.join(which)} of {n_unique:,} valid unique molecules"
        )
    if t["n_kept"] < 2:
        raise DataError(
            f"{files}: only {t['n_kept']} molecule left after cleaning; need at least 2 for a train/val split"
        )


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


def _key(inchikey: str | None, mode: str) -> str:
    if not inchikey:
        return ""
    return inchikey if mode == "inchikey" else inchikey[:14]


# ---------------------------------------------------------------------------------------------
# the pipeline's steps: each takes one Arrow table (a Ray Data block, or in-process the whole corpus)


SPLIT_SALT, ORDER_SALT = "split", "order"  # the two seeded hashes: which part, and the row order in it
HASH_SPAN = 2**64
HIST_BINS = 2**16  # bins of the split hash below 4x the val fraction, where a scaffold split's threshold is placed


def stable_hash(values: Sequence[str], seed: int, salt: str) -> np.ndarray:
    """A seeded 64-bit BLAKE2b of each string (uint64): a function of the string and the seed only, so what it
    decides does not depend on the corpus's order, its blocks or the number of workers."""
    key = f"clmscale:{salt}:{seed}".encode()
    digest = hashlib.blake2b
    return np.fromiter(
        (int.from_bytes(digest(v.encode(), digest_size=8, key=key).digest(), "little") for v in values),
        dtype=np.uint64,
        count=len(values),
    )


def record_block(file_index: int, lines: Sequence[int], smiles: Sequence[str]) -> pa.Table:
    """One block of corpus records: the file's index in `corpus`, its line (or Parquet row), the text read."""
    return pa.table(
        {
            "file": pa.array(np.full(len(lines), file_index, dtype=np.int32)),
            "line": pa.array(lines, pa.int64()),
            "raw": pa.array(smiles, pa.string()),
        }
    )


def read_blocks(
    paths: Sequence[Path],
    file_indices: Sequence[int],
    smiles_column: str | None,
    chunk_rows: int,
    max_molecules: int | None,
) -> Iterator[pa.Table]:
    """Record blocks of the files `file_indices` of `paths`, in order, `chunk_rows` at most each."""
    for chunk in read_chunks([paths[i] for i in file_indices], smiles_column, chunk_rows, max_molecules):
        yield record_block(file_indices[chunk.file_index], chunk.lines, chunk.smiles)


def canonical_block(records: pa.Table, isomeric: bool, scaffolds: bool, inchikeys: bool) -> pa.Table:
    """The records with their canonicalisation beside them; `key` is what dedup groups on: the canonical SMILES,
    or for an invalid record its own place (so invalid records spread over the partitions)."""
    raw = records.column("raw").to_pylist()
    out = canonicalize_chunk(raw, isomeric, scaffolds, inchikeys)
    files, lines = records.column("file").to_pylist(), records.column("line").to_pylist()
    keys = [c.smiles if c.smiles is not None else f"\0{f}:{n}" for c, f, n in zip(out, files, lines, strict=True)]
    return (
        records.append_column("smiles", pa.array([c.smiles for c in out], pa.string()))
        .append_column("error", pa.array([c.error for c in out], pa.string()))
        .append_column("n_heavy_atoms", pa.array([c.n_heavy_atoms for c in out], pa.int32()))
        .append_column("n_tokens", pa.array([c.n_tokens for c in out], pa.int32()))
        .append_column("scaffold", pa.array([c.scaffold for c in out], pa.string()))
        .append_column("inchikey", pa.array([c.inchikey for c in out], pa.string()))
        .append_column("key", pa.array(keys, pa.string()))
    )


@dataclass(frozen=True)
class Rules:
    """What decides a unique molecule's fate after dedup: the tasks' keys (broadcast to every partition: the tasks
    are small), the size filters, and the split's hash."""

    contaminants: dict[str, list[str]]  # key -> the tasks that hold a molecule with it
    key_mode: str  # inchikey | connectivity
    max_heavy_atoms: int | None
    max_tokens: int | None
    split: str  # random | scaffold
    seed: int
    representations: tuple[Representation, ...] = ()  # besides smiles: each kept molecule must convert to these
    isomeric: bool = True  # the canonicalisation a converted text must read back to


STATUSES = ("invalid", "duplicate", "decontaminated", "heavy", "long", "unconverted", "kept")


def classify_partition(block: pa.Table, rules: Rules) -> pa.Table:
    """Every record of a hash partition (all records of a canonical SMILES are in the same one) with its fate.

    The first occurrence (lowest file, then line) of a canonical SMILES is the molecule; later ones are
    duplicates (only counted). The molecule is then matched against the tasks' keys, the size filters, and
    written in each of `rules.representations` (read back to the same canonical SMILES, else it is rejected as
    unconverted) and given its split hash (of its scaffold or its SMILES) and its order hash (of its SMILES).
    Columns: file, line, raw (rejects only), smiles (kept only), n_tokens, status, reason (rejects), tasks
    (decontaminated), split_hash, order, and text_<representation> (kept only) per representation.
    """
    if block.num_rows == 0:
        return _classified([], [], [], [], [], [], [], [], rules)
    block = block.take(pc.sort_indices(block, [("key", "ascending"), ("file", "ascending"), ("line", "ascending")]))
    cols = block.select(["file", "line", "raw", "smiles", "error", "n_heavy_atoms", "n_tokens", "scaffold",
                         "inchikey"]).to_pydict()  # fmt: skip
    n = block.num_rows
    status: list[str] = ["kept"] * n
    reason: list[str | None] = [None] * n
    tasks: list[str | None] = [None] * n
    raw: list[str | None] = [None] * n
    smiles: list[str | None] = [None] * n
    hash_of: list[str] = [""] * n
    previous = None
    for i in range(n):
        s = cols["smiles"][i]
        if s is None:
            status[i], reason[i], raw[i] = "invalid", cols["error"][i] or "invalid", cols["raw"][i]
            continue
        if s == previous:
            status[i] = "duplicate"
            continue
        previous = s
        key = _key(cols["inchikey"][i], rules.key_mode) if rules.contaminants else ""
        heavy, n_tok = cols["n_heavy_atoms"][i], cols["n_tokens"][i]
        if key and key in rules.contaminants:
            names = rules.contaminants[key]
            status[i], tasks[i] = "decontaminated", ",".join(names)
            reason[i] = f"decontaminated: a molecule of task {', '.join(names)} ({rules.key_mode} {key})"
        elif rules.max_heavy_atoms is not None and heavy > rules.max_heavy_atoms:
            status[i], reason[i] = "heavy", f"filtered: {heavy} heavy atoms > max_heavy_atoms {rules.max_heavy_atoms}"
        elif rules.max_tokens is not None and n_tok > rules.max_tokens:
            status[i], reason[i] = "long", f"filtered: {n_tok} tokens > max_tokens {rules.max_tokens}"
        else:
            smiles[i] = s
            hash_of[i] = (cols["scaffold"][i] or "") if rules.split == "scaffold" else s
            continue
        raw[i] = cols["raw"][i]
    texts: dict[str, list[str | None]] = {}
    for representation in rules.representations:  # after dedup and the filters: each molecule converted once
        texts[representation] = [None] * n
        kept = [i for i in range(n) if smiles[i] is not None]
        converted = convert_with_reasons([smiles[i] or "" for i in kept], representation, rules.isomeric)
        for i, (text, why) in zip(kept, converted, strict=True):
            if text is None:
                status[i], reason[i], raw[i], smiles[i] = "unconverted", why, cols["raw"][i], None
            texts[representation][i] = text
    return _classified(cols["file"], cols["line"], raw, smiles, cols["n_tokens"], status, reason, tasks, rules,
                       hash_of, texts)  # fmt: skip


def _classified(files, lines, raw, smiles, n_tokens, status, reason, tasks, rules: Rules, hash_of=(),
                texts=None) -> pa.Table:  # fmt: skip
    kept = [s is not None for s in smiles]
    split_hash = np.zeros(len(files), dtype=np.uint64)
    order = np.zeros(len(files), dtype=np.uint64)
    if any(kept):
        idx = np.flatnonzero(kept)
        split_hash[idx] = stable_hash([hash_of[i] for i in idx], rules.seed, SPLIT_SALT)
        order[idx] = stable_hash([smiles[i] for i in idx], rules.seed, ORDER_SALT)
    return pa.table(
        {
            "file": pa.array(files, pa.int32()),
            "line": pa.array(lines, pa.int64()),
            "raw": pa.array(raw, pa.string()),
            "smiles": pa.array(smiles, pa.string()),
            "n_tokens": pa.array(n_tokens, pa.int32()),
            "status": pa.array(status, pa.string()),
            "reason": pa.array(reason, pa.string()),
            "tasks": pa.array(tasks, pa.string()),
            "split_hash": pa.array(split_hash, pa.uint64()),
            "order": pa.array(order, pa.uint64()),
            **{
                f"text_{r}": pa.array(
                    [
                        t if s is not None else None
                        for t, s in zip((texts or {}).get(r, [None] * len(files)), smiles, strict=True)
                    ],
                    pa.string(),
                )  # fmt: skip
                for r in rules.representations
            },
        }
    )


def tally_block(block: pa.Table) -> pa.Table:
    """One row of counts for a block of classified records (the driver adds the rows up): per status, task
    molecules removed per task, the first invalid records."""
    status = block.column("status").to_numpy(zero_copy_only=False)
    counts = {s: int((status == s).sum()) for s in STATUSES}
    removed: Counter[str] = Counter()
    for names in block.filter(pc.equal(block.column("status"), "decontaminated")).column("tasks").to_pylist():
        removed.update(names.split(","))
    unconverted = Counter(
        why.split(":", 1)[0]
        for why in block.filter(pc.equal(block.column("status"), "unconverted")).column("reason").to_pylist()
    )
    invalid = block.filter(pc.equal(block.column("status"), "invalid"))
    invalid = invalid.take(pc.sort_indices(invalid, [("file", "ascending"), ("line", "ascending")])).slice(
        0, SHOW_INVALID
    )
    first = [[f, n, r, why] for f, n, r, why in zip(*(invalid.column(c).to_pylist() for c in
                                                       ("file", "line", "raw", "reason")), strict=True)]  # fmt: skip
    row = {
        "n_in": block.num_rows,
        **{f"n_{s}": counts[s] for s in STATUSES},
        "removed": json.dumps(removed),
        "unconverted": json.dumps(unconverted),
        "first_invalid": json.dumps(first),
    }
    return pa.table({k: [v] for k, v in row.items()}, schema=_TALLY_SCHEMA)


_TALLY_SCHEMA = pa.schema(
    [("n_in", pa.int64()), *[(f"n_{s}", pa.int64()) for s in STATUSES], ("removed", pa.string()),
     ("unconverted", pa.string()), ("first_invalid", pa.string())]
)  # fmt: skip


def in_val(split_hash: np.ndarray, val_threshold: int, to_train: Sequence[int]) -> np.ndarray:
    """The split: a split hash below the threshold is val, unless its group is one of `to_train` (scaffold groups
    larger than half the validation target, as in chemprop's balanced scaffold split)."""
    below = split_hash < np.uint64(val_threshold)
    return below & ~np.isin(split_hash, np.asarray(to_train, dtype=np.uint64)) if len(to_train) else below


def group_sizes(block: pa.Table) -> pa.Table:
    """The split hash of each kept molecule (a column to count scaffold groups by)."""
    return block.filter(pc.equal(block.column("status"), "kept")).select(["split_hash"])


def split_histogram(block: pa.Table, to_train: Sequence[int], width: int) -> pa.Table:
    """One row: the kept molecules per bin (`width` wide) of the split hash, for the HIST_BINS lowest bins, groups in
    `to_train` left out. The driver puts the val threshold at the bin edge nearest the val target, so a scaffold
    split's val part is its target give or take a group, not give or take the luck of large groups' hashes."""
    h = block.filter(pc.equal(block.column("status"), "kept")).column("split_hash").to_numpy()
    if len(to_train):
        h = h[~np.isin(h, np.asarray(to_train, dtype=np.uint64))]
    bins = h // np.uint64(width)
    counts = np.bincount(bins[bins < HIST_BINS].astype(np.int64), minlength=HIST_BINS)
    return pa.table({"counts": pa.array([counts], pa.list_(pa.int64()))})


def token_block(block: pa.Table, val_threshold: int, to_train: Sequence[int], randomized: bool = False) -> pa.Table:
    """One row: the token types of the kept train and val molecules with their counts (JSON), for the vocabulary
    and for counting [UNK] in val; molecules and tokens per part; the smallest split hash in train that may move
    (not in `to_train`) and the largest in val. `randomized` (data.randomized_smiles): also the token types of one
    random SMILES of each train molecule (`random`), so a random atom order's ring digits and stereo marks
    (which flip with the order) have ids of their own."""
    kept = block.filter(pc.equal(block.column("status"), "kept"))
    is_val = in_val(kept.column("split_hash").to_numpy(), val_threshold, to_train)
    smiles = kept.column("smiles").to_pylist()
    train, val = Counter[str](), Counter[str]()
    for s, v in zip(smiles, is_val, strict=True):
        (val if v else train).update(smiles_tokens(s))
    random = Counter[str]()
    if randomized:
        train_smiles = [s for s, v in zip(smiles, is_val, strict=True) if not v]
        for [text] in randomized_smiles(train_smiles, 1, seed=0, epoch=-1):  # epoch -1: never a training pass's
            random.update(smiles_tokens(text))
    others = {}  # per other representation: its token types in train and in val
    for column in [c for c in kept.column_names if c.startswith("text_")]:
        split_tokens = tokens_of(column.removeprefix("text_"))
        counts: tuple[Counter[str], Counter[str]] = Counter(), Counter()
        for text, v in zip(kept.column(column).to_pylist(), is_val, strict=True):
            counts[int(v)].update(split_tokens(text))
        others[column.removeprefix("text_")] = counts
    n_tokens = kept.column("n_tokens").to_numpy()
    h = kept.column("split_hash").to_numpy()
    movable = h[~is_val & ~np.isin(h, np.asarray(to_train, dtype=np.uint64))]
    return pa.table(
        {
            "train": [json.dumps(train)],
            "val": [json.dumps(val)],
            "others": [json.dumps(others)],
            "random": [json.dumps(random)],
            "n_train": [int((~is_val).sum())],
            "n_val": [int(is_val.sum())],
            "n_tokens_train": [int(n_tokens[~is_val].sum())],
            "n_tokens_val": [int(n_tokens[is_val].sum())],
            # the ends of the two parts: the driver moves one group when a part would be empty (tiny corpora)
            "min_train": pa.array([int(movable.min()) if len(movable) else HASH_SPAN - 1], pa.uint64()),
            "max_val": pa.array([int(h[is_val].max()) if is_val.any() else 0], pa.uint64()),
        }
    )


def part_rows(block: pa.Table, split: Split, val_threshold: int, to_train: Sequence[int]) -> pa.Table:
    """The kept molecules of one part: smiles, n_tokens, order (the seeded hash the part is sorted by), and their
    text in each other representation (text_<representation>)."""
    kept = block.filter(pc.equal(block.column("status"), "kept"))
    val = in_val(kept.column("split_hash").to_numpy(), val_threshold, to_train)
    texts = [c for c in kept.column_names if c.startswith("text_")]
    return kept.filter(pa.array(val if split == "val" else ~val)).select(["smiles", "n_tokens", "order", *texts])


def range_pieces(block: pa.Table, val_threshold: int, to_train: Sequence[int], n_ranges: dict[str, int]) -> list:
    """The kept molecules of a partition, per part (train, then val) cut into `n_ranges[part]` equal ranges of the
    order hash: a hash spreads evenly, so the ranges are about equally full, and sorting each range on its own sorts
    the part (no sampling pass, no global sort)."""
    pieces = []
    for split, k in n_ranges.items():
        rows = part_rows(block, split, val_threshold, to_train)  # type: ignore[arg-type]
        which = ((rows.column("order").to_numpy() >> np.uint64(32)) * np.uint64(k)) >> np.uint64(32)
        pieces += [rows.filter(pa.array(which == r)) for r in range(k)]
    return pieces


def sorted_range(*pieces: pa.Table) -> pa.Table:
    """One range of a part's order hash, from every partition's piece of it, sorted (ties broken by the SMILES)."""
    return pa.concat_tables(pieces).sort_by([("order", "ascending"), ("smiles", "ascending")])


def reject_rows(block: pa.Table) -> pa.Table:
    """The rejected records (invalid, decontaminated, filtered; duplicates are only counted): file, line, raw, why."""
    return block.filter(pc.is_valid(block.column("reason"))).select(["file", "line", "raw", "reason"])


def id_type(vocab_size: int) -> pa.DataType:
    """The narrowest unsigned type that holds every token id."""
    return pa.uint8() if vocab_size <= 2**8 else pa.uint16() if vocab_size <= 2**16 else pa.uint32()


def shard_table(
    smiles: Sequence[str],
    n_tokens: pa.Array | None,
    vocab: dict[str, int],
    representation: Representation = "smiles",
    texts: Sequence[str] | None = None,
) -> pa.Table:
    """A shard's rows: the canonical SMILES, its regex token count and its token ids (no special tokens), so a
    training pass reads ids instead of encoding again. Another representation's shard (`texts`) adds its text
    (`text`), and counts and encodes that instead."""
    tokenizer = tokenizer_from_vocab(vocab, representation=representation)
    source = list(smiles if texts is None else texts)
    ids = tokenizer(source, add_special_tokens=False, padding=False, truncation=False,
                    return_attention_mask=False)["input_ids"] if source else []  # fmt: skip
    if n_tokens is None:  # each regex token is one id (WordLevel), so the ids count the text's tokens
        n_tokens = pa.array([len(i) for i in ids], pa.int32())
    return pa.table(
        {
            "smiles": pa.array(smiles, pa.string()),
            **({} if texts is None else {"text": pa.array(texts, pa.string())}),
            "n_tokens": n_tokens.cast(pa.int32()),
            "ids": pa.array(ids, pa.list_(id_type(len(vocab)))),
        }
    )


def write_shard(
    data: DataDir, split: Split, index: int, pieces: Sequence[tuple], vocabs: dict[str, dict[str, int]]
) -> dict[str, ShardFile]:
    """Write shard `index` of `split` from row ranges (table or Ray object ref, start, stop) of the sorted part: in
    data/ the SMILES, and the same rows in each other representation of `vocabs` in data/<representation>/."""
    tables = [
        (ray.get(t) if isinstance(t, ray.ObjectRef) else t).slice(start, stop - start) for t, start, stop in pieces
    ]
    rows = pa.concat_tables(tables) if tables else pa.table({"smiles": pa.array([], pa.string()),
                                                             "n_tokens": pa.array([], pa.int32())})  # fmt: skip
    smiles = rows.column("smiles").to_pylist()
    written = {}
    for representation, vocab in vocabs.items():
        if representation == "smiles":
            table = shard_table(smiles, rows.column("n_tokens").combine_chunks(), vocab)
        else:
            column = f"text_{representation}"
            texts = rows.column(column).to_pylist() if column in rows.column_names else []
            table = shard_table(smiles, None, vocab, representation, texts)  # type: ignore[arg-type]
        path = data.representation(representation).shard(split, index)
        pq.write_table(table, path)
        written[representation] = ShardFile(path=path.name, split=split, n_rows=table.num_rows,
                                            sha256=sha256_file(path))  # fmt: skip
    return written


def write_rejects_part(data: DataDir, index: int, block, names: Sequence[str]) -> int:
    """Write one partition's rejects (invalid, decontaminated, filtered) in file and line order as part `index` of
    rejects.csv; returns its row count."""
    table = reject_rows(ray.get(block) if isinstance(block, ray.ObjectRef) else block).sort_by(
        [("file", "ascending"), ("line", "ascending")]
    )
    files = [names[i] for i in table.column("file").to_pylist()]
    rows = zip(files, table.column("line").to_pylist(), table.column("raw").to_pylist(),
               table.column("reason").to_pylist(), strict=True)  # fmt: skip
    data.write_rejects_part(index, rows)
    return table.num_rows


def shard_plan(sizes: Sequence[int], shard_rows: int) -> list[list[tuple[int, int, int]]]:
    """Cut blocks of `sizes` rows (in order) into shards of `shard_rows` rows (the last one shorter):
    per shard, (block index, start, stop) ranges."""
    plan: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = shard_rows
    for b, size in enumerate(sizes):
        start = 0
        while start < size:
            take = min(room, size - start)
            current.append((b, start, start + take))
            start += take
            room -= take
            if room == 0:
                plan.append(current)
                current, room = [], shard_rows
    if current:
        plan.append(current)
    return plan


# ---------------------------------------------------------------------------------------------
# two executors of the same steps: in-process (one partition), and Ray Data across the cluster


class _Local:
    """The whole corpus as one table in this process: for small corpora and tests (`parallel=False`)."""

    def __init__(self, cfg: DataConfig, paths: list[Path], rules: Rules, inchikeys: bool, chunk_rows: int,
                 progress: Callable[[Progress], None]):  # fmt: skip
        t0 = last = time.perf_counter()
        blocks, n_done, n_invalid = [], 0, 0
        for records in read_blocks(paths, range(len(paths)), cfg.smiles_column, chunk_rows, cfg.max_molecules):
            block = canonical_block(records, cfg.isomeric, cfg.split == "scaffold", inchikeys)
            blocks.append(block)
            n_done += block.num_rows
            n_invalid += block.column("smiles").null_count
            if time.perf_counter() - last >= PROGRESS_EVERY_S:
                progress(Progress(len(blocks), n_done, n_invalid, None, time.perf_counter() - t0))
                last = time.perf_counter()
        table = pa.concat_tables(blocks) if blocks else canonical_block(record_block(0, [], []), True, False, False)
        self.classified = classify_partition(table, rules)
        self.partitions = [self.classified]
        self.n_blocks = len(blocks)  # read blocks, for progress

    def per_block(self, fn: Callable[..., pa.Table], **kwargs) -> pa.Table:
        return fn(self.classified, **kwargs)

    def large_groups(self, limit: float) -> list[int]:
        hashes, sizes = np.unique(group_sizes(self.classified).column("split_hash").to_numpy(), return_counts=True)
        return sorted(int(h) for h in hashes[sizes > limit])

    def sorted_parts(self, val_threshold: int, to_train: Sequence[int], n_ranges: dict[str, int]) -> dict:
        """Per part: its sorted rows (one table) and their count."""
        out = {}
        for split in n_ranges:
            table = sorted_range(part_rows(self.classified, split, val_threshold, to_train))  # type: ignore[arg-type]
            out[split] = ([table], [table.num_rows])
        return out

    def run(self, fn: Callable, calls: list[tuple]) -> list:
        return [fn(*args) for args in calls]


class _OnRay:
    """Ray Data: read (a task per file) -> canonicalise (map_batches) -> hash-partition on the canonical SMILES
    (repartition with keys, Ray Data's own shuffle) -> classify each partition -> materialised in the object store.
    The driver keeps only block references and the one-row tallies of each block."""

    def __init__(self, cfg: DataConfig, paths: list[Path], rules: Rules, inchikeys: bool, chunk_rows: int,
                 progress: Callable[[Progress], None], workers: int | None):  # fmt: skip
        import ray.data

        t0 = time.perf_counter()
        # a cap reads the files in order, so the first max_molecules records are the same whoever reads them
        groups = [list(range(len(paths)))] if cfg.max_molecules is not None else [[i] for i in range(len(paths))]
        n_cpus = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        n_partitions = max(2 * n_cpus, -(-_estimated_records(paths) // PARTITION_ROWS))
        records = ray.data.from_items([{"group": g} for g in range(len(groups))]).map_batches(
            _read_group,  # type: ignore[arg-type]  # its extra arguments arrive through fn_kwargs
            batch_size=1,
            num_cpus=READ_CPUS,  # not the canonicaliser's 1: a different request keeps the two from fusing
            fn_kwargs={
                "groups": groups,
                "paths": paths,
                "smiles_column": cfg.smiles_column,
                "chunk_rows": chunk_rows,
                "max_molecules": cfg.max_molecules,
            },  # fmt: skip
        )
        # a reader's blocks reach the next step merged up to Ray Data's target block size (128 MiB: a whole 1e5
        # corpus), which would make one canonicalising task; cut back to chunk_rows, they spread over the CPUs
        canonical = records.repartition(target_num_rows_per_block=chunk_rows).map_batches(
            canonical_block,  # type: ignore[arg-type]
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"isomeric": cfg.isomeric, "scaffolds": cfg.split == "scaffold", "inchikeys": inchikeys},
        )
        self.classified = (
            canonical.repartition(n_partitions, keys=["key"])
            .map_batches(classify_partition, batch_format="pyarrow", batch_size=None, fn_kwargs={"rules": rules})  # type: ignore[arg-type]
            .materialize()
        )
        # an empty corpus has no partitions: one empty one keeps the steps below uniform
        self.partitions = self.classified.to_arrow_refs() or [
            ray.put(classify_partition(canonical_block(record_block(0, [], []), True, False, False), rules))
        ]
        self.n_blocks = len(self.partitions)
        log.info("canonicalised and deduplicated on Ray in %.1f s (%d partitions)", time.perf_counter() - t0,
                 self.n_blocks)  # fmt: skip

    def per_block(self, fn: Callable[..., pa.Table], **kwargs) -> pa.Table:
        """`fn` on every partition, as plain Ray tasks on the materialised blocks (a Ray Data execution per step
        would cost its start-up each time); the one-row results are joined here."""
        return pa.concat_tables(ray.get([_call.remote(fn, b, kwargs) for b in self.partitions], timeout=RAY_TIMEOUT_S))

    def large_groups(self, limit: float) -> list[int]:
        """Scaffold groups (by split hash) of more than `limit` kept molecules: Ray Data's groupby and count; only
        the few large ones come back to the driver."""
        counts = self.classified.map_batches(group_sizes, batch_format="pyarrow", batch_size=None)
        counts = counts.groupby("split_hash").count()
        large = counts.map_batches(
            lambda t: t.filter(pc.greater(t.column("count()"), limit)), batch_format="pyarrow", batch_size=None
        )
        tables = ray.get(large.to_arrow_refs(), timeout=RAY_TIMEOUT_S)
        return sorted(int(h) for t in tables for h in t.column("split_hash").to_pylist())

    def sorted_parts(self, val_threshold: int, to_train: Sequence[int], n_ranges: dict[str, int]) -> dict:
        """Per part: the object references of its sorted ranges (in order) and their row counts. Each partition's
        task returns its pieces of every range; one task per range sorts that range's pieces from all partitions."""
        n = sum(n_ranges.values())
        cut = ray.remote(num_cpus=1, num_returns=n)(range_pieces)
        # n >= 2 (both parts hold molecules), so each call returns a list of n references
        pieces: list[Any] = [cut.remote(block, val_threshold, to_train, n_ranges) for block in self.partitions]
        ranges = [ray.remote(num_cpus=1)(sorted_range).remote(*[p[r] for p in pieces]) for r in range(n)]
        sizes = ray.get([_num_rows.remote(r) for r in ranges], timeout=RAY_TIMEOUT_S)
        out, start = {}, 0
        for split, k in n_ranges.items():
            out[split] = (ranges[start : start + k], sizes[start : start + k])
            start += k
        return out

    def run(self, fn: Callable, calls: list[tuple]) -> list:
        task = ray.remote(num_cpus=1)(fn)
        return ray.get([task.remote(*args) for args in calls], timeout=RAY_TIMEOUT_S)


PARTITION_ROWS = 200_000  # records per hash partition: one partition is one block (far below 128 MiB)
RAY_MIN_RECORDS = 200_000  # prepare(parallel=None) runs on Ray from about this many records
RANGE_ROWS = 200_000  # kept molecules per range of the order hash: one sort task each
AGGREGATOR_CPUS = 0.05  # per hash-shuffle aggregator actor (Ray Data's default: a quarter of the cluster in all)
READ_CPUS = 0.0  # a reader streams its file for the whole pass: holding a CPU it would idle a canonicaliser slot
RAY_TIMEOUT_S = 3600.0  # one wait on the cluster's write tasks; a hang becomes an error


def _estimated_records(paths: Sequence[Path]) -> int:
    """About how many records the files hold (~45 bytes per SMILES line, ~3x gzip), for the partition count."""
    return sum(p.stat().st_size * (3 if p.name.lower().endswith(".gz") else 1) // 45 for p in paths)


def _read_group(batch: dict[str, np.ndarray], groups, paths, smiles_column, chunk_rows, max_molecules):
    """map_batches body: the record blocks of one group of files (a generator: blocks stream out as read)."""
    for g in batch["group"]:
        yield from read_blocks(paths, groups[int(g)], smiles_column, chunk_rows, max_molecules)


@ray.remote(num_cpus=0)
def _num_rows(table: pa.Table) -> int:
    return table.num_rows


@ray.remote(num_cpus=1)
def _call(fn: Callable[..., pa.Table], block: pa.Table, kwargs: dict) -> pa.Table:
    return fn(block, **kwargs)


def _data_error_in(err: BaseException) -> DataError | None:
    """The DataError a Ray task raised (a corpus file that cannot be read), found in the chain Ray wraps it in."""
    stack, seen = [err], set()
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(e, DataError) and not isinstance(e, ray.exceptions.RayTaskError):
            return e
        stack.extend(x for x in (cause, e.__cause__, e.__context__) if isinstance(x, BaseException))
    return None


# ---------------------------------------------------------------------------------------------
# inputs


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
    for r in manifest.representations:
        other = data.representation(r)
        try:
            problem = _damage(other.manifest(), other)
        except ManifestError as err:
            problem = str(err)
        if problem is not None:
            return f"{r}/: {problem}"
    return None
