"""Cut KubeRay's CRD files down to the ray.io/v1 openAPIV3Schema that tests/test_deploy.py validates against.

    python cluster/kuberay/schemas/extract.py v1.7.0 ray.io_rayclusters.yaml ray.io_rayjobs.yaml

The inputs are ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml of ray-project/kuberay
at the tag given first (Apache-2.0, see LICENSE here). Changes made: only the v1 version's
openAPIV3Schema is kept, every "description" is removed (validation does not read them; they are
most of the size), and the result is written as sorted, compact JSON with a "$comment" saying so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def strip_descriptions(node):
    """The schema without its "description" strings. A property *named* description stays."""
    if isinstance(node, dict):
        return {
            k: (strip_descriptions(v) if k != "properties" else {p: strip_descriptions(s) for p, s in v.items()})
            for k, v in node.items()
            if k != "description"
        }
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def extract(crd_file: Path, tag: str) -> Path:
    crd = yaml.safe_load(crd_file.read_text())
    kind = crd["spec"]["names"]["kind"]
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = {
        "$comment": (
            f"{kind} ray.io/v1 openAPIV3Schema from ray-project/kuberay {tag}, "
            f"ray-operator/config/crd/bases/{crd_file.name} (Apache-2.0, see LICENSE). "
            "Modified: descriptions removed, converted to JSON by cluster/kuberay/schemas/extract.py."
        ),
        **strip_descriptions(v1["schema"]["openAPIV3Schema"]),
    }
    out = HERE / f"{kind.lower()}-v1.schema.json"
    out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
    return out


if __name__ == "__main__":
    tag, *files = sys.argv[1:]
    for f in files:
        print(f"wrote {extract(Path(f), tag)}")
