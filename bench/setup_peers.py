"""The bench venv with the peers: `python -m bench.setup_peers` (also `make bench-deps`).

The peers are bench-only: they live in `.cache/bench-venv`, never in the project venv or its
dependencies. llama-cpp-python has no prebuilt CPU wheel for this platform on PyPI, so pip builds it from
source (~10 minutes on 2 cores); the built wheel is kept in `.cache/wheels` and reused by later setups.
Idempotent: a stamp file records a finished install of exactly these versions.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("bench.setup_peers")

ROOT = Path(__file__).resolve().parent.parent
BENCH_VENV = ROOT / ".cache" / "bench-venv"
WHEELS = ROOT / ".cache" / "wheels"
# Pinned so figures from different days compare like with like; bump both here and in the README.
LLAMA_CPP = "llama-cpp-python==0.3.36"
OTHER_PEERS = ("onnxruntime-genai==0.18.0", "numpy")
# Native ISA (AVX2/AVX-512 here): what a user building llama.cpp for this machine would do.
DEFAULT_CMAKE_ARGS = "-DGGML_NATIVE=ON"
# ...minus AMX: the CPU advertises AMX tiles but this VM traps `tileloadd` (SIGILL in ggml's AMX matmul).
# Explicit -mno-* flags win over -march=native in GCC whatever their order.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def venv_python(venv: Path = BENCH_VENV) -> Path:
    """The bench venv's interpreter.

    Args:
        venv: the venv folder.

    Returns:
        Path to its python.
    """
    return venv / "bin" / "python"


def _stamp(venv: Path) -> Path:
    return venv / ".peers-installed"


def _build_env() -> dict[str, str]:
    """The environment of the llama.cpp source build: caller's CMAKE_ARGS/CFLAGS win over ours."""
    env = dict(os.environ)
    env.setdefault("CMAKE_ARGS", DEFAULT_CMAKE_ARGS)
    env.setdefault("CFLAGS", NO_AMX_FLAGS)
    env.setdefault("CXXFLAGS", NO_AMX_FLAGS)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(len(os.sched_getaffinity(0))))
    return env


def _build_flags(env: dict[str, str]) -> str:
    return f"CMAKE_ARGS={env['CMAKE_ARGS']}\nCFLAGS={env['CFLAGS']}\nCXXFLAGS={env['CXXFLAGS']}\n"


def _stamp_text() -> str:
    return "\n".join((LLAMA_CPP, *OTHER_PEERS)) + "\n" + _build_flags(_build_env())


def is_ready(venv: Path = BENCH_VENV) -> bool:
    """Whether the venv holds exactly the pinned peers (its stamp matches).

    Args:
        venv: the venv folder.

    Returns:
        True when nothing needs installing.
    """
    stamp = _stamp(venv)
    return venv_python(venv).exists() and stamp.exists() and stamp.read_text() == _stamp_text()


def _flags_file(wheels: Path) -> Path:
    return wheels / "llama_cpp_python.build-flags"


def cached_llama_wheel(wheels: Path = WHEELS) -> Path | None:
    """The cached llama-cpp-python wheel of the pinned version, if one was built with today's flags.

    Args:
        wheels: the wheel cache folder.

    Returns:
        The wheel path or None.
    """
    pinned = LLAMA_CPP.split("==")[1]
    found = sorted(wheels.glob(f"llama_cpp_python-{pinned}-*.whl"))
    flags = _flags_file(wheels)
    if not found or not flags.exists() or flags.read_text() != _build_flags(_build_env()):
        return None
    return found[-1]


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    log.info("running: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)


def build_llama_wheel(python: Path, wheels: Path = WHEELS) -> Path:
    """Build the pinned llama-cpp-python from source into the wheel cache (the slow step).

    Args:
        python: an interpreter with pip (the bench venv's).
        wheels: the wheel cache folder.

    Returns:
        The built wheel.
    """
    wheels.mkdir(parents=True, exist_ok=True)
    env = _build_env()
    # --no-cache-dir: pip's own wheel cache ignores build flags and would hand back an older build.
    cmd = [str(python), "-m", "pip", "wheel", "--no-cache-dir", "--no-deps", "-w", str(wheels), LLAMA_CPP]
    _run(cmd, env=env)
    _flags_file(wheels).write_text(_build_flags(env))
    wheel = cached_llama_wheel(wheels)
    if wheel is None:
        raise RuntimeError(f"pip wheel finished but no {LLAMA_CPP} wheel is in {wheels}")
    return wheel


def ensure_bench_venv(venv: Path = BENCH_VENV, wheels: Path = WHEELS) -> Path:
    """Create the bench venv and install the peers unless already done; return its python.

    Args:
        venv: the venv folder.
        wheels: the wheel cache folder.

    Returns:
        The bench venv's python.
    """
    python = venv_python(venv)
    if is_ready(venv):
        return python
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(venv)])
        _run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    wheel = cached_llama_wheel(wheels) or build_llama_wheel(python, wheels)
    _run([str(python), "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(wheel)])
    # The wheel's own dependencies (numpy, jinja2, diskcache, typing-extensions) and the other peers.
    _run([str(python), "-m", "pip", "install", "-q", str(wheel), *OTHER_PEERS])
    _run([str(python), "-c", "import llama_cpp, onnxruntime_genai"])
    _stamp(venv).write_text(_stamp_text())
    return python


def main(argv: list[str] | None = None) -> int:
    """Entry point.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--venv", type=Path, default=BENCH_VENV)
    parser.add_argument("--wheels", type=Path, default=WHEELS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    python = ensure_bench_venv(args.venv, args.wheels)
    log.info("bench venv ready: %s", python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
