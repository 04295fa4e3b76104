"""Generate Python code for the sluice.v1 contract: `python -m tools.gen_protos` (run by `make protos`).

Writes `service/_pb/sluice/v1/<file>_pb2.py`, `<file>_pb2_grpc.py` and their `.pyi` stubs (mypy-protobuf),
importable as `service._pb.sluice.v1.generation_pb2`. Generated code is never committed (`.gitignore`).

Why the import rewrite: protoc names the generated modules after the proto paths, so
`generation_pb2_grpc.py` says `from sluice.v1 import generation_pb2`, which only resolves if
`service/_pb` is on `sys.path`. Mapping the files under a virtual `service/_pb/...` proto path instead would
also rename the proto files themselves (`service/_pb/sluice/v1/generation.proto`), and that name is what
server reflection and every other service's stubs see. So protoc runs on the clean layout and the few
`from sluice.v1 import` lines are rewritten to `from service._pb.sluice.v1 import`; any import the rewrite
does not understand fails the build instead of failing later at run time.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_DIR = ROOT / "service" / "_pb"
# The Python package that the output directory is, relative to ROOT.
OUT_PACKAGE = "service._pb"
PROTO_PACKAGE_DIR = Path("sluice") / "v1"

_FROM_IMPORT = re.compile(r"^(\s*)from sluice\.v1 import ", re.MULTILINE)
# Any other form of import of the generated package would stay unresolved: refuse it.
_LEFTOVER_IMPORT = re.compile(r"^\s*(from|import)\s+sluice(\.|\s|$)", re.MULTILINE)
_PLUGINS = ("protoc-gen-mypy", "protoc-gen-mypy_grpc")


class GenerationError(RuntimeError):
    """protoc failed, a plugin is missing, or the generated code does not import."""


def find_plugin(name: str) -> Path:
    """Locate a protoc plugin executable, preferring the one beside this interpreter (the venv's).

    Args:
        name: executable name, e.g. "protoc-gen-mypy".

    Returns:
        Its path.
    """
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return beside
    found = shutil.which(name)
    if found is None:
        raise GenerationError(f"{name} not found: install mypy-protobuf (`make venv` does)")
    return Path(found)


def run_protoc(protos: list[Path], proto_root: Path, out: Path) -> None:
    """Run grpc_tools' bundled protoc with the Python, gRPC and mypy generators.

    Args:
        protos: .proto files under `proto_root`.
        proto_root: the include root (`protos/`), so files are named `sluice/v1/*.proto`.
        out: directory that receives `sluice/v1/*_pb2*.py[i]`.
    """
    from grpc_tools import protoc  # type: ignore[import-untyped]  # build-time only: imported here

    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        *(f"--plugin={name}={find_plugin(name)}" for name in _PLUGINS),
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p.resolve()) for p in protos),
    ]
    code = protoc.main(args)
    if code != 0:
        raise GenerationError(f"protoc failed with exit code {code}")


def rewrite_imports(package_dir: Path, out_package: str) -> int:
    """Point the generated cross-file imports at `out_package` (see the module docstring).

    Args:
        package_dir: directory holding the generated `*_pb2*.py[i]` files.
        out_package: dotted package that contains `sluice.v1`, e.g. "service._pb".

    Returns:
        The number of import lines rewritten.
    """
    rewritten = 0
    for path in sorted(package_dir.glob("*_pb2*.py*")):
        text = path.read_text(encoding="utf-8")
        new_text, count = _FROM_IMPORT.subn(rf"\1from {out_package}.sluice.v1 import ", text)
        leftover = _LEFTOVER_IMPORT.search(new_text)
        if leftover:
            raise GenerationError(f"{path.name}: unexpected import form {leftover.group(0).strip()!r}")
        if count:
            path.write_text(new_text, encoding="utf-8")
        rewritten += count
    return rewritten


def mark_stubs_generated(package_dir: Path) -> int:
    """Prefix every generated `.pyi` with `# mypy: ignore-errors`.

    mypy-protobuf's gRPC stubs are written against the grpc type stubs (types-grpcio); without them mypy
    --strict reports unused ignores and unmatched overloads *inside the generated files*. Errors there
    are the generator's business, not ours, while the types they declare are still used to check our code.

    Args:
        package_dir: directory holding the generated stubs.

    Returns:
        The number of stubs marked.
    """
    stubs = sorted(package_dir.glob("*.pyi"))
    for path in stubs:
        path.write_text("# mypy: ignore-errors\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    return len(stubs)


def write_init_files(out: Path) -> None:
    """Make `out`, `out/sluice` and `out/sluice/v1` regular packages.

    Args:
        out: the generated tree's root (becomes `service/_pb`).
    """
    for directory in (out, out / "sluice", out / PROTO_PACKAGE_DIR):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "__init__.py").write_text('"""Generated by tools/gen_protos.py; do not edit."""\n')


def check_imports(root: Path, modules: list[str]) -> None:
    """Import every generated module in a fresh interpreter, so a broken import fails the build.

    Args:
        root: directory to run from (the repository root, so `service` is importable).
        modules: dotted module names.
    """
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    result = subprocess.run(
        [sys.executable, "-c", code, *modules], cwd=root, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise GenerationError(f"generated code does not import:\n{result.stderr}")


def generate(proto_root: Path = PROTO_ROOT, out_dir: Path = OUT_DIR) -> list[str]:
    """Regenerate `out_dir` from scratch (stale files of deleted protos must not survive).

    Args:
        proto_root: include root holding `sluice/v1/*.proto`.
        out_dir: target directory; replaced as a whole.

    Returns:
        The dotted names of the generated modules.
    """
    protos = sorted((proto_root / PROTO_PACKAGE_DIR).glob("*.proto"))
    if not protos:
        raise GenerationError(f"no .proto files under {proto_root / PROTO_PACKAGE_DIR}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target, then swap, so an interrupted run never leaves a half-written package.
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".pb-") as tmp:
        staging = Path(tmp) / "pb"
        staging.mkdir()
        run_protoc(protos, proto_root, staging)
        rewrite_imports(staging / PROTO_PACKAGE_DIR, OUT_PACKAGE)
        mark_stubs_generated(staging / PROTO_PACKAGE_DIR)
        write_init_files(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    modules = [
        f"{OUT_PACKAGE}.sluice.v1.{path.stem}"
        for path in sorted((out_dir / PROTO_PACKAGE_DIR).glob("*_pb2*.py"))
    ]
    check_imports(out_dir.parent.parent, modules)
    return modules


def main(argv: list[str] | None = None) -> int:
    """Command line entry point.

    Args:
        argv: arguments (default: sys.argv[1:]).

    Returns:
        Process exit code.
    """
    parser = argparse.ArgumentParser(prog="python -m tools.gen_protos", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    try:
        modules = generate()
    except GenerationError as err:
        print(f"gen_protos: {err}", file=sys.stderr)
        return 1
    print(f"gen_protos: {len(modules)} modules in {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
