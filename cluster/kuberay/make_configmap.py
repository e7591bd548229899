"""Write cluster/kuberay/sweep-configmap.yaml: the ConfigMap that carries a sweep file to the RayJob.

    python cluster/kuberay/make_configmap.py                     # sweeps/paper.yaml, the default
    python cluster/kuberay/make_configmap.py sweeps/other.yaml   # another sweep, same ConfigMap name

The sweep file goes in byte for byte as a YAML literal block, so the ConfigMap reads like the sweep
file it carries. tests/test_deploy.py checks that the committed ConfigMap still equals sweeps/paper.yaml.
Equivalent, with kubectl: kubectl create configmap clmscale-sweep --from-file=sweep.yaml=sweeps/paper.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "cluster" / "kuberay" / "sweep-configmap.yaml"
NAME = "clmscale-sweep"  # mounted at /config by raycluster.yaml and rayjob.yaml
KEY = "sweep.yaml"  # so the RayJob runs `clmscale sweep /config/sweep.yaml`


def configmap_yaml(sweep_file: Path) -> str:
    """The ConfigMap manifest holding `sweep_file` under data[KEY], exactly."""
    text = sweep_file.read_text()
    # The block's chomping indicator keeps the file's own ending: one newline, several, or none.
    chomp = "-" if not text.endswith("\n") else ("+" if text.endswith("\n\n") else "")
    body = "".join(f"    {line}" if line.strip() else "\n" for line in text.splitlines(keepends=True))
    if not body.endswith("\n"):
        body += "\n"
    rel = sweep_file.resolve().relative_to(REPO) if sweep_file.resolve().is_relative_to(REPO) else sweep_file
    manifest = (
        f"# Generated from {rel} by cluster/kuberay/make_configmap.py; edit the sweep file, not this.\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        f"  name: {NAME}\n"
        "  labels:\n"
        "    app.kubernetes.io/name: clmscale\n"
        "data:\n"
        f"  {KEY}: |{chomp}\n"
        f"{body}"
    )
    loaded = yaml.safe_load(manifest)["data"][KEY]
    if loaded != text:
        raise ValueError(f"{sweep_file}: does not survive a YAML literal block (tabs or odd whitespace?)")
    return manifest


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "sweeps" / "paper.yaml"
    OUT.write_text(configmap_yaml(source))
    print(f"wrote {OUT.relative_to(REPO)} from {source}")
