"""The downstream-task registry: real MoleculeNet files, the shipped demo tasks, a real HTTP download, splits."""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from clmscale.engine.config import CustomTask, DownstreamConfig
from clmscale.engine.tasks import (
    TASKS,
    ChecksumError,
    Split,
    TaskError,
    balanced_scaffold_split,
    check_split,
    deepchem_scaffold_split,
    load_task,
    random_task_split,
    resolve_task_file,
    scaffold,
    sha256_decompressed,
    split_records,
    split_task,
    tasks_from_config,
)

MOLECULENET = Path(__file__).resolve().parents[2] / "shared/data/moleculenet"
needs_moleculenet = pytest.mark.skipif(not MOLECULENET.is_dir(), reason=f"{MOLECULENET} not present")


@pytest.fixture(autouse=True)
def no_outside_world(monkeypatch, tmp_path):
    """No test reads the user's cache or env, and any download not aimed at our server is refused at once."""
    monkeypatch.delenv("CLMSCALE_DATA_DIR", raising=False)
    monkeypatch.delenv("CLMSCALE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CLMSCALE_DATA_URL", "http://127.0.0.1:9/nothing-here")  # discard port: refused


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# the registry against the staged MoleculeNet files


def test_registry_names_and_shapes():
    expected = {
        "bbbp": 1, "bace_classification": 1, "bace_regression": 1, "clintox": 2, "tox21": 12, "sider": 27,
        "hiv": 1, "esol": 1, "freesolv": 1, "lipophilicity": 1, "muv": 17,
        "freesolv_demo": 1, "solubility": 1, "solubility_class": 1,
    }  # fmt: skip
    assert {name: task.n_labels for name, task in TASKS.items()} == expected
    for task in TASKS.values():
        assert (task.url is None) == (task.path is not None)
        if task.url:
            assert task.url == f"https://deepchemdata.s3-us-west-1.amazonaws.com/datasets/{task.file}"
        assert len(task.sha256) == 64
        assert task.metric == ("roc_auc" if task.task_type == "classification" else "rmse")
        assert task.primary_metric in task.metrics
    primary = {name: task.primary_metric for name, task in TASKS.items()}
    # MUV as MoleculeNet recommends; HIV (3.5 % active) by this protocol, its ROC-AUC recorded beside it
    assert {name for name, m in primary.items() if m == "prc_auc"} == {"muv", "hiv"}
    assert TASKS["hiv"].metrics == ("roc_auc", "prc_auc")
    assert {name for name, m in primary.items() if m == "rmse"} == {
        name for name, task in TASKS.items() if task.task_type == "regression"}  # MoleculeNet: RMSE for these
    assert TASKS["bbbp"].metrics == ("roc_auc", "prc_auc") and TASKS["esol"].metrics == ("rmse", "mae")
    assert TASKS["esol"].label_columns == ("measured log solubility in mols per litre",)
    assert TASKS["solubility_class"].n_classes == 3  # binary tasks: None, as engine.finetune expects
    assert {t.n_classes for name, t in TASKS.items() if name != "solubility_class"} == {None}
    assert sum("," in c for c in TASKS["sider"].label_columns) == 5


# (name, file rows, RDKit-valid rows as in SOURCES.md or None, max_molecules): big sets are capped for speed
MOLECULENET_COUNTS = [
    ("bbbp", 2050, 2039, None),
    ("bace_classification", 1513, 1513, None),
    ("bace_regression", 1513, 1513, None),
    ("clintox", 1484, 1480, None),
    ("tox21", 7831, None, 400),
    ("sider", 1427, 1427, None),
    ("hiv", 41127, None, 400),
    ("esol", 1128, 1128, None),
    ("freesolv", 642, 642, None),
    ("lipophilicity", 4200, None, 400),
    ("muv", 93127, None, 300),
]


@functools.cache
def moleculenet(name: str, cap: int | None = None):
    """Each staged file is parsed once per test session (RDKit parsing is most of the time here)."""
    return load_task(name, data_dir=MOLECULENET, max_molecules=cap)


@needs_moleculenet
@pytest.mark.parametrize("name, n_rows, n_valid, cap", MOLECULENET_COUNTS, ids=[c[0] for c in MOLECULENET_COUNTS])
def test_moleculenet_task_loads(name, n_rows, n_valid, cap):
    task = TASKS[name]
    data = moleculenet(name, cap)
    assert data.path.name == task.file.removesuffix(".gz") + ".gz"  # found under the other name variant
    assert data.n_rows == n_rows
    assert len(data) == (n_valid if cap is None else cap)
    if cap is None:
        assert data.n_invalid == n_rows - n_valid
    assert data.labels.dtype == np.float32 and data.labels.shape == (len(data), task.n_labels)
    assert len(data.smiles) == len(data.rows) and np.all(np.diff(data.rows) > 0)
    present = data.labels[~np.isnan(data.labels)]
    if task.task_type == "classification":
        assert set(np.unique(present)) == {0.0, 1.0}
    else:
        assert np.isnan(data.labels).sum() == 0 and np.isfinite(present).all()


@needs_moleculenet
def test_label_columns_are_the_right_ones():
    esol = moleculenet("esol", None)
    assert esol.smiles[0].endswith("O") and esol.labels[0, 0] == pytest.approx(-0.77)  # not the ESOL prediction -0.974
    bace = moleculenet("bace_regression", None)
    assert 2 < np.nanmin(bace.labels) and np.nanmax(bace.labels) < 11  # pIC50
    bbbp = moleculenet("bbbp", None)
    assert bbbp.invalid[0][0] == 61 and bbbp.invalid[0][1].startswith("O=N([O-])C1=C")  # file line, SMILES


@needs_moleculenet
def test_registry_hashes_match_the_blob_ids_in_sources_md():
    blobs = {  # shared/data/SOURCES.md, "git blob id" of each decompressed CSV
        "BBBP.csv": "0c7998cc60454533aff247b2f907a4767bdb7bee",
        "bace.csv": "cc149ab6b7ee3730046840829a1c63f7690f1792",
        "clintox.csv.gz": "92a89ed2189ec788cfdd88d7c3da6e18279f1e90",
        "tox21.csv.gz": "5382a57f609df1d35699d8af700e6f2fdec81840",
        "sider.csv.gz": "e1b44e2f50e7f07fa97055d0dc4385e3c3b381b9",
        "HIV.csv": "f9f5a8a6fb1ebf01ac10629d62fbcdb0bafe51bb",
        "delaney-processed.csv": "970b0d32771f1d67175d4f4a630e13f446ba97a8",
        "SAMPL.csv": "9c49daeebde4d30c6412504cc265d98e436a999f",
        "Lipophilicity.csv": "9943c3e1b024a326b89000a7baffdd7fe811ae1d",
        "muv.csv.gz": "18f6a820f65dd211fd5862166fe47b5fd3362e0a",
    }  # fmt: skip
    for task in TASKS.values():
        if task.url is None:
            continue
        content = gzip.decompress((MOLECULENET / (task.file.removesuffix(".gz") + ".gz")).read_bytes())
        assert hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest() == blobs[task.file], task.name
        assert hashlib.sha256(content).hexdigest() == task.sha256, task.name


@needs_moleculenet
def test_data_dir_plain_variant_and_a_bad_local_copy(tmp_path):
    (tmp_path / "clintox.csv").write_bytes(gzip.decompress((MOLECULENET / "clintox.csv.gz").read_bytes()))
    assert resolve_task_file(TASKS["clintox"], data_dir=tmp_path) == tmp_path / "clintox.csv"
    edited = gzip.decompress((MOLECULENET / "SAMPL.csv.gz").read_bytes()).replace(b"-11.01", b"-11.02", 1)
    (tmp_path / "SAMPL.csv").write_bytes(edited)
    with pytest.raises(ChecksumError, match=rf"SAMPL\.csv: sha256 .* is {hashlib.sha256(edited).hexdigest()}"):
        load_task("freesolv", data_dir=tmp_path)
    assert (tmp_path / "SAMPL.csv").exists()  # a user's file is reported, never deleted


def test_bbbp_line_ending_and_header_variants_are_accepted(tmp_path):
    if not (MOLECULENET / "BBBP.csv.gz").exists():
        pytest.skip("no BBBP")
    crlf = gzip.decompress((MOLECULENET / "BBBP.csv.gz").read_bytes())
    (tmp_path / "BBBP.csv").write_bytes(crlf.replace(b"\r\n", b"\n"))
    assert load_task("bbbp", tmp_path, max_molecules=50).n_rows == 2050
    (tmp_path / "BBBP.csv").write_bytes(crlf.replace(b"p_np,smiles", b"p_np,SMILES", 1))
    data = load_task("bbbp", tmp_path, max_molecules=50)
    assert data.n_rows == 2050 and len(data) == 50


# ---------------------------------------------------------------------------------------------
# the demo tasks need only the repository


@pytest.mark.parametrize("name, n_rows, n_classes", [("freesolv_demo", 642, None), ("solubility", 1282, None),
                                                     ("solubility_class", 1282, 3)])  # fmt: skip
def test_shipped_tasks_load_from_the_repository(name, n_rows, n_classes, tmp_path):
    data = load_task(name, data_dir=tmp_path / "nonexistent-is-fine-for-shipped")
    assert data.path.parent == Path(__file__).resolve().parents[1] / "data"
    assert data.n_rows == n_rows and data.n_classes == n_classes
    assert len(data) + data.n_invalid == n_rows
    if n_classes:
        assert set(np.unique(data.labels)) == {0.0, 1.0, 2.0}
    assert not (tmp_path / "xdg").exists()  # no cache, no download


def test_max_molecules_is_a_fixed_subset_in_file_order():
    a, b = load_task("solubility", max_molecules=100), load_task("solubility", max_molecules=100)
    assert len(a) == 100 and np.array_equal(a.rows, b.rows) and np.all(np.diff(a.rows) > 0)
    assert a.rows[-1] > 500  # drawn from the whole file, not its head


# ---------------------------------------------------------------------------------------------
# download from a local HTTP server


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www over HTTP on 127.0.0.1; yields (folder, base URL, list of requested paths)."""
    root = tmp_path / "www" / "datasets"
    root.mkdir(parents=True)
    requests: list[str] = []

    class Handler(_QuietHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path / "www")))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/datasets/", requests
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def sampl_bytes() -> bytes:
    return (Path(__file__).resolve().parents[1] / "data/freesolv.csv").read_bytes()  # byte-identical to SAMPL.csv


def test_download_is_checked_cached_and_reused(server, tmp_path):
    root, url, requests = server
    (root / "SAMPL.csv").write_bytes(sampl_bytes())
    cache = tmp_path / "cache"
    path = resolve_task_file(TASKS["freesolv"], cache_dir=cache, base_url=url)
    assert path == cache / "SAMPL.csv" and sha256_decompressed(path) == TASKS["freesolv"].sha256
    assert sorted(p.name for p in cache.iterdir()) == ["SAMPL.csv"]  # no temporary file left
    assert requests == ["/datasets/SAMPL.csv"]
    (root / "SAMPL.csv").unlink()
    assert resolve_task_file(TASKS["freesolv"], cache_dir=cache, base_url=url) == path
    assert len(requests) == 1  # served from the cache


def test_download_through_env_and_load_task(server, tmp_path, monkeypatch):
    root, url, _ = server
    (root / "clintox.csv.gz").write_bytes(gzip.compress(gzip.decompress(_clintox_gz())))  # other gzip bytes, same CSV
    monkeypatch.setenv("CLMSCALE_DATA_URL", url)
    monkeypatch.setenv("CLMSCALE_CACHE_DIR", str(tmp_path / "envcache"))
    data = load_task("clintox")
    assert data.path == tmp_path / "envcache" / "clintox.csv.gz" and len(data) == 1480


def _clintox_gz() -> bytes:
    if not (MOLECULENET / "clintox.csv.gz").exists():
        pytest.skip("no clintox")
    return (MOLECULENET / "clintox.csv.gz").read_bytes()


def test_download_with_wrong_hash_keeps_nothing(server, tmp_path):
    root, url, _ = server
    edited = sampl_bytes().replace(b"-11.01", b"-11.02", 1)
    (root / "SAMPL.csv").write_bytes(edited)
    cache = tmp_path / "cache"
    task = TASKS["freesolv"]
    with pytest.raises(ChecksumError) as err:
        resolve_task_file(task, cache_dir=cache, base_url=url)
    message = str(err.value)
    assert f"{url}SAMPL.csv" in message and task.sha256 in message and hashlib.sha256(edited).hexdigest() in message
    assert list(cache.iterdir()) == []


def test_corrupt_cache_entry_is_downloaded_again(server, tmp_path):
    root, url, requests = server
    (root / "SAMPL.csv").write_bytes(sampl_bytes())
    cache = tmp_path / "cache"
    cache.mkdir()
    write(cache / "SAMPL.csv", "iupac,smiles,expt,calc\n")  # e.g. an interrupted copy by hand
    path = resolve_task_file(TASKS["freesolv"], cache_dir=cache, base_url=url)
    assert sha256_decompressed(path) == TASKS["freesolv"].sha256 and len(requests) == 1


def test_failed_download_says_what_to_do(server, tmp_path):
    _, url, _ = server
    with pytest.raises(TaskError, match=r"cannot download .*/datasets/HIV\.csv \(HTTP Error 404.*CLMSCALE_DATA_DIR"):
        resolve_task_file(TASKS["hiv"], cache_dir=tmp_path / "cache", base_url=url)
    with pytest.raises(TaskError, match=r"cannot download http://127\.0\.0\.1:9/nothing-here/HIV\.csv"):
        resolve_task_file(TASKS["hiv"], cache_dir=tmp_path / "cache")  # the URL from the environment
    assert list((tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# errors that name the file, column, line and value


def custom(tmp_path: Path, text: str, **kw) -> CustomTask:
    fields = {"name": "mine", "path": write(tmp_path / "mine.csv", text), "label_columns": ["y"],
              "task_type": "regression", **kw}  # fmt: skip
    return CustomTask(**fields)


def test_unknown_task_suggests_close_names():
    with pytest.raises(TaskError, match=r"unknown task 'bbpb'; did you mean 'bbbp'\?.*known tasks: bace_class"):
        load_task("bbpb")
    with pytest.raises(TaskError, match=r"did you mean 'tox21'"):
        load_task("tox-21")


def test_non_numeric_label_names_file_line_column_and_value(tmp_path):
    text = 'name,smiles,y\nethanol,CCO,1.5\n"two\nlines",CCN,\nx,CCC,abc\ny,CCCC,also bad\n'
    with pytest.raises(TaskError, match=r"mine\.csv:5: label column 'y' has a non-numeric value 'abc' .*2 such rows"):
        load_task(custom(tmp_path, text))


def test_missing_columns_list_the_ones_there(tmp_path):
    with pytest.raises(TaskError, match=r"no label column 'y' for task 'mine'; the columns are 'smiles', 'pIC50'"):
        load_task(custom(tmp_path, "smiles,pIC50\nCCO,1\n"))
    with pytest.raises(TaskError, match=r"no SMILES column 'smiles' .* the columns are 'mol', 'y'"):
        load_task(custom(tmp_path, "mol,y\nCCO,1\n"))


def test_no_valid_smiles_is_an_error(tmp_path):
    with pytest.raises(TaskError, match=r"mine\.csv: no valid SMILES in column 'smiles' .*line 2: 'C1CC\('"):
        load_task(custom(tmp_path, "smiles,y\nC1CC(,1\nnot a molecule,2\n"))


def test_custom_task_drops_and_counts_bad_rows(tmp_path):
    text = "SMILES,y,z\nCCO ,1,\nC1CC(,0,1\n,1,0\nc1ccccc1,,\nCCN,2,0\n"
    data = load_task(custom(tmp_path, text, task_type="classification"))
    assert data.smiles == ["CCO", "CCN"]  # header case and the trailing space do not matter
    assert data.invalid == [(3, "C1CC("), (4, "")] and data.n_unlabeled == 1
    assert data.n_classes == 3 and data.labels.ravel().tolist() == [1.0, 2.0]
    with pytest.raises(TaskError, match=r"multi-class labels need a single label column"):
        load_task(custom(tmp_path, text, label_columns=["y", "z"], task_type="classification", name="m2"))
    with pytest.raises(TaskError, match=r"class ids 0\.\.1 .*found 0\.5"):
        load_task(custom(tmp_path, "smiles,y\nCCO,0.5\nCCN,1\n", task_type="classification"))


def test_tasks_from_config(tmp_path):
    mine = custom(tmp_path, "smiles,y\nCCO,1\n")
    cfg = DownstreamConfig(tasks=["esol", "mine"], custom=[mine])
    assert tasks_from_config(cfg) == [TASKS["esol"], mine]
    with pytest.raises(TaskError, match=r"downstream\.tasks: unknown task 'mien'; did you mean 'mine'"):
        tasks_from_config(DownstreamConfig(tasks=["mien"], custom=[mine]))


# ---------------------------------------------------------------------------------------------
# splits


@pytest.fixture(scope="module")
def solubility():
    return load_task("solubility")


def test_scaffold_split_keeps_scaffolds_apart_and_meets_fractions(solubility):
    smiles = solubility.smiles
    n = len(smiles)
    scaffolds = np.array([scaffold(s) for s in smiles])
    sizes = {s: int((scaffolds == s).sum()) for s in set(scaffolds)}
    splits = {seed: balanced_scaffold_split(smiles, (0.8, 0.1, 0.1), seed=seed) for seed in (0, 1)}
    for split in splits.values():
        assert np.array_equal(np.sort(np.concatenate(split)), np.arange(n))
        parts = [set(scaffolds[idx]) for idx in split]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        # greedy filling: train and val fall short by less than the smallest group that went past them
        assert 0 <= 0.8 * n - len(split.train) < min(sizes[s] for s in parts[1] | parts[2])
        assert 0 <= 0.1 * n - len(split.val) < min(sizes[s] for s in parts[2])
        assert len(split.test) - 0.1 * n < 2 * max(sizes[s] for s in parts[1] | parts[2])
        assert "" in parts[0]  # the biggest group (acyclic molecules) goes to train
    assert all(np.array_equal(a, b) for a, b in zip(balanced_scaffold_split(smiles, seed=0), splits[0]))
    assert not np.array_equal(splits[0].test, splits[1].test)


def test_random_split():
    split = random_task_split(101, (0.8, 0.1, 0.1), seed=0)
    assert [len(p) for p in split] == [81, 10, 10]
    assert np.array_equal(np.sort(np.concatenate(split)), np.arange(101))
    assert np.array_equal(random_task_split(101, seed=5).val, random_task_split(101, seed=5).val)
    assert not np.array_equal(random_task_split(101, seed=5).val, random_task_split(101, seed=6).val)
    with pytest.raises(ValueError, match=r"summing to 1 \(got \(0\.8, 0\.1, 0\.2\)\)"):
        random_task_split(10, (0.8, 0.1, 0.2))


# (index: scaffold) checked by hand; groups '' {0,2,6}, benzene {1,4}, cyclohexane {3,7}, piperidine {5},
# pyridine {8,9}; index 10 does not parse
HAND_CHECKED = ["CCO", "c1ccccc1O", "CCN", "C1CCCCC1", "c1ccccc1N", "C1CCNCC1", "CC(C)C", "OC1CCCCC1", "c1ccncc1",
                "Cc1ccncc1", "C1CC("]  # fmt: skip


def test_deepchem_scaffold_split_on_a_hand_checked_example():
    # n = 10 (the unparsable row is not counted); cut-offs 0.6 * 10 = 6 and (0.6 + 0.2) * 10 = 8.
    # Order: '' (3), then the three pairs by first index DESCENDING (DeepChem sorts (size, first) with
    # reverse=True): pyridine (8), cyclohexane (3), benzene (1); then piperidine (5).
    # '' -> train (3); pyridine -> train (5); cyclohexane: 7 > 6, 5 + 0 + 2 <= 8 -> valid;
    # benzene: 7 > 6, 5 + 2 + 2 > 8 -> test; piperidine: 5 + 1 <= 6 -> train, after a group went to test.
    split = deepchem_scaffold_split(HAND_CHECKED, (0.6, 0.2, 0.2))
    assert split.train.tolist() == [0, 2, 5, 6, 8, 9]
    assert split.val.tolist() == [3, 7]
    assert split.test.tolist() == [1, 4]  # ascending ties would have put pyridine {8, 9} here instead
    # the example in DeepChem's ScaffoldSplitter docstring: train_test_split (frac_valid=0) keeps these 5 in train
    docstring = ["CC(C)Cl", "CCC(C)CO", "CCCCCCCO", "CCCCCCCC(=O)OC", "c3ccc2nc1ccccc1cc2c3", "Nc2cccc3nc1ccccc1cc23",
                 "C1CCCCCC1"]  # fmt: skip
    train, val, test = deepchem_scaffold_split(docstring, (0.8, 0.0, 0.2))
    assert [docstring[i] for i in train] == ["CC(C)Cl", "CCC(C)CO", "CCCCCCCO", "CCCCCCCC(=O)OC", "C1CCCCCC1"]
    assert val.size == 0 and test.tolist() == [4, 5]
    with pytest.raises(ValueError, match=r"non-negative numbers summing to 1 \(got \(0\.8, 0\.3, -0\.1\)\)"):
        deepchem_scaffold_split(docstring, (0.8, 0.3, -0.1))


def test_deepchem_scaffold_split_is_deterministic_and_wired_into_split_task(solubility):
    by_method = {seed: split_task(solubility, "deepchem", (0.8, 0.1, 0.1), seed=seed) for seed in (0, 1)}
    assert all(np.array_equal(a, b) for a, b in zip(by_method[0], by_method[1]))  # the seed changes nothing
    direct = deepchem_scaffold_split(solubility.smiles)
    assert all(np.array_equal(a, b) for a, b in zip(by_method[0], direct))
    scaffolds = np.array([scaffold(s) for s in solubility.smiles])
    parts = [set(scaffolds[idx]) for idx in direct]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    n = len(solubility)
    assert len(direct.train) <= 0.8 * n and len(direct.train) + len(direct.val) <= 0.9 * n
    sizes = {s: int((scaffolds == s).sum()) for s in set(scaffolds)}
    biggest = sorted(sizes, key=lambda s: sizes[s], reverse=True)[:3]
    assert all(s in parts[0] for s in biggest)  # largest groups first, so they fill train
    with pytest.raises(ValueError, match="positive numbers summing to 1"):
        split_task(solubility, "deepchem", (0.9, 0.0, 0.1))  # a part with nothing cannot be scored
    with pytest.raises(ValueError, match=r"unknown split method 'butina'; expected one of 'scaffold', 'deepchem'"):
        split_task(solubility, "butina")


@needs_moleculenet
def test_deepchem_scaffold_split_gives_bbbps_published_sizes():
    """BBBP: 2039 molecules RDKit parses (of 2050 rows). Its scaffold split has 1631 / 204 / 204 molecules, the
    sizes commonly reported for it: DeepChem's cut-offs 0.8 * 2039 = 1631.2 and 0.9 * 2039 = 1835.1, filled to
    the molecule because 763 of BBBP's 1025 scaffolds are singletons, which come last."""
    bbbp = moleculenet("bbbp", None)
    split = split_task(bbbp, "deepchem")
    assert [len(p) for p in split] == [1631, 204, 204]
    scaffolds = [scaffold(s) for s in bbbp.smiles]
    train = {scaffolds[i] for i in split.train}
    assert "c1ccccc1" in train and "" in train  # the two biggest groups (137 and 99 molecules)
    test_sizes = [scaffolds.count(scaffolds[i]) for i in split.test]
    assert max(test_sizes) <= min(scaffolds.count(scaffolds[i]) for i in split.train)  # test gets the smallest


def test_split_records_name_every_molecule_once(solubility):
    split = split_task(solubility, "scaffold", seed=3)
    table = split_records(solubility, split, "scaffold", 3)
    assert len(table) == len(solubility) and table["row"].is_unique
    assert table.groupby("part").size().to_dict() == {"train": len(split.train), "val": len(split.val),
                                                      "test": len(split.test)}  # fmt: skip
    first_test = split.test[0]
    row = table[table["row"] == solubility.rows[first_test]].iloc[0]
    assert (row["smiles"], row["part"], row["split_seed"], row["task"]) == (solubility.smiles[first_test], "test", 3,
                                                                            "solubility")  # fmt: skip


def test_split_task_on_the_demo_tasks(solubility):
    classes = load_task("solubility_class")
    for seed in (0, 1):
        assert len(split_task(classes, "scaffold", (0.8, 0.1, 0.1), seed).test) > 0
    assert [len(p) for p in split_task(solubility, "random", (0.5, 0.25, 0.25), seed=0)] == [641, 320, 321]  # 1,282 valid molecules


def test_unscorable_split_names_task_part_method_and_seed(tmp_path, caplog):
    text = "smiles,y,z\n" + "".join(f"{'C' * (i + 1)},{i % 2},{int(i == 0)}\n" for i in range(10))
    data = load_task(custom(tmp_path, text, label_columns=["y", "z"], task_type="classification"))
    one_class = Split(np.arange(0, 8), np.array([8, 9]), np.array([2, 4]))  # test: y all 0, z all 0
    with pytest.raises(TaskError, match=r"task 'mine': the test part of the scaffold split with seed 3 .*"
                                        r"'y': only class 0 \(2 molecules\); 'z': only class 0"):  # fmt: skip
        check_split(data, one_class, "scaffold", 3)
    with caplog.at_level(logging.WARNING, logger="clmscale.engine.tasks"):
        check_split(data, Split(np.arange(0, 6), np.array([6, 7]), np.array([8, 9])), "random", 0)
    assert "the val part of the random split with seed 0" in caplog.text and "1 of 2 label columns" in caplog.text
    regression = load_task(custom(tmp_path, "smiles,y\nCCO,1\nCCN,\nCCC,2\n", name="r"))
    with pytest.raises(TaskError, match=r"task 'r': the val part .* \(0 molecules\) cannot be scored: 'y': no labels"):
        check_split(regression, Split(np.array([0, 1]), np.array([], dtype=np.int64), np.array([1])), "random", 7)
