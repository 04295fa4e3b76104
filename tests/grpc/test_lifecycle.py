"""Lifecycle: health NOT_SERVING -> SERVING -> NOT_SERVING across start and drain, in-flight streams during a
drain (in process through `SluiceServer.drain()`, and as a real `python -m service serve` process on
SIGTERM), and UNAVAILABLE for new work once draining starts. Each test loads its own engine: a drain
stops it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import service.app
from service._pb.sluice.v1 import generation_pb2, generation_pb2_grpc
from service.engine.engine import Engine
from service.server import SluiceServer, start_server
from tests.conftest import ROOT
from tests.grpc.conftest import BASE_ARGS, WAIT_SECONDS, counting_request, server_config

pytestmark = pytest.mark.asyncio(loop_scope="session")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NAMES = ("", "sluice.v1.GenerationService", "sluice.v1.ModerationService")
DRAINING_MESSAGE = "server is shutting down; retry on another replica"
# Long enough that no machine finishes it within the grace below: the drain must cut it.
LONG = 900
# A few tokens: finishes well within the grace once its first token has arrived.
SHORT = 4


async def statuses(channel: grpc.aio.Channel) -> set[int]:
    health = health_pb2_grpc.HealthStub(channel)
    return {(await health.Check(health_pb2.HealthCheckRequest(service=n))).status for n in NAMES}


async def outcome(call: grpc.aio.UnaryStreamCall) -> str:
    """How a stream ended: "final" (a Final message arrived) or the status code name."""
    try:
        while (resp := await call.read()) is not grpc.aio.EOF:
            if resp.HasField("final"):
                return "final"
        return "no final"
    except grpc.aio.AioRpcError as err:
        assert err.code() != grpc.StatusCode.UNAVAILABLE or err.details() == DRAINING_MESSAGE, err.details()
        return str(err.code().name)


async def started(stub: generation_pb2_grpc.GenerationServiceStub, max_new_tokens: int) -> grpc.aio.UnaryStreamCall:
    """A Generate stream that has produced its first chunk (so it is in flight on the server)."""
    call = stub.Generate(counting_request(max_new_tokens), timeout=WAIT_SECONDS)
    assert (await call.read()).HasField("chunk")
    return call


async def next_status(watch: grpc.aio.UnaryStreamCall) -> int:
    resp = await asyncio.wait_for(watch.read(), WAIT_SECONDS)
    assert resp is not grpc.aio.EOF
    status: int = resp.status
    return status


async def test_health_follows_start_and_drain(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Hold warmup until the test has seen NOT_SERVING, and learn the port before start() returns.
    warm_gate = threading.Event()
    warmup = Engine.warmup

    def gated_warmup(engine: Engine) -> None:
        assert warm_gate.wait(WAIT_SECONDS)
        warmup(engine)

    bound: asyncio.Future[SluiceServer] = asyncio.get_running_loop().create_future()

    async def start_and_report(*args: object, **kwargs: object) -> SluiceServer:
        srv = await start_server(*args, **kwargs)  # type: ignore[arg-type]
        bound.set_result(srv)
        return srv

    monkeypatch.setattr(Engine, "warmup", gated_warmup)
    monkeypatch.setattr(service.app, "start_server", start_and_report)
    config = server_config(model_dir, "--max-slots", "2", "--max-context", "1024", "--grace-seconds", "3")
    starting = asyncio.create_task(service.app.start(config))
    srv = await asyncio.wait_for(bound, WAIT_SECONDS)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        assert await statuses(ch) == {NOT_SERVING}  # listening, model loaded, not warm yet
        warm_gate.set()
        app, srv2 = await asyncio.wait_for(starting, WAIT_SECONDS)
        assert srv2 is srv
        assert await statuses(ch) == {SERVING}

        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        short, long = await started(stub, SHORT), await started(stub, LONG)
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
        assert await next_status(watch) == SERVING
        draining = asyncio.create_task(srv.drain())
        assert await next_status(watch) == NOT_SERVING
        watch.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(generation_pb2.CompleteRequest(prompt="hi", max_new_tokens=1), timeout=WAIT_SECONDS)
        assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
        assert await outcome(short) == "final"  # in flight before the drain: allowed to finish
        assert await outcome(long) == "UNAVAILABLE"  # still running when the grace ran out
        await asyncio.wait_for(draining, WAIT_SECONDS)
    assert app.engine.stats().running == 0


# -- a real process and a real SIGTERM -------------------------------------------------------------------------

async def read_port(stderr: asyncio.StreamReader, log: list[str]) -> int:
    """The port from the server's "serving ... on port N" log line (it binds port 0)."""
    while line := (await stderr.readline()).decode(errors="replace"):
        log.append(line)
        if m := re.search(r"on port (\d+)", line):
            return int(m.group(1))
    raise AssertionError("server exited before serving:\n" + "".join(log))


async def keep_reading(stderr: asyncio.StreamReader, log: list[str]) -> None:
    """Drains the child's stderr so it never blocks on a full pipe."""
    while line := await stderr.readline():
        log.append(line.decode(errors="replace"))


def child_env() -> dict[str, str]:
    # Unknown SLUICE_* variables are config errors; the harness's own SLUICE_TEST_* are allowed.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_") or k.startswith("SLUICE_TEST_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


async def with_process(args: list[str], body: Callable[[asyncio.subprocess.Process, int], Awaitable[None]],
                       log: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "service", "serve", *args, cwd=ROOT,
                                                env=child_env(), stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    reader: asyncio.Task[None] | None = None
    try:
        port = await asyncio.wait_for(read_port(proc.stderr, log), 60)
        reader = asyncio.create_task(keep_reading(proc.stderr, log))
        await body(proc, port)
        return await asyncio.wait_for(proc.wait(), WAIT_SECONDS)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if reader is not None:
            await reader


async def test_sigterm_drains_streams_and_exits_zero(model_dir: Path) -> None:
    args = [*BASE_ARGS, "--model", str(model_dir), "--max-slots", "4", "--max-context", "1024",
            "--grace-seconds", "3"]
    log: list[str] = []
    outcomes: list[str] = []

    async def body(proc: asyncio.subprocess.Process, port: int) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert await statuses(ch) == {SERVING}
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            streams = [await started(stub, n) for n in (SHORT, LONG, LONG)]
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
            assert await next_status(watch) == SERVING
            proc.send_signal(signal.SIGTERM)
            assert await next_status(watch) == NOT_SERVING
            watch.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Complete(generation_pb2.CompleteRequest(prompt="hi", max_new_tokens=1),
                                    timeout=WAIT_SECONDS)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            outcomes.extend(await asyncio.gather(*(outcome(s) for s in streams)))

    assert await with_process(args, body, log) == 0, "".join(log)
    assert outcomes == ["final", "UNAVAILABLE", "UNAVAILABLE"]
    assert not any("Traceback" in line for line in log), "".join(log)
