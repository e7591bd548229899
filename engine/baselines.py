"""The baselines a chemistry-ML reviewer expects next to a language model: random forests on fixed features.

    ecfp4_rf    ECFP4 (Morgan radius 2, 2048 bits) + random forest
    rdkit2d_rf  RDKit's 2D descriptors (`Descriptors.CalcMolDescriptors`, 217 in RDKit 2026.09) + random forest

Both use the same `FinetuneData` (so the same splits and seeds) and return the same result rows as
`engine.finetune.finetune`, next to its Morgan + linear baseline (`fingerprint_baseline`). The
forests follow MoleculeNet's (Wu et al. 2018, DeepChem's benchmark models): 500 trees, balanced
class weights for classification. Like the linear baseline, each label column gets its own forest
on the rows where it is labelled (sparse Tox21 / MUV assays); multi-class is one forest. Nothing
is tuned on test; the forests have no hyperparameter chosen on validation at all.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from clmscale.engine.finetune import FinetuneData, morgan_fingerprints, result_row, split_metrics

log = logging.getLogger(__name__)

Features = Literal["ecfp4", "rdkit2d"]
N_TREES = 500  # MoleculeNet's random forests
FLOAT32_MAX = float(np.finfo(np.float32).max)


def rdkit_descriptors(smiles: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """RDKit's 2D descriptors per molecule: [n, n_descriptors] float64 and their names.

    A descriptor RDKit cannot compute, or one beyond float32 (sklearn's trees cast to it; `Ipc` of
    a large molecule reaches 1e60), is NaN: scikit-learn's forests send missing values down the
    better branch at each split, so no imputation choice is made here.
    """
    from rdkit import Chem, rdBase
    from rdkit.Chem import Descriptors

    rows: list[list[float]] = []
    names: list[str] | None = None
    unparsable: list[str] = []
    with rdBase.BlockLogs():
        for i, s in enumerate(smiles):
            mol = Chem.MolFromSmiles(s)
            if mol is None:
                unparsable.append(f"row {i}: {s!r}")
                continue
            values = Descriptors.CalcMolDescriptors(mol, missingVal=math.nan)
            names = names or list(values)
            rows.append([values[n] for n in names])
    if unparsable:
        raise ValueError(f"RDKit cannot parse {len(unparsable)} SMILES ({'; '.join(unparsable[:3])}); "
                         "drop them when the task is loaded")  # fmt: skip
    x = np.asarray(rows, dtype=np.float64)
    x[~np.isfinite(x) | (np.abs(x) > FLOAT32_MAX)] = np.nan
    return x, names or []


def featurize(smiles: Sequence[str], features: Features) -> np.ndarray:
    if features == "ecfp4":
        return morgan_fingerprints(smiles, radius=2, n_bits=2048).astype(np.float32)
    if features == "rdkit2d":
        return rdkit_descriptors(smiles)[0]
    raise ValueError(f"features must be 'ecfp4' or 'rdkit2d' (got {features!r})")


def fit_forest(
    features: np.ndarray, data: FinetuneData, *, seed: int, n_trees: int = N_TREES, n_jobs: int = 1
) -> dict[str, Any]:
    """Random forests fitted on the train rows; {"val", "test" (primary metric), "metrics"} like `fit_linear`.

    Classification scores are the forest's probability of class 1 per column (multi-class: of
    each class); a column with one class in train predicts a constant, as the linear baseline does.
    """
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    train_idx = data.split[0]
    kwargs = {"n_estimators": n_trees, "random_state": seed, "n_jobs": n_jobs}
    if data.n_classes is not None:
        y = data.labels[train_idx, 0]
        keep = ~np.isnan(y)
        forest = RandomForestClassifier(class_weight="balanced", **kwargs)
        forest.fit(features[train_idx][keep], y[keep].astype(int))
        predictions = np.zeros((len(features), data.n_classes))
        predictions[:, forest.classes_] = forest.predict_proba(features)  # a class absent from train stays 0
        return split_metrics(data, predictions)
    predictions = np.zeros((len(features), data.labels.shape[1]))
    for j in range(data.labels.shape[1]):
        y = data.labels[train_idx, j]
        keep = ~np.isnan(y)
        x, y = features[train_idx][keep], y[keep]
        if data.task_type == "regression":
            predictions[:, j] = RandomForestRegressor(**kwargs).fit(x, y).predict(features)
        elif np.unique(y).size < 2:
            log.warning("%s: label column %d has a single class in train; predicting a constant", data.name, j)
        else:
            forest = RandomForestClassifier(class_weight="balanced", **kwargs).fit(x, y.astype(int))
            predictions[:, j] = forest.predict_proba(features)[:, list(forest.classes_).index(1)]
    return split_metrics(data, predictions)


def random_forest_baseline(
    data: FinetuneData, *, features: Features, split_seed: int, seed: int, n_trees: int = N_TREES, n_jobs: int = 1
) -> dict[str, Any]:
    """A results row for ECFP4 or RDKit-2D + random forest on `data`'s split; mode "ecfp4_rf" / "rdkit2d_rf".

    `split_seed` is recorded (it made data.split); `seed` seeds the forest (bootstrap rows, feature
    draws) and is recorded as `finetune_seed`, the same role as the fine-tuning seed.
    """
    t0 = time.perf_counter()
    try:
        x = featurize(data.smiles, features)
    except ValueError as err:
        raise ValueError(f"{data.name}: {err}") from None
    fit = fit_forest(x, data, seed=seed, n_trees=n_trees, n_jobs=n_jobs)
    return result_row(data, f"{features}_rf", fit, split_seed, t0, finetune_seed=seed, n_trees=n_trees)
