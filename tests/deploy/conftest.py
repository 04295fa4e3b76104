"""Fixtures for the deploy tests: every kustomize target rendered once per session."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import K8S, Rendered, render, targets


@pytest.fixture(scope="session")
def rendered() -> dict[str, Rendered]:
    """`{"overlays/dev": Rendered, "overlays/prod": ..., "jobs/convert-models": ...}`."""
    out = {}
    for target in targets():
        name = str(target.relative_to(K8S))
        out[name] = Rendered(name, render(target))
    return out


@pytest.fixture(scope="session")
def overlays(rendered: dict[str, Rendered]) -> list[Rendered]:
    """The server overlays (dev, prod)."""
    return [r for name, r in rendered.items() if name.startswith("overlays/")]
