"""sweeps/README.md documents every field of the sweep file, and nothing the config does not accept.

The schema is engine/config.py's pydantic models; the page has one table per section (`## \\`train\\``)
whose first column names each field. A field of a nested model (a custom task's `label_columns`, a
rung override's `lr`) is named in its parent field's row. Any `section.field` written in backticks,
on this page or in the user guide, must be a field the config accepts.
"""

import re
from pathlib import Path

from pydantic import BaseModel

from clmscale.engine.config import SweepConfig, _model_of

REPO = Path(__file__).resolve().parents[1]
SWEEPS_README = REPO / "sweeps" / "README.md"
USER_DOCS = (SWEEPS_README, REPO / "README.md")


def config_fields(model: type[BaseModel] = SweepConfig, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every field path of the schema, e.g. ("train", "lr"), ("downstream", "custom", "path")."""
    out = set()
    for name, info in model.model_fields.items():
        path = prefix + (name,)
        out.add(path)
        sub = _model_of(info.annotation)
        if sub is not None and sub is not model:
            out |= config_fields(sub, path)
    return out


FIELDS = config_fields()
SECTIONS = {path[0] for path in FIELDS if len(path) > 1}


def documented_rows() -> dict[tuple[str, ...], str]:
    """(section, field) -> its table row, from the page's field tables; the top level's table names
    fields as written (`seeds`, `storage.root`)."""
    rows: dict[tuple[str, ...], str] = {}
    section: str | None = None
    for line in SWEEPS_README.read_text().splitlines():
        heading = re.match(r"^## (?:`(\w+)`|Top level)", line)
        if heading:
            section = heading.group(1) or ""
            continue
        if line.startswith("## "):
            section = None
        cell = re.match(r"^\| `([\w.]+)` \|", line)
        if section is not None and cell:
            name = tuple(cell.group(1).split("."))
            rows[(section,) + name if section else name] = line
    return rows


ROWS = documented_rows()


def _named_in(row: str, field: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(field)}(?![\w])", row) is not None


def test_every_config_field_is_documented():
    missing = []
    for path in sorted(FIELDS):
        if path in SECTIONS or (len(path) == 1 and path[0] in SECTIONS):
            continue  # a section itself: its fields are checked
        if len(path) <= 2:
            if path not in ROWS:
                missing.append(".".join(path))
        elif not _named_in(ROWS.get(path[:2], ""), path[-1]):
            missing.append(f"{'.'.join(path)} (in the row of {'.'.join(path[:2])})")
    assert not missing, f"sweeps/README.md does not document: {', '.join(missing)}"


def test_every_documented_field_exists():
    unknown = [".".join(path) for path in ROWS if path not in FIELDS]
    assert not unknown, f"sweeps/README.md documents fields engine/config.py does not accept: {', '.join(unknown)}"


def test_every_section_field_mentioned_in_the_docs_exists():
    """`train.lr`-style names in prose; a module path such as `fits.slopes` (fits/slopes.py) is not a field."""
    pattern = re.compile(rf"`((?:{'|'.join(sorted(SECTIONS))})(?:\.\w+)+)")
    unknown = []
    for doc in USER_DOCS:
        for match in pattern.finditer(doc.read_text()):
            path = tuple(match.group(1).split("."))
            if path[:2] in FIELDS or (REPO / path[0] / f"{path[1]}.py").exists():
                continue
            unknown.append(f"{doc.relative_to(REPO)}: {match.group(1)}")
    assert not unknown, f"names of settings the config does not accept: {', '.join(unknown)}"


def test_the_walk_sees_nested_models():
    """The checks above are only as good as the walk: it reaches every section and the nested models."""
    assert {("train", "micro_batch_size"), ("downstream", "lrs"), ("fits", "annealed_only"),
            ("downstream", "custom", "label_columns"), ("model", "overrides", "zero_stage"),
            ("model", "sizes", "n_head"), ("storage", "root")} <= FIELDS
    assert ("downstream", "lr") not in FIELDS and ("analysis", "sharpness_eps") not in FIELDS
