"""Issue #7, security defaults: no shell, no unpickling, safe YAML, a local dashboard, non-root images, no secrets.

Each check is a small scanner run over the repository, and run once more over a deliberately bad
snippet in tmp_path, so a scanner that stopped seeing anything would fail too. The images' USER and
the cluster files' credentials are also checked, in other ways, by test_deploy.py.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import re
from pathlib import Path

import pytest
import yaml
from test_deploy import DOCKERFILES, read_dockerfile

REPO = Path(__file__).resolve().parents[1]
PYTHON_SOURCES = sorted(p for d in ("engine", "fits", "benchmarks", "tests") for p in (REPO / d).rglob("*.py"))
CONFIG_FILES = sorted([*REPO.glob("sweeps/*.yaml"), *REPO.glob("cluster/**/*.yaml")])
LOCAL_HOSTS = ("127.0.0.1", "localhost")


# ---------------------------------------------------------------------------------------------
# (a) the Python sources: what runs a shell, unpickles, or constructs arbitrary objects from YAML


SHELL_CALLS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"}
PICKLE_LOADS = {f"{m}.{f}" for m in ("pickle", "cPickle", "cloudpickle", "dill", "joblib") for f in ("load", "loads")}
YAML_LOADS = {f"yaml.{f}" for f in ("load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all")}
SAFE_LOADERS = ("SafeLoader", "CSafeLoader")


def dotted(node: ast.expr) -> str:
    """'torch.load' for the expression torch.load; '' when it is not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def unsafe_code(path: Path) -> list[str]:
    """'file:line: what' for each unsafe call (or import of one) in a Python file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "pickle", "subprocess"):
            names = {a.name for a in node.names} & {n.rsplit(".", 1)[1] for n in SHELL_CALLS | PICKLE_LOADS}
            found += [f"{where}: from {node.module} import {n}" for n in sorted(names)]
        if not isinstance(node, ast.Call):
            continue
        name, kw = dotted(node.func), {k.arg: k.value for k in node.keywords}
        if "shell" in kw and not _is(kw["shell"], False):
            found.append(f"{where}: {name or 'a call'}(shell=...): pass an argument list, never a shell line")
        if name in SHELL_CALLS:
            found.append(f"{where}: {name} runs a shell")
        if name in PICKLE_LOADS or (name.endswith("read_pickle")):
            found.append(f"{where}: {name} unpickles, which runs code; checkpoints are safetensors")
        if name.endswith("torch.load") and not _is(kw.get("weights_only"), True):
            found.append(f"{where}: {name} without weights_only=True unpickles arbitrary objects")
        if name.endswith("np.load") and "allow_pickle" in kw and not _is(kw["allow_pickle"], False):
            found.append(f"{where}: {name}(allow_pickle=...) unpickles")
        loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
        if name in YAML_LOADS and not (loader is not None and dotted(loader).endswith(SAFE_LOADERS)):
            found.append(f"{where}: {name} without SafeLoader; use yaml.safe_load")
        if name.endswith("ray.init") and "dashboard_host" in kw and not _is(kw["dashboard_host"], *LOCAL_HOSTS):
            found.append(f"{where}: ray.init(dashboard_host=...) not on 127.0.0.1: the dashboard can run jobs")
    return found


def _is(node: ast.expr | None, *values) -> bool:
    return isinstance(node, ast.Constant) and any(node.value is v or node.value == v for v in values)


def test_sources_run_no_shell_unpickle_nothing_and_load_yaml_safely():
    assert len(PYTHON_SOURCES) > 30
    assert [f for p in PYTHON_SOURCES for f in unsafe_code(p)] == []


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("import subprocess\nsubprocess.run('ls ' + d, shell=True)\n", "bad.py:2: subprocess.run(shell=...)"),
        ("import subprocess\nsubprocess.check_call(cmd, shell=flag)\n", "shell=..."),
        ("import os\nos.system('rm -rf ' + d)\n", "bad.py:2: os.system runs a shell"),
        ("from os import system\n", "from os import system"),
        ("import torch\nstate = torch.load(path)\n", "torch.load without weights_only=True"),
        ("import torch\nstate = torch.load(path, weights_only=False)\n", "torch.load without weights_only=True"),
        ("import pickle\nwith open(p, 'rb') as f:\n    ck = pickle.load(f)\n", "bad.py:3: pickle.load unpickles"),
        ("import pandas as pd\nt = pd.read_pickle(p)\n", "pd.read_pickle unpickles"),
        ("import numpy as np\na = np.load(p, allow_pickle=True)\n", "np.load(allow_pickle=...)"),
        ("import yaml\ncfg = yaml.load(text)\n", "yaml.load without SafeLoader"),
        ("import yaml\ncfg = yaml.load(text, Loader=yaml.Loader)\n", "yaml.load without SafeLoader"),
        ("import yaml\ncfg = yaml.unsafe_load(text)\n", "yaml.unsafe_load without SafeLoader"),
        ("import ray\nray.init(dashboard_host='0.0.0.0')\n", "not on 127.0.0.1"),
    ],
)
def test_unsafe_code_is_caught(tmp_path, snippet, expected):
    path = tmp_path / "bad.py"
    path.write_text(snippet)
    found = unsafe_code(path)
    assert len(found) == 1 and expected in found[0], found


def test_safe_forms_are_not_flagged(tmp_path):
    path = tmp_path / "good.py"
    path.write_text(
        "import subprocess, torch, yaml, numpy as np, ray\n"
        "subprocess.run(['ls', d], shell=False, check=True)\n"
        "rng = torch.load(path, weights_only=True)\n"
        "a = np.load(p)\n"
        "cfg = yaml.safe_load(text)\n"
        "cfg = yaml.load(text, Loader=yaml.SafeLoader)\n"
        "node = yaml.compose(text, Loader=yaml.SafeLoader)\n"
        "ray.init(address='local', dashboard_host='127.0.0.1')\n"
    )
    assert unsafe_code(path) == []


# ---------------------------------------------------------------------------------------------
# (b) the Ray cluster the CLI starts keeps its dashboard on the loopback interface


def local_cluster_kwargs(init_ray, monkeypatch) -> dict:
    """The kwargs of the ray.init call that starts a new local cluster, with no cluster to join; Ray never starts."""
    import ray

    calls = []

    def fake_init(*args, **kwargs):
        calls.append(kwargs)
        if args or kwargs.get("address"):
            raise ConnectionError("no cluster to join (test)")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    init_ray(None)
    assert calls and not calls[-1].get("address"), calls
    return calls[-1]


def test_cli_starts_ray_with_a_local_dashboard(monkeypatch):
    from clmscale.engine.cli import _init_ray

    assert local_cluster_kwargs(_init_ray, monkeypatch).get("dashboard_host") in LOCAL_HOSTS


def test_a_dashboard_on_every_interface_is_caught(tmp_path, monkeypatch):
    (tmp_path / "bad_cli.py").write_text(
        "import ray\n\ndef _init_ray(address):\n    ray.init(dashboard_host='0.0.0.0', include_dashboard=True)\n"
    )
    spec = importlib.util.spec_from_file_location("bad_cli", tmp_path / "bad_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert local_cluster_kwargs(module._init_ray, monkeypatch).get("dashboard_host") not in LOCAL_HOSTS


# ---------------------------------------------------------------------------------------------
# (c) the images end as a non-root user: the last USER of the final build stage


def final_user_problem(path: Path) -> str | None:
    instructions = read_dockerfile(path)
    last_stage = max(i for i, x in enumerate(instructions) if x.keyword == "FROM")
    users = [x for x in instructions[last_stage:] if x.keyword == "USER"]
    if not users:
        return f"{path.name}: the final stage has no USER, so the container runs as root"
    if users[-1].args.split(":")[0] in ("root", "0"):
        return f"{path.name}:{users[-1].line}: the final stage ends as USER {users[-1].args}"
    return None


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_images_end_as_a_non_root_user(kind):
    assert final_user_problem(DOCKERFILES[kind]) is None


@pytest.mark.parametrize(
    "dockerfile, expected",
    [
        ("FROM python:3.11-slim\nRUN useradd ray\nUSER ray\nRUN pip install x\nUSER root\n", "ends as USER root"),
        ("FROM python:3.11-slim\nUSER 0:0\nCMD [\"sh\"]\n", "ends as USER 0:0"),
        ("FROM python:3.11 AS build\nUSER 1000\nFROM python:3.11-slim\nCOPY --from=build /a /a\n", "no USER"),
    ],
)
def test_a_root_image_is_caught(tmp_path, dockerfile, expected):
    path = tmp_path / "Dockerfile"
    path.write_text(dockerfile)
    assert expected in (final_user_problem(path) or "")


# ---------------------------------------------------------------------------------------------
# (d) sweep and cluster files name where secrets live, never the secrets


SECRET_WORDS = {"secret", "password", "passwd", "token", "credential", "credentials", "apikey", "accesskey",
                "privatekey"}  # words of a key, or two adjacent ones joined
REFERENCE_WORDS = {"name", "ref", "path", "file", "dir", "mode"}  # e.g. secretName, RAY_AUTH_TOKEN_PATH
SECRET_TEXT = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----")
ASSIGNMENT = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)=(\S+)")  # NAME=value inside a string, e.g. docker --env


def secret_name(key: str) -> bool:
    """aws_secret_access_key, RAY_AUTH_TOKEN, apiKey: yes; secretName, RAY_AUTH_TOKEN_PATH, max_tokens: no."""
    words = [w.lower() for w in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", key)]
    pairs = {a + b for a, b in itertools.pairwise(words)}
    return bool(words) and bool(SECRET_WORDS & (set(words) | pairs)) and words[-1] not in REFERENCE_WORDS


def secrets_in(path: Path) -> list[str]:
    """'file: key.path: why' for every literal secret in a (multi-document) YAML file."""
    found = []

    def walk(node, at: str) -> None:
        if isinstance(node, dict):
            if secret_name(str(node.get("name", ""))) and node.get("value"):  # a Kubernetes env entry
                found.append(f"{path.name}: {at}: {node['name']} has a literal value; use valueFrom.secretKeyRef")
            for key, value in node.items():
                if secret_name(str(key)) and isinstance(value, (str, int, float)) and str(value).strip():
                    found.append(f"{path.name}: {at}.{key}: a literal secret")
                walk(value, f"{at}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{at}[{i}]")
        elif isinstance(node, str):
            if SECRET_TEXT.search(node):
                found.append(f"{path.name}: {at}: a credential-like string")
            found.extend(f"{path.name}: {at}: {k}= set inline" for k, _ in ASSIGNMENT.findall(node) if secret_name(k))
            if "\n" in node:  # a file held in a string, e.g. a ConfigMap's sweep.yaml
                try:
                    walk(yaml.safe_load(node), f"{at}|")
                except yaml.YAMLError:
                    pass

    for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
        walk(doc, f"doc{i}")
    return found


def test_sweep_and_cluster_files_hold_no_secrets():
    assert {p.parent.name for p in CONFIG_FILES} >= {"sweeps", "cluster", "kuberay"}
    assert [f for p in CONFIG_FILES for f in secrets_in(p)] == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("aws_secret_access_key: wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY\n", "doc0.aws_secret_access_key: a literal"),
        ("storage:\n  root: /mnt\n  password: hunter2\n", "doc0.storage.password: a literal secret"),
        ("ray:\n  apiKey: 12345\n", "doc0.ray.apiKey"),
        ("env:\n  - name: RAY_AUTH_TOKEN\n    value: 0123abcd\n", "RAY_AUTH_TOKEN has a literal value"),
        ("run_options:\n  - --env RAY_AUTH_TOKEN=0123abcd\n", "RAY_AUTH_TOKEN= set inline"),
        ("provider:\n  key: AKIAIOSFODNN7EXAMPLE\n", "doc0.provider.key: a credential-like string"),
        ("a: 1\n---\ndata:\n  sweep.yaml: |\n    name: x\n    db_password: pw\n", "doc1.data.sweep.yaml|.db_password"),
    ],
)
def test_a_secret_is_caught(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    found = secrets_in(path)
    assert len(found) == 1 and expected in found[0], found


def test_references_to_secrets_are_not_flagged(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(
        "authOptions: {mode: token}\n"
        "volumes: [{name: auth, secret: {secretName: clmscale}}]\n"
        "env:\n  - name: RAY_AUTH_TOKEN\n    valueFrom: {secretKeyRef: {name: clmscale, key: auth_token}}\n"
        "run_options: ['--env RAY_AUTH_TOKEN_PATH=/home/ray/.ray/auth_token', '--env RAY_AUTH_MODE=token']\n"
        "budget: {tokens: [1e7, 1e8]}\ndata: {max_tokens: 126}\nMetadataOptions: {HttpTokens: required}\n"
        "password: ''\n"
    )
    assert secrets_in(path) == []
