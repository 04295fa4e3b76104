"""Real servers for the end-to-end gRPC tests: the converted int4 model behind grpc.aio on loopback port 0.

One engine serves the whole session (`served`); loading one costs about a second and ~100 MB, so tests
that need another *front* (TLS, token auth, a patched pipeline) build one over that same engine with
`front()`. Only configurations the engine itself must differ in (slot count, queue, drain, which stops
the engine) load their own.

Everything async here runs on the session event loop: test modules that use these fixtures set
`pytestmark = pytest.mark.asyncio(loop_scope="session")`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from service._pb.sluice.v1 import generation_pb2, generation_pb2_grpc
from service.app import App, build_app, start
from service.config import Config, load_config
from service.engine.engine import Engine
from service.server import SluiceServer, start_server

# One onnxruntime thread per engine: the tests share two busy cores, where spinning worker threads
# only steal time from each other.
BASE_ARGS = ("--port", "0", "--guard-backend", "none", "--no-metrics-enabled", "--intra-op-threads", "1")
# Greedy continues this prompt by counting ("6, 7, 8, ...") and does not emit EOS for hundreds of tokens:
# the "long generation" every capacity, cancel, deadline and drain test holds a slot with.
COUNTING_PROMPT = "1, 2, 3, 4, 5,"
# Bounds every wait on the server in these tests (a hang fails instead of blocking the run).
WAIT_SECONDS = 30.0


def server_config(model_dir: Path, *args: str) -> Config:
    """A validated Config for a loopback test server: port 0, no guard, no metrics endpoint.

    Args:
        model_dir: the model folder.
        args: further `sluice serve` flags.

    Returns:
        The config.
    """
    return load_config([*BASE_ARGS, "--model", str(model_dir), *args], env={})


class EngineWatch:
    """Wakes a waiter whenever the engine frees a KV slot, so a test can wait for "idle" without polling.

    The engine thread calls `kv.release` after removing the request from `running`; the wrapper installed
    here (on this engine instance only) forwards that moment to the event loop.
    """

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self._released = asyncio.Event()
        release = engine.kv.release

        def release_and_notify(slot: int) -> None:
            release(slot)
            loop.call_soon_threadsafe(self._released.set)

        engine.kv.release = release_and_notify  # type: ignore[method-assign]

    async def until_idle(self, timeout: float = WAIT_SECONDS) -> None:
        """Returns once no request holds a slot; raises TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while self.engine.stats().running:
                self._released.clear()
                if not self.engine.stats().running:  # freed between the check and the clear
                    return
                await self._released.wait()


@dataclass
class Served:
    """A running server and what tests reach into."""

    app: App
    server: SluiceServer
    watch: EngineWatch

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def engine(self) -> Engine:
        return self.app.engine


async def start_served(config: Config) -> Served:
    """Starts a server with its own engine (stop it with `served.server.drain()`)."""
    app, server = await start(config)
    return Served(app, server, EngineWatch(app.engine, asyncio.get_running_loop()))


@contextlib.asynccontextmanager
async def front(base: Served, config: Config, token: str | None = None) -> AsyncIterator[Served]:
    """Another server over `base`'s engine: its own App (pipeline, servicers), port, interceptors, TLS.

    Args:
        base: the server whose engine is shared.
        config: this front's config (security, ports); engine settings are ignored.
        token: bearer token the front requires, or None.

    Yields:
        The front, SERVING. It is stopped on exit; the shared engine keeps running.
    """
    app = build_app(config, base.engine)
    server = await start_server(config, app.generation, app.moderation, app.life, token)
    await server.set_serving(True)
    try:
        yield Served(app, server, base.watch)
    finally:
        await server.server.stop(0)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def served(model_dir: Path) -> AsyncIterator[Served]:
    """The session's server: 4 slots, a 1024-token window (cheap to overflow in the too-long test)."""
    s = await start_served(server_config(model_dir, "--max-slots", "4", "--max-context", "1024"))
    yield s
    await s.server.drain()


@pytest_asyncio.fixture(loop_scope="session")
async def channel(served: Served) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(served.target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> generation_pb2_grpc.GenerationServiceStub:
    return generation_pb2_grpc.GenerationServiceStub(channel)


def counting_request(max_new_tokens: int) -> generation_pb2.GenerateRequest:
    """A greedy raw-prompt request that keeps generating until `max_new_tokens`."""
    return generation_pb2.GenerateRequest(prompt=COUNTING_PROMPT, max_new_tokens=max_new_tokens)


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("grpc")


def bad_request(err: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """The (field, description) pairs of the google.rpc.BadRequest details an INVALID_ARGUMENT carries."""
    status = rpc_status.from_call(err)
    assert status is not None, "INVALID_ARGUMENT must carry a google.rpc.Status"
    out: list[tuple[str, str]] = []
    for detail in status.details:
        br = error_details_pb2.BadRequest()
        assert detail.Unpack(br)
        out.extend((v.field, v.description) for v in br.field_violations)
    return out
