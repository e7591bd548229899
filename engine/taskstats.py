"""Task characteristics: what might explain why downstream performance saturates or degrades with scale.

Per task: its size and type, label balance (classification: the positive fraction of each column,
or each class's) or spread (regression: sd and IQR of each column), scaffold diversity (distinct
Bemis-Murcko scaffolds per molecule) and its distance to the pretraining corpus: for each task
molecule, the Tanimoto similarity of its ECFP4 (Morgan radius 2, 2048 bits) to its nearest
neighbour in a corpus sample.

The nearest-neighbour search is split so it can run as Ray tasks: `nearest_neighbour_chunk`
compares all task molecules with one chunk of the corpus (RDKit's BulkTanimotoSimilarity),
`combine_nearest_neighbours` takes the elementwise max over chunks, and `corpus_distance`
summarises the result. The max is exact whatever the chunking, so chunks can be any size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from clmscale.engine.tasks import TaskData, scaffold

ECFP4_RADIUS, ECFP4_BITS = 2, 2048


def describe_task(
    smiles: Sequence[str],
    labels: np.ndarray,
    task_type: str,
    *,
    n_classes: int | None = None,
    name: str = "task",
) -> dict[str, Any]:
    """Size, type, label balance or spread, and scaffold diversity of one task, as one flat record.

    labels [n, k] with NaN for missing (multi-class: one column of class ids). Per-column values
    are lists in column order; `min_positive_fraction` / `max_label_sd` summarise them for tables.
    """
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.shape[0] != len(smiles) or len(smiles) == 0:
        raise ValueError(f"{name}: need one label row per SMILES and at least one molecule "
                         f"(got labels {labels.shape} for {len(smiles)} SMILES)")  # fmt: skip
    groups: dict[str, int] = {}
    for i, s in enumerate(smiles):
        try:
            key = scaffold(s)
        except ValueError as err:
            raise ValueError(f"{name}: molecule {i}: {err}") from None
        groups[key] = groups.get(key, 0) + 1
    n = len(smiles)
    record: dict[str, Any] = {
        "task": name, "task_type": task_type, "n_molecules": n, "n_labels": labels.shape[1], "n_classes": n_classes,
        "missing_fraction": float(np.isnan(labels).mean()),
        "n_scaffolds": len(groups), "scaffold_diversity": len(groups) / n,
        "largest_scaffold_fraction": max(groups.values()) / n, "acyclic_fraction": groups.get("", 0) / n,
    }  # fmt: skip
    if task_type == "classification":
        if n_classes is not None:
            y = labels[:, 0][~np.isnan(labels[:, 0])]
            fractions = [float(np.mean(y == c)) for c in range(n_classes)]
            record["class_fractions"] = fractions
            record["min_positive_fraction"] = min(fractions)
        else:
            fractions = [float(np.nanmean(col)) if (~np.isnan(col)).any() else float("nan") for col in labels.T]
            record["positive_fraction"] = fractions
            record["min_positive_fraction"] = float(np.nanmin(fractions))
    elif task_type == "regression":
        sds, iqrs = [], []
        for col in labels.T:
            col = col[~np.isnan(col)]
            sds.append(float(np.std(col, ddof=1)) if col.size > 1 else float("nan"))
            q25, q75 = np.percentile(col, [25, 75]) if col.size else (np.nan, np.nan)
            iqrs.append(float(q75 - q25))
        record.update(label_sd=sds, label_iqr=iqrs, max_label_sd=float(np.nanmax(sds)))
    else:
        raise ValueError(f"{name}: task_type must be 'classification' or 'regression' (got {task_type!r})")
    return record


def task_characteristics(data: TaskData) -> dict[str, Any]:
    """`describe_task` of a loaded task."""
    return describe_task(data.smiles, data.labels, data.task_type, n_classes=data.n_classes, name=data.name)


# ---------------------------------------------------------------------------------------------
# distance to the pretraining corpus


def ecfp4(smiles: Sequence[str]) -> list:
    """ECFP4 bit vectors (RDKit ExplicitBitVect, picklable) of SMILES; an unparsable one is an error naming it."""
    from rdkit import Chem, rdBase
    from rdkit.Chem import rdFingerprintGenerator

    generator = rdFingerprintGenerator.GetMorganGenerator(radius=ECFP4_RADIUS, fpSize=ECFP4_BITS)
    out = []
    with rdBase.BlockLogs():
        for i, s in enumerate(smiles):
            mol = Chem.MolFromSmiles(s)
            if mol is None:
                raise ValueError(f"RDKit cannot parse SMILES {i}: {s!r}")
            out.append(generator.GetFingerprint(mol))
    return out


def nearest_neighbour_chunk(task_smiles: Sequence[str], corpus_smiles: Sequence[str]) -> np.ndarray:
    """For each task molecule, its highest ECFP4 Tanimoto similarity to any molecule of this corpus chunk.

    A plain function over one chunk, to run as a Ray task; (n_task,) float64, 0 for an empty chunk.
    """
    from rdkit import DataStructs

    corpus = ecfp4(corpus_smiles)
    if not corpus:
        return np.zeros(len(task_smiles))
    return np.array([max(DataStructs.BulkTanimotoSimilarity(fp, corpus)) for fp in ecfp4(task_smiles)])


def combine_nearest_neighbours(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The reducer: elementwise max over the chunks' results, the nearest neighbour in the whole sample."""
    if not parts:
        raise ValueError("no chunk results to combine")
    shapes = {np.shape(p) for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"chunk results must all have one value per task molecule (got shapes {sorted(shapes)})")
    return np.max(np.stack(parts), axis=0)


def corpus_distance(nearest: np.ndarray, *, similar_at: float = 0.4) -> dict[str, float]:
    """Summary of nearest-neighbour similarities: mean, median, 10th / 90th percentiles, the fraction with
    Tanimoto 1 (the molecule or a fingerprint twin is in the sample) and the fraction below `similar_at`
    (0.4 on ECFP4 is a common 'unrelated' line)."""
    nearest = np.asarray(nearest, dtype=np.float64)
    if nearest.size == 0:
        raise ValueError("no nearest-neighbour similarities to summarise")
    q10, median, q90 = np.percentile(nearest, [10, 50, 90])
    return {
        "nn_tanimoto_mean": float(nearest.mean()), "nn_tanimoto_median": float(median),
        "nn_tanimoto_q10": float(q10), "nn_tanimoto_q90": float(q90),
        "fraction_nn_tanimoto_1": float(np.mean(nearest >= 1.0)),
        f"fraction_nn_tanimoto_below_{similar_at:g}": float(np.mean(nearest < similar_at)),
    }  # fmt: skip


def sample_corpus(smiles: Sequence[str], n: int, *, seed: int) -> list[str]:
    """A seeded sample of n corpus SMILES without replacement (all of them if there are fewer)."""
    if n <= 0:
        raise ValueError(f"n must be positive (got {n})")
    if n >= len(smiles):
        return list(smiles)
    pick = np.sort(np.random.default_rng(seed).choice(len(smiles), size=n, replace=False))
    return [smiles[i] for i in pick]
