"""A small typed client for the sluice.v1 API, for service-to-service use: `AsyncSluiceClient` and its
blocking twin `SluiceClient`.

Retries (see `service/client_channel.py`): gRPC's own retry policy, only on UNAVAILABLE and
RESOURCE_EXHAUSTED, with exponential backoff and jitter; a Generate stream is never replayed once a
message has arrived.

Deadlines: every call takes `timeout` (seconds; default: the client's), the whole budget of the call
including retries; for Generate it covers the whole stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Final, Self

import grpc
import grpc.aio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from service._pb.sluice.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    moderation_pb2,
    moderation_pb2_grpc,
)
from service.client_channel import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT
from service.client_channel import ClientTls as ClientTls
from service.client_channel import RetryPolicy as RetryPolicy
from service.client_channel import auth_metadata, channel_options, credentials

_ROLES: Final = {
    "system": common_pb2.CHAT_ROLE_SYSTEM,
    "user": common_pb2.CHAT_ROLE_USER,
    "assistant": common_pb2.CHAT_ROLE_ASSISTANT,
}


def build_generate_request(
    prompt: str | None = None,
    *,
    messages: Sequence[tuple[str, str]] | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    logprobs: bool = False,
    top_logprobs: int = 0,
    request_id: str = "",
) -> generation_pb2.GenerateRequest:
    """Build a GenerateRequest from plain values (unset optionals stay unset: the server's defaults).

    Args:
        prompt: raw text input; exactly one of prompt and messages.
        messages: (role, content) pairs, role one of "system", "user", "assistant".
        max_new_tokens: upper bound on generated tokens.
        temperature: 0 is greedy.
        top_p: nucleus filter.
        top_k: top-k filter (0 disables).
        seed: sampling seed.
        stop: stop strings.
        logprobs: return per-token logprobs.
        top_logprobs: alternatives per token (needs logprobs).
        request_id: client id for logs.

    Returns:
        The request.
    """
    if (prompt is None) == (messages is None):
        raise ValueError("exactly one of prompt and messages must be given")
    request = generation_pb2.GenerateRequest(
        request_id=request_id, stop=list(stop), logprobs=logprobs, top_logprobs=top_logprobs
    )
    if prompt is not None:
        request.prompt = prompt
    else:
        for role, content in messages or ():
            if role not in _ROLES:
                raise ValueError(f"role must be one of {', '.join(_ROLES)}, got {role!r}")
            request.messages.messages.add(role=_ROLES[role], content=content)
    if max_new_tokens is not None:
        request.max_new_tokens = max_new_tokens
    if temperature is not None:
        request.sampling.temperature = temperature
    if top_p is not None:
        request.sampling.top_p = top_p
    if top_k:
        request.sampling.top_k = top_k
    if seed is not None:
        request.sampling.seed = seed
    return request


def as_complete_request(request: generation_pb2.GenerateRequest) -> generation_pb2.CompleteRequest:
    """The same request for Complete. The two messages share field numbers and types, so the bytes are
    the same (tests/unit/test_contract.py keeps them in step).

    Args:
        request: a GenerateRequest.

    Returns:
        The equivalent CompleteRequest.
    """
    return generation_pb2.CompleteRequest.FromString(request.SerializeToString())


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """The google.rpc.BadRequest (field, description) pairs of an INVALID_ARGUMENT error.

    Args:
        error: a grpc.RpcError or grpc.aio.AioRpcError.

    Returns:
        The violations; empty when the error carries none.
    """
    status = rpc_status.from_call(error)
    out: list[tuple[str, str]] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            out.extend((v.field, v.description) for v in bad_request.field_violations)
    return out


class AsyncSluiceClient:
    """asyncio client. Use as `async with AsyncSluiceClient("127.0.0.1:50051") as client: ...`.

    Args:
        target: "host:port".
        token: bearer token sent with every call, or None.
        tls: TLS settings; None means a plaintext channel.
        timeout: default per-call deadline in seconds.
        retry: retry policy.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: ClientTls | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
    ) -> None:
        options = channel_options(retry or RetryPolicy(), tls)
        if tls is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials(tls), options=options)
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._moderation = moderation_pb2_grpc.ModerationServiceStub(self._channel)
        self._metadata = auth_metadata(token)
        self._timeout = timeout

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (cancels calls still running)."""
        await self._channel.close()

    async def generate(
        self, request: generation_pb2.GenerateRequest, *, timeout: float | None = None
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """Stream a generation. Leaving the loop early cancels the call, which frees the server's slot.

        Args:
            request: the request (see `build_generate_request`).
            timeout: deadline for the whole stream, seconds.

        Yields:
            Chunk responses, then one final response.
        """
        call = self._generation.Generate(request, timeout=timeout or self._timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()  # no-op when the stream already ended

    async def complete(
        self, request: generation_pb2.CompleteRequest, *, timeout: float | None = None
    ) -> generation_pb2.CompleteResponse:
        """The whole answer at once.

        Args:
            request: the request (see `as_complete_request`).
            timeout: deadline, seconds.

        Returns:
            The response.
        """
        response: generation_pb2.CompleteResponse = await self._generation.Complete(
            request, timeout=timeout or self._timeout, metadata=self._metadata
        )
        return response

    async def tokenize(
        self, request: generation_pb2.TokenizeRequest, *, timeout: float | None = None
    ) -> generation_pb2.TokenizeResponse:
        """Token ids of a prompt or conversation, as Generate would see them.

        Args:
            request: the request.
            timeout: deadline, seconds.

        Returns:
            The response.
        """
        response: generation_pb2.TokenizeResponse = await self._generation.Tokenize(
            request, timeout=timeout or self._timeout, metadata=self._metadata
        )
        return response

    async def moderate(
        self, request: moderation_pb2.ModerateRequest, *, timeout: float | None = None
    ) -> moderation_pb2.ModerateResponse:
        """Judge a conversation with the server's guard.

        Args:
            request: the request.
            timeout: deadline, seconds.

        Returns:
            The response.
        """
        response: moderation_pb2.ModerateResponse = await self._moderation.Moderate(
            request, timeout=timeout or self._timeout, metadata=self._metadata
        )
        return response

    async def model_info(self, *, timeout: float | None = None) -> generation_pb2.ModelInfo:
        """Model facts, guard policy and limits.

        Args:
            timeout: deadline, seconds.

        Returns:
            The model info.
        """
        response: generation_pb2.GetModelInfoResponse = await self._generation.GetModelInfo(
            generation_pb2.GetModelInfoRequest(), timeout=timeout or self._timeout, metadata=self._metadata
        )
        return response.model_info


class SluiceClient:
    """Blocking client with the same methods as AsyncSluiceClient. Use as a context manager.

    Args:
        target: "host:port".
        token: bearer token sent with every call, or None.
        tls: TLS settings; None means a plaintext channel.
        timeout: default per-call deadline in seconds.
        retry: retry policy.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: ClientTls | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
    ) -> None:
        options = channel_options(retry or RetryPolicy(), tls)
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials(tls), options=options)
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._moderation = moderation_pb2_grpc.ModerationServiceStub(self._channel)
        self._metadata = auth_metadata(token)
        self._timeout = timeout

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def generate(
        self, request: generation_pb2.GenerateRequest, *, timeout: float | None = None
    ) -> Iterator[generation_pb2.GenerateResponse]:
        """Stream a generation; closing the iterator early cancels the call.

        Args:
            request: the request.
            timeout: deadline for the whole stream, seconds.

        Yields:
            Chunk responses, then one final response.
        """
        call = self._generation.Generate(request, timeout=timeout or self._timeout, metadata=self._metadata)
        try:
            yield from call
        finally:
            call.cancel()

    def complete(
        self, request: generation_pb2.CompleteRequest, *, timeout: float | None = None
    ) -> generation_pb2.CompleteResponse:
        """See AsyncSluiceClient.complete."""
        response: generation_pb2.CompleteResponse = self._generation.Complete(
            request, timeout=timeout or self._timeout, metadata=self._metadata
        )
        return response

    def tokenize(
        self, request: generation_pb2.TokenizeRequest, *, timeout: float | None = None
    ) -> generation_pb2.TokenizeResponse:
        """See AsyncSluiceClient.tokenize."""
        response: generation_pb2.TokenizeResponse = self._generation.Tokenize(
            request, timeout=timeout or self._timeout, metadata=self._metadata
        )
        return response

    def moderate(
        self, request: moderation_pb2.ModerateRequest, *, timeout: float | None = None
    ) -> moderation_pb2.ModerateResponse:
        """See AsyncSluiceClient.moderate."""
        response: moderation_pb2.ModerateResponse = self._moderation.Moderate(
            request, timeout=timeout or self._timeout, metadata=self._metadata
        )
        return response

    def model_info(self, *, timeout: float | None = None) -> generation_pb2.ModelInfo:
        """See AsyncSluiceClient.model_info."""
        response: generation_pb2.GetModelInfoResponse = self._generation.GetModelInfo(
            generation_pb2.GetModelInfoRequest(), timeout=timeout or self._timeout, metadata=self._metadata
        )
        return response.model_info
