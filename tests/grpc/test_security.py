"""TLS, mutual TLS and bearer-token auth, each on a front over the session's engine.

Certificates are made per test session with the `openssl` command (EC P-256, seconds to make): a CA, a
server certificate for 127.0.0.1/localhost, a client certificate from the same CA, and a client
certificate from an unrelated CA that mutual TLS must refuse.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service._pb.sluice.v1 import common_pb2, generation_pb2, generation_pb2_grpc, moderation_pb2, moderation_pb2_grpc
from service.client import AsyncSluiceClient, ClientTls, RetryPolicy
from tests.grpc.conftest import WAIT_SECONDS, Served, front, server_config

pytestmark = pytest.mark.asyncio(loop_scope="session")

TOKEN = "s3cret-token-for-tests-0123456789abcdef"
NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    return cert, key


def _leaf(d: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    key, csr, cert, extfile = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
    extfile.write_text(ext + "\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "2", "-extfile", str(extfile), "-out", str(cert))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = _ca(d, "sluice-test-ca"), _ca(d, "rogue-ca")
    server = _leaf(d, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    client = _leaf(d, "client", ca, "extendedKeyUsage=clientAuth")
    rogue = _leaf(d, "rogue", rogue_ca, "extendedKeyUsage=clientAuth")
    return Pki(ca[0], server[0], server[1], client[0], client[1], rogue[0], rogue[1])


def tls_args(pki: Pki, mutual: bool) -> list[str]:
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    return [*args, "--tls-client-ca", str(pki.ca)] if mutual else args


async def tokenize_status(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """OK, or the status a Tokenize call failed with (Tokenize does no engine work)."""
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    try:
        resp = await stub.Tokenize(generation_pb2.TokenizeRequest(prompt="Hello, world!"), timeout=5)
    except grpc.aio.AioRpcError as err:
        return err.code()
    assert resp.token_count == 4
    return grpc.StatusCode.OK


def secure(target: str, pki: Pki, cert: Path | None = None, key: Path | None = None,
           ca: Path | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials((ca or pki.ca).read_bytes(), key.read_bytes() if key else None,
                                         cert.read_bytes() if cert else None)
    return grpc.aio.secure_channel(target, creds)


async def test_tls_serves_trusting_clients_only(served: Served, model_dir: Path, pki: Pki) -> None:
    async with front(served, server_config(model_dir, *tls_args(pki, mutual=False))) as tls:
        tls_cfg = ClientTls.from_files(ca=pki.ca)
        async with AsyncSluiceClient(tls.target, tls=tls_cfg, retry=NO_RETRY, timeout=WAIT_SECONDS) as client:
            req = generation_pb2.CompleteRequest(prompt="1, 2, 3, 4, 5,", max_new_tokens=2)
            resp = await client.complete(req)
            assert resp.final.usage.completion_tokens == 2
        async with grpc.aio.insecure_channel(tls.target) as plain:
            assert await tokenize_status(plain) == grpc.StatusCode.UNAVAILABLE
        # A client that does not trust the server's CA refuses the handshake.
        async with secure(tls.target, pki, ca=pki.rogue_cert) as untrusting:
            assert await tokenize_status(untrusting) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(
        served: Served, model_dir: Path, pki: Pki) -> None:
    async with front(served, server_config(model_dir, *tls_args(pki, mutual=True))) as mtls:
        async with secure(mtls.target, pki, pki.client_cert, pki.client_key) as good:
            assert await tokenize_status(good) == grpc.StatusCode.OK
        async with secure(mtls.target, pki) as anonymous:
            assert await tokenize_status(anonymous) == grpc.StatusCode.UNAVAILABLE
        async with secure(mtls.target, pki, pki.rogue_cert, pki.rogue_key) as rogue:
            assert await tokenize_status(rogue) == grpc.StatusCode.UNAVAILABLE


async def denied_everywhere(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
    """Every sluice.v1 RPC, unary and streaming, answers UNAUTHENTICATED with this metadata."""
    gen = generation_pb2_grpc.GenerationServiceStub(channel)
    mod = moderation_pb2_grpc.ModerationServiceStub(channel)
    user = common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content="hello")
    calls = [
        gen.Complete(generation_pb2.CompleteRequest(prompt="hi", max_new_tokens=1), metadata=metadata, timeout=5),
        gen.Tokenize(generation_pb2.TokenizeRequest(prompt="hi"), metadata=metadata, timeout=5),
        gen.GetModelInfo(generation_pb2.GetModelInfoRequest(), metadata=metadata, timeout=5),
        mod.Moderate(moderation_pb2.ModerateRequest(messages=[user]), metadata=metadata, timeout=5),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAUTHENTICATED,
                                                           "missing or invalid bearer token")
    stream = gen.Generate(generation_pb2.GenerateRequest(prompt="hi", max_new_tokens=1), metadata=metadata,
                          timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stream.read()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_token_auth(served: Served, model_dir: Path, session_tmp: Path) -> None:
    token_file = session_tmp / "token"
    token_file.write_text(TOKEN + "\n")
    config = server_config(model_dir, "--auth-token-file", str(token_file))
    assert config.security.auth_token is not None
    async with front(served, config, token=config.security.auth_token.reveal()) as guarded:
        before = served.engine.stats()
        async with grpc.aio.insecure_channel(guarded.target) as ch:
            await denied_everywhere(ch, ())
            await denied_everywhere(ch, (("authorization", f"Bearer {TOKEN[:-1]}x"),))
            await denied_everywhere(ch, (("authorization", TOKEN),))  # the scheme is part of the header
            after = served.engine.stats()
            assert (after.steps, after.prompt_tokens, after.generation_tokens) == (
                before.steps, before.prompt_tokens, before.generation_tokens)  # no engine work at all
            # Probes and grpcurl need no token.
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            listed = [s.name async for r in refl for s in r.list_services_response.service]
            assert "sluice.v1.GenerationService" in listed
        async with AsyncSluiceClient(guarded.target, token=TOKEN, retry=NO_RETRY, timeout=WAIT_SECONDS) as client:
            resp = await client.complete(generation_pb2.CompleteRequest(prompt="1, 2, 3, 4, 5,", max_new_tokens=2))
            assert resp.final.usage.completion_tokens == 2
            assert (await client.model_info()).context_length == 1024
