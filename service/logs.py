"""Logging from config: stdlib logging, one line per event, as text or JSON (log.format), at log.level.

Structured fields travel in `extra=`; the JSON formatter writes them as keys of the line, the text
formatter appends them as key=value. One request line per finished gRPC call comes from `RequestLogger`,
a grpc_metrics.CallObserver: request id, method, status, finish reason, token counts and durations.
Prompt and completion text never appear in logs; with log.text on (debugging on one's own machine) the
request line also carries the request message.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, Final, TextIO

from google.protobuf import text_format
from google.protobuf.message import Message

from service.config import LogConfig, LogFormat
from service.grpc_metrics import CallEnd, CallInfo, finish_reason_of

REQUEST_LOGGER: Final = "sluice.request"
# Probes call these every few seconds; their lines would drown the requests (DEBUG shows them).
QUIET_SERVICES: Final = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                                   "grpc.reflection.v1.ServerReflection"})
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a call passed with `extra=`.

    Args:
        record: a log record.

    Returns:
        Field name -> value, in the order given.
    """
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, msg, the extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, Any] = {"ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                                "level": record.levelname.lower(), "logger": record.name,
                                "msg": record.getMessage()}
        for key, value in extra_fields(record).items():
            line.setdefault(key, value)  # an extra can't overwrite the envelope
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # json escapes newlines inside strings, so a traceback stays on the event's one line
        return json.dumps(line, default=str, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """The classic line, then the extra fields as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = extra_fields(record)
        if not fields:
            return base
        head, sep, tail = base.partition("\n")  # fields stay on the first line, before any traceback
        kv = " ".join(f"{k}={json.dumps(v, default=str, ensure_ascii=False)}" for k, v in fields.items())
        return f"{head} {kv}{sep}{tail}"


def setup_logging(cfg: LogConfig, stream: TextIO | None = None) -> logging.Handler:
    """Configure the root logger from config, replacing any handlers it had.

    Args:
        cfg: level and format.
        stream: where lines go (default stderr).

    Returns:
        The installed handler.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if cfg.format is LogFormat.JSON else TextFormatter())
    logging.basicConfig(level=cfg.level.value.upper(), handlers=[handler], force=True)
    return handler


class RequestLogger:
    """A CallObserver writing one line per finished call to the `sluice.request` logger.

    Args:
        log_text: also log the request message (prompt, messages): log.text, a debugging setting.
        logger: where lines go (default `sluice.request`).
    """

    def __init__(self, log_text: bool = False, logger: logging.Logger | None = None) -> None:
        self.log_text = log_text
        self.log = logger if logger is not None else logging.getLogger(REQUEST_LOGGER)

    def call_started(self, info: CallInfo) -> None:
        return None

    def call_finished(self, end: CallEnd) -> None:
        level = logging.DEBUG if end.info.service in QUIET_SERVICES else logging.INFO
        if not self.log.isEnabledFor(level):
            return
        fields = request_fields(end)
        if self.log_text and isinstance(end.request, Message):
            fields["request_text"] = text_format.MessageToString(end.request, as_one_line=True)
        self.log.log(level, "%s %s %.1fms", end.info.method, end.code.name, end.seconds * 1000, extra=fields)


def request_fields(end: CallEnd) -> dict[str, Any]:
    """The structured fields of a request line; counts and durations only, never text.

    Args:
        end: the finished call.

    Returns:
        event, request_id, method, grpc_code, duration_ms, and for generations finish_reason, token counts,
        queue_ms, ttft_ms (when text was released) and e2e_ms.
    """
    fields: dict[str, Any] = {"event": "request", "request_id": end.request_id, "method": end.info.method,
                              "grpc_code": end.code.name, "duration_ms": _ms(end.seconds)}
    reason = finish_reason_of(end)
    if reason is not None:
        fields["finish_reason"] = reason
    r = end.record
    if r is not None:
        fields.update(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens, e2e_ms=_ms(r.e2e_seconds))
        if r.queue_seconds is not None:
            fields["queue_ms"] = _ms(r.queue_seconds)
        if r.ttft_seconds is not None:
            fields["ttft_ms"] = _ms(r.ttft_seconds)
    return fields


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)
