"""One system, one phase, one process: `python -m bench.worker --system S --phase P --out result.json`.

The job arrives as JSON on stdin. Running each (system, phase) in its own process keeps the systems from
sharing threads or allocator state, and makes `ru_maxrss` that system's peak RSS for that phase alone
(the single-stream phase is the "peak RSS at 1 stream" figure). Imports of the system's library happen
here, lazily, because the peers exist only in the bench venv and the engine only in the project venv.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.harness import (
    ClientDriver,
    Driver,
    Job,
    Recorder,
    peak_rss_mib,
    run_concurrent_phase,
    run_single_phase,
    run_sustained_phase,
)

SYSTEMS = ("sluice", "llama.cpp", "genai")
PHASES = ("single", "concurrent")


def make_driver(system: str, phase: str, job: Job) -> Driver:
    """Build the driver of one system (importing its library only now).

    Args:
        system: one of SYSTEMS.
        phase: one of PHASES (Sluice sizes its slots by it).
        job: model paths, threads and context.

    Returns:
        The driver.
    """
    if system == "llama.cpp":
        from bench.drivers.llamacpp import LlamaCppDriver

        return LlamaCppDriver(job.gguf, job.threads, job.context)
    if system == "genai":
        from bench.drivers.genai import GenaiDriver

        return GenaiDriver(job.model_dir, job.threads, job.context)
    if system == "sluice":
        from bench.drivers.sluice import SluiceDriver

        slots = 1 if phase == "single" else max(*job.concurrency, job.sustained_clients)
        return SluiceDriver(job.model_dir, job.threads, job.context, max_slots=slots)
    raise ValueError(f"system must be one of {SYSTEMS}, got {system!r}")


def run_phase(driver: Driver, phase: str, job: Job) -> Recorder:
    """Run one phase; the concurrent phase adds the sustained (joining requests) run where supported.

    Args:
        driver: the system.
        phase: one of PHASES.
        job: sizes and repetitions.

    Returns:
        The samples.
    """
    if phase == "single":
        return run_single_phase(driver, job)
    rec = run_concurrent_phase(driver, job)
    if isinstance(driver, ClientDriver) and job.sustained_clients > 0:
        run_sustained_phase(driver, job, rec)
    return rec


def main(argv: list[str] | None = None) -> int:
    """Entry point: read the job, measure, write the result JSON.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--system", choices=SYSTEMS, required=True)
    parser.add_argument("--phase", choices=PHASES, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    job = Job.from_json(json.load(sys.stdin))
    load_start = time.perf_counter()
    driver = make_driver(args.system, args.phase, job)
    load_s = time.perf_counter() - load_start
    rec = run_phase(driver, args.phase, job)
    result = {
        "system": args.system,
        "phase": args.phase,
        "info": driver.info(),
        "load_s": load_s,
        "samples": rec.samples,
        "digests": rec.digests,
        "greedy_ids": rec.greedy_ids,
        "notes": rec.notes,
        "peak_rss_mib": peak_rss_mib(),
    }
    close = getattr(driver, "close", None)
    if close is not None:
        close()
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
