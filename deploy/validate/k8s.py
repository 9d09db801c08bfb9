"""Schema-validates Kubernetes manifests, kustomizations rendered as kubectl would apply them.

    deploy/validate/.venv/bin/python deploy/validate/k8s.py deploy/k8s deploy/k8s-kafka
    kubectl kustomize my/overlay | deploy/validate/.venv/bin/python deploy/validate/k8s.py -

A directory is rendered with `kubectl kustomize` (the venv's kubectl, else the
one on PATH); a file, or `-` for standard input, is read as it is. Every object:

- a built-in kind is checked by kubernetes-validate against the OpenAPI
  schemas of the oldest and the newest Kubernetes it bundles (`-k` to choose),
  strictly: a field the schema does not know fails;
- a ServiceMonitor or PrometheusRule (monitoring.coreos.com/v1) against the
  Prometheus Operator's CRDs as cloudcoil models them (types, enums, required
  fields), strictly as well;
- any other kind fails: it is not validated, so it is not let through.

One line per object; exits 1 when any object fails. The venv:
deploy/validate/requirements.txt.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from cloudcoil.models.prometheus_operator import v1 as monitoring_v1
from kubernetes_validate import utils as kv_utils

CUSTOM = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring_v1.ServiceMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): monitoring_v1.PrometheusRule,
}


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if not found:
        sys.exit("no kubectl: pip install -r deploy/validate/requirements.txt into this venv")
    return found


def documents(source: str) -> list[Any]:
    """The objects of a kustomization directory, a YAML file or `-`."""
    if source == "-":
        text = sys.stdin.read()
    elif Path(source).is_dir():
        run = subprocess.run([kubectl(), "kustomize", source], capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"kubectl kustomize {source} failed:\n{run.stderr}")
        text = run.stdout
    elif Path(source).is_file():
        text = Path(source).read_text()
    else:
        sys.exit(f"{source}: no such file or directory")
    return [d for d in yaml.safe_load_all(text) if d is not None]


def unknown_fields(given: Any, kept: Any, path: str = "") -> list[str]:
    """Fields of `given` that the model dropped (it ignores what it does not know)."""
    if isinstance(given, dict):
        if not isinstance(kept, dict):
            return [path or "."]
        out = []
        for key, value in given.items():
            at = f"{path}.{key}" if path else str(key)
            out += [at] if key not in kept else unknown_fields(value, kept[key], at)
        return out
    if isinstance(given, list) and isinstance(kept, list):
        return [
            f for i, (g, k) in enumerate(zip(given, kept, strict=False)) for f in unknown_fields(g, k, f"{path}.{i}")
        ]
    return []


def check(doc: Any, versions: list[str]) -> str | None:
    """None when the object is valid, else why not."""
    if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
        return "not a Kubernetes object (no apiVersion and kind)"
    api_version, kind = doc["apiVersion"], doc["kind"]
    model = CUSTOM.get((api_version, kind))
    if model is not None:
        try:
            parsed = model.model_validate(doc)
        except ValueError as e:
            return str(e)
        unknown = unknown_fields(doc, parsed.model_dump(by_alias=True, exclude_unset=True, mode="json"))
        return f"unknown fields {unknown}" if unknown else None
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kv_utils.SchemaNotFoundError:
            return f"no schema for {kind} {api_version} in Kubernetes {version}, and not a known CRD"
        except kv_utils.ValidationError as e:
            return f"Kubernetes {version}: {'.'.join(str(p) for p in e.path) or '.'}: {e.message}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="kustomization directory, YAML file, or - for stdin")
    bundled = sorted(set(kv_utils.all_versions()), key=kv_utils.all_versions().index)
    parser.add_argument(
        "-k",
        "--kubernetes-version",
        action="append",
        dest="versions",
        help=f"validate against this Kubernetes version; repeatable (default: the oldest and the newest "
        f"bundled, {bundled[0]} and {bundled[-1]}; bundled: {', '.join(bundled)})",
    )
    args = parser.parse_args()
    versions = args.versions or [bundled[0], bundled[-1]]
    for version in versions:
        if not any(kv_utils.major_minor(b) == kv_utils.major_minor(version) for b in bundled):
            parser.error(f"no schemas for Kubernetes {version}; bundled: {', '.join(bundled)}")
    failed = 0
    for source in args.sources:
        docs = documents(source)
        if not docs:
            print(f"FAIL {source}: no objects")
            failed += 1
        for doc in docs:
            meta = doc if isinstance(doc, dict) else {}
            name = f"{meta.get('kind')}/{(meta.get('metadata') or {}).get('name')}"
            why = check(doc, versions)
            if why is None:
                print(f"ok   {source}: {name}")
            else:
                print(f"FAIL {source}: {name}: {why}")
                failed += 1
    print(f"{failed} failed, against Kubernetes {' and '.join(versions)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
