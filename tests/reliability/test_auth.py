"""Auth under load: with token auth on, hundreds of calls with a missing or wrong token, on every RPC and
concurrently with authorized streams, all get UNAUTHENTICATED and cost no engine work (no tokenization, no
submit, no prefill); mutual TLS with certificates made here accepts a client certificate from the CA and
refuses anonymous, self-signed and foreign-CA clients, again and again, while the valid client keeps
working. Certificates come from the helpers of tests/grpc/test_security.py (the `openssl` command).
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
from collections.abc import Sequence
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._pb.sluice.v1 import common_pb2, generation_pb2, generation_pb2_grpc, moderation_pb2, moderation_pb2_grpc
from tests.grpc.conftest import COUNTING_PROMPT, WAIT_SECONDS, Served, front, server_config
from tests.grpc.test_security import TOKEN, Pki, _ca, _leaf, _openssl, secure, tls_args
from tests.reliability.conftest import SubmitCounter, assert_idle, incomplete, record_figures, run_stream

pytestmark = pytest.mark.asyncio(loop_scope="session")

DENIED = (grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
# What a misconfigured or hostile client sends instead of "authorization: Bearer <token>".
BAD_METADATA: tuple[tuple[tuple[str, str], ...], ...] = (
    (),
    (("authorization", "Bearer"),),
    (("authorization", "Bearer "),),
    (("authorization", f"Bearer {TOKEN[:-1]}"),),  # a prefix
    (("authorization", f"Bearer {TOKEN}x"),),  # an extension
    (("authorization", f"Bearer {TOKEN.upper()}"),),
    (("authorization", f"bearer {TOKEN}"),),  # the scheme is case-sensitive here
    (("authorization", f"Bearer  {TOKEN}"),),
    (("authorization", f"Basic {TOKEN}"),),
    (("authorization", TOKEN),),
    (("x-authorization", f"Bearer {TOKEN}"),),
    (("authorization", "Bearer " + "A" * 4096),),  # larger headers: grpc itself answers RESOURCE_EXHAUSTED
)


def five_calls(ch: grpc.aio.Channel, metadata: Sequence[tuple[str, str]]) -> list[object]:
    """One call of every sluice.v1 RPC (not yet awaited)."""
    gen, mod = generation_pb2_grpc.GenerationServiceStub(ch), moderation_pb2_grpc.ModerationServiceStub(ch)
    md, user = tuple(metadata), common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content="hello")
    return [
        run_stream(gen, generation_pb2.GenerateRequest(prompt=COUNTING_PROMPT, max_new_tokens=4), 10, md),
        gen.Complete(generation_pb2.CompleteRequest(prompt=COUNTING_PROMPT, max_new_tokens=4), timeout=10, metadata=md),
        gen.Tokenize(generation_pb2.TokenizeRequest(prompt="hello"), timeout=10, metadata=md),
        gen.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=10, metadata=md),
        mod.Moderate(moderation_pb2.ModerateRequest(messages=[user]), timeout=10, metadata=md),
    ]


async def outcome(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        result = await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    code = getattr(result, "code", grpc.StatusCode.OK)  # run_stream returns a StreamResult
    return code, getattr(result, "details", "")


async def test_missing_or_wrong_tokens_at_scale_get_unauthenticated_and_no_engine_work(
        rel: Served, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (token_file := tmp_path / "token").write_text(TOKEN + "\n")
    config = server_config(model_dir, "--auth-token-file", str(token_file))
    good = (("authorization", f"Bearer {TOKEN}"),)
    async with front(rel, config, token=TOKEN) as guarded, grpc.aio.insecure_channel(guarded.target) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        prompt_len = (await stub.Tokenize(generation_pb2.TokenizeRequest(prompt=COUNTING_PROMPT), metadata=good)
                      ).token_count
        renders = itertools.count()
        render = guarded.app.pipeline.renderer.render
        monkeypatch.setattr(guarded.app.pipeline.renderer, "render",
                            lambda *a: (next(renders), render(*a))[1])  # counts tokenizations
        submits = SubmitCounter(rel.engine, monkeypatch)
        before = rel.engine.stats()
        authorized = [generation_pb2.GenerateRequest(request_id=f"authorized-{i}", prompt=COUNTING_PROMPT,
                                                     max_new_tokens=16) for i in range(4)]
        streams = [asyncio.create_task(run_stream(stub, r, metadata=good)) for r in authorized]
        denied_calls = [c for _ in range(4) for md in BAD_METADATA for c in five_calls(ch, md)]
        denied = await asyncio.gather(*(outcome(c) for c in denied_calls))
        for r, req in zip(await asyncio.gather(*streams), authorized, strict=True):
            assert incomplete(r, req, rel.engine.eos_ids) is None
        await assert_idle(rel)
        after = rel.engine.stats()
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert len(denied) == 4 * len(BAD_METADATA) * 5 and set(denied) == {DENIED}
    assert next(renders) == len(authorized)  # only the authorized requests were tokenized
    assert sorted(submits.ids) == sorted(r.request_id for r in authorized)
    assert after.prompt_tokens - before.prompt_tokens == len(authorized) * prompt_len  # no other prefill
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
    record_figures("auth_token", {"denied_calls": len(denied), "metadata_variants": len(BAD_METADATA),
                                  "authorized_streams": len(authorized)})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pki, Path, Path]:
    """The CA, server, client and foreign-CA certificates of test_security.py, plus a self-signed client."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("reliability-pki")
    ca, rogue_ca = _ca(d, "sluice-test-ca"), _ca(d, "rogue-ca")
    server = _leaf(d, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    client = _leaf(d, "client", ca, "extendedKeyUsage=clientAuth")
    rogue = _leaf(d, "rogue", rogue_ca, "extendedKeyUsage=clientAuth")
    self_key, self_cert = d / "self-signed.key", d / "self-signed.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", "/CN=self-signed-client", "-keyout", str(self_key), "-out", str(self_cert),
             "-addext", "extendedKeyUsage=clientAuth", "-addext", "keyUsage=critical,digitalSignature")
    return Pki(ca[0], server[0], server[1], client[0], client[1], rogue[0], rogue[1]), self_cert, self_key


async def test_mutual_tls_refuses_other_clients_repeatedly_and_still_needs_the_token(
        rel: Served, model_dir: Path, pki: tuple[Pki, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    p, self_cert, self_key = pki
    config = server_config(model_dir, *tls_args(p, mutual=True))
    good = (("authorization", f"Bearer {TOKEN}"),)
    req = generation_pb2.GenerateRequest(prompt=COUNTING_PROMPT, max_new_tokens=3)
    submits = SubmitCounter(rel.engine, monkeypatch)
    refused: list[grpc.StatusCode] = []
    async with front(rel, config, token=TOKEN) as mtls:
        for _ in range(10):  # handshakes fail again and again; the server is none the worse
            for cert, key in ((None, None), (p.rogue_cert, p.rogue_key), (self_cert, self_key)):
                async with secure(mtls.target, p, cert, key) as ch:
                    stub = generation_pb2_grpc.GenerationServiceStub(ch)
                    refused.append((await run_stream(stub, req, timeout=10, metadata=good)).code)
        async with secure(mtls.target, p, p.client_cert, p.client_key) as ch:
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            no_token = await run_stream(stub, req, timeout=10)
            accepted = await run_stream(stub, req, timeout=WAIT_SECONDS, metadata=good)
    assert set(refused) == {grpc.StatusCode.UNAVAILABLE} and len(refused) == 30
    assert (no_token.code, no_token.details) == DENIED
    assert incomplete(accepted, req, rel.engine.eos_ids) is None
    assert submits.count == 1  # only the client with both the certificate and the token
    record_figures("auth_mtls", {"refused_handshakes": len(refused), "client_kinds_refused": 3})
