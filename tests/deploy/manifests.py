"""Rendering and reading the Kubernetes manifests in deploy/k8s (helpers for the deploy tests).

Every kustomization under deploy/k8s/overlays and deploy/k8s/jobs is rendered with `kubectl kustomize`, the
way `kubectl apply -k` would, and read back as plain dicts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
# Overlays render the server; jobs render one-off Jobs. Each folder with a kustomization.yaml is a target.
TARGET_PARENTS = ("overlays", "jobs")
SERVER_CONTAINER = "sluice"
CONFIG_MAP = "sluice-config"

Obj = dict[str, Any]


def kubectl() -> str:
    """The kubectl binary: on PATH (the machine image has it) or in this venv (`make deploy-tools`)."""
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("kubectl is missing: run `make deploy-tools`")
    return found


def targets() -> list[Path]:
    """Every kustomization to render, e.g. [deploy/k8s/jobs/convert-models, deploy/k8s/overlays/dev, ...]."""
    return sorted(p.parent for parent in TARGET_PARENTS for p in (K8S / parent).glob("*/kustomization.yaml"))


def render(target: Path) -> list[Obj]:
    """`kubectl kustomize target`, parsed.

    Args:
        target: a folder holding kustomization.yaml.

    Returns:
        The rendered objects, in kustomize's order.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBECONFIG")}
    out = subprocess.run([kubectl(), "kustomize", str(target)], check=True, capture_output=True, text=True,
                         env=env, timeout=60)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@dataclass(frozen=True)
class Rendered:
    """One rendered target and lookups into it."""

    name: str  # "overlays/dev"
    objects: list[Obj]

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name_prefix: str = "") -> Obj:
        """The single object of `kind` whose name starts with `name_prefix` (generated names carry a hash)."""
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"].startswith(name_prefix)]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name_prefix!r}, got {len(found)}"
        return found[0]

    def deployment(self) -> Obj:
        return self.one("Deployment", "sluice")

    def server_container(self) -> Obj:
        return container(self.deployment(), SERVER_CONTAINER)

    def config(self) -> dict[str, str]:
        """The server's ConfigMap data: the SLUICE_* environment of every replica."""
        name = self.server_container()["envFrom"][0]["configMapRef"]["name"]
        return dict(self.one("ConfigMap", name)["data"])


def pod_spec(workload: Obj) -> Obj:
    return dict(workload["spec"]["template"]["spec"])


def container(workload: Obj, name: str) -> Obj:
    (found,) = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    return dict(found)


def all_containers(workload: Obj) -> list[Obj]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def workloads(rendered: Rendered) -> list[Obj]:
    return [o for o in rendered.objects if o["kind"] in ("Deployment", "Job")]


def port_number(c: Obj, name: str) -> int:
    (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return int(port)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a matchLabels selector matches a label set."""
    return all(labels.get(k) == v for k, v in selector.items())


def load_yaml(path: Path) -> Obj:
    return dict(yaml.safe_load(path.read_text()))
