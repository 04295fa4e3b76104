"""Rebuilding grpc method handlers: what every interceptor of ours does to wrap an RPC's behaviour.

A grpc.aio interceptor only sees the method handler, so wrapping a call means building a handler of the
same kind (unary/stream in and out) around a new behaviour function or request deserializer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import grpc

_FACTORIES: Final[Mapping[tuple[bool, bool], Callable[..., Any]]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def behavior_of(handler: Any) -> Any:
    """The handler's behaviour function, whatever its kind."""
    return handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary


def rebuild(handler: Any, behavior: Any = None, request_deserializer: Any = None) -> Any:
    """A handler of the same kind as `handler`, with a new behaviour and/or request deserializer.

    Args:
        handler: an RpcMethodHandler.
        behavior: the new behaviour (default: the handler's own).
        request_deserializer: the new deserializer (default: the handler's own).

    Returns:
        The new RpcMethodHandler.
    """
    factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(behavior if behavior is not None else behavior_of(handler),
                   request_deserializer=request_deserializer or handler.request_deserializer,
                   response_serializer=handler.response_serializer)
