"""Task characteristics on small real molecule sets whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import first_moses

from clmscale.engine.finetune import morgan_fingerprints
from clmscale.engine.tasks import load_task
from clmscale.engine.taskstats import (
    combine_nearest_neighbours,
    corpus_distance,
    describe_task,
    nearest_neighbour_chunk,
    sample_corpus,
    task_characteristics,
)

# scaffolds: '' {CCO, CCN}, benzene {phenol, aniline}, cyclohexane {C1CCCCC1}
FIVE = ["CCO", "CCN", "c1ccccc1O", "c1ccccc1N", "C1CCCCC1"]


def test_describe_a_classification_task_by_hand():
    labels = np.array([[1, 0], [0, np.nan], [1, 1], [0, 0], [np.nan, 0]], dtype=np.float32)
    record = describe_task(FIVE, labels, "classification", name="five")
    assert (record["task"], record["n_molecules"], record["n_labels"]) == ("five", 5, 2)
    assert record["positive_fraction"] == pytest.approx([2 / 4, 1 / 4])  # over the labelled rows only
    assert record["min_positive_fraction"] == pytest.approx(0.25)
    assert record["missing_fraction"] == pytest.approx(2 / 10)
    assert record["n_scaffolds"] == 3 and record["scaffold_diversity"] == pytest.approx(3 / 5)
    assert record["largest_scaffold_fraction"] == pytest.approx(2 / 5)
    assert record["acyclic_fraction"] == pytest.approx(2 / 5)
    classes = describe_task(FIVE, np.array([0, 1, 2, 2, np.nan]), "classification", n_classes=3)
    assert classes["class_fractions"] == pytest.approx([0.25, 0.25, 0.5])


def test_describe_a_regression_task_by_hand():
    record = describe_task(FIVE, np.array([1.0, 2.0, 3.0, 4.0, 5.0]), "regression")
    assert record["label_sd"] == pytest.approx([np.sqrt(2.5)])  # sample sd of 1..5
    assert record["label_iqr"] == pytest.approx([2.0])  # 4 - 2
    assert "positive_fraction" not in record
    with pytest.raises(ValueError, match=r"task: molecule 1: RDKit cannot parse 'C1CC\('"):
        describe_task(["CCO", "C1CC("], np.array([1.0, 2.0]), "regression")
    with pytest.raises(ValueError, match=r"one label row per SMILES .*got labels \(3, 1\) for 2 SMILES"):
        describe_task(["CCO", "CCN"], np.ones(3), "regression")


def test_task_characteristics_of_a_shipped_task():
    data = load_task("solubility_class")
    record = task_characteristics(data)
    assert record["n_molecules"] == len(data) and record["n_classes"] == 3
    assert sum(record["class_fractions"]) == pytest.approx(1.0)
    assert 0 < record["scaffold_diversity"] < 1


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return first_moses(3000)


def test_molecules_in_the_corpus_sample_have_nearest_neighbour_similarity_one(corpus):
    solubility = load_task("solubility").smiles[:40]
    task = corpus[100:110] + solubility  # ten corpus members among the task's molecules
    nearest = nearest_neighbour_chunk(task, corpus)
    assert nearest.shape == (50,)
    assert (nearest[:10] == 1.0).all()
    assert (nearest[10:] < 1.0).mean() > 0.9  # small solubility molecules are rarely in MOSES
    # brute force: Tanimoto = |a & b| / |a | b| on the 2048-bit vectors
    a, b = morgan_fingerprints(solubility[:5]).astype(bool), morgan_fingerprints(corpus).astype(bool)
    brute = ((a[:, None] & b[None]).sum(-1) / (a[:, None] | b[None]).sum(-1)).max(axis=1)
    np.testing.assert_allclose(nearest[10:15], brute, rtol=1e-12)
    # chunking, as Ray tasks would, changes nothing: the max over chunks is the max over the sample
    parts = [nearest_neighbour_chunk(task, corpus[i : i + 700]) for i in range(0, len(corpus), 700)]
    np.testing.assert_array_equal(combine_nearest_neighbours(parts), nearest)
    assert (nearest_neighbour_chunk(task, []) == 0).all()
    with pytest.raises(ValueError, match="one value per task molecule"):
        combine_nearest_neighbours([nearest, nearest[:3]])


def test_corpus_distance_summary_and_sampling(corpus):
    summary = corpus_distance(np.array([1.0, 1.0, 0.2, 0.5, 0.3]))
    assert summary["fraction_nn_tanimoto_1"] == pytest.approx(0.4)
    assert summary["fraction_nn_tanimoto_below_0.4"] == pytest.approx(0.4)
    assert summary["nn_tanimoto_mean"] == pytest.approx(0.6) and summary["nn_tanimoto_median"] == pytest.approx(0.5)
    sample = sample_corpus(corpus, 100, seed=0)
    assert len(sample) == 100 and len(set(sample)) == 100 and set(sample) <= set(corpus)
    assert sample == sample_corpus(corpus, 100, seed=0) and sample != sample_corpus(corpus, 100, seed=1)
    assert sample_corpus(corpus[:5], 100, seed=0) == corpus[:5]


def test_nearest_neighbours_as_ray_tasks_equal_the_unchunked_search(corpus, ray_cluster):
    """analyze's fan-out, one Ray task per corpus chunk, called from inside a 1-CPU task as a job is (its chunks
    run while it waits), gives exactly the single-chunk answer; so does one chunk from the driver."""
    import ray

    from clmscale.engine.analyze import nearest_neighbours

    task = corpus[100:110] + load_task("solubility").smiles[:40]
    whole = nearest_neighbour_chunk(task, corpus)

    @ray.remote(num_cpus=1)
    def job(task, corpus):
        from clmscale.engine.analyze import nearest_neighbours

        return nearest_neighbours(task, corpus, chunk=700)  # 5 chunks

    nested = ray.get(job.remote(task, corpus), timeout=600)
    np.testing.assert_array_equal(nested, whole)
    np.testing.assert_array_equal(nearest_neighbours(task, corpus, chunk=3000), whole)  # driver, one chunk
    with pytest.raises(ValueError, match="no chunk results"):
        nearest_neighbours(task, [])
