"""Vendor the validation schemas of prometheus-operator's CRDs: `python extract.py VERSION CRD.yaml...`.

Writes VERSION/<plural>.json: per served version of each CRD, its `openAPIV3Schema` with the `description`
texts left out (validation reads none of them), as {"group", "kind", "versions": {name: schema}}.
The CRDs are prometheus-operator's example/prometheus-operator-crd/monitoring.coreos.com_*.yaml (Apache-2.0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """PyYAML reads a bare `=` (an enum value of the AlertmanagerConfig CRD) as a `value` tag: keep it a string."""


_Loader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def without_descriptions(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {
            k: without_descriptions(v) for k, v in schema.items() if not (k == "description" and isinstance(v, str))
        }
    if isinstance(schema, list):
        return [without_descriptions(v) for v in schema]
    return schema


def main(version: str, *paths: str) -> int:
    out = Path(__file__).resolve().parent / version
    out.mkdir(exist_ok=True)
    for path in paths:
        crd = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_Loader)
        spec = crd["spec"]
        document = {
            "group": spec["group"],
            "kind": spec["names"]["kind"],
            "operator_version": crd["metadata"]["annotations"]["operator.prometheus.io/version"],
            "versions": {
                v["name"]: without_descriptions(v["schema"]["openAPIV3Schema"]) for v in spec["versions"] if v["served"]
            },
        }
        target = out / f"{spec['names']['plural']}.json"
        target.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"{target}: {target.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
