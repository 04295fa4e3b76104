"""logs.py: JSON lines with structured fields, text lines with key=value, the level from config, and the
request line: counts and durations, never prompt text unless log.text is on."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import grpc
import pytest

from service._pb.sluice.v1 import generation_pb2
from service.config import LogConfig, LogFormat, LogLevel
from service.grpc_metrics import CallEnd, CallInfo
from service.logs import JsonFormatter, RequestLogger, TextFormatter, request_fields, setup_logging
from service.stats import RequestRecord

SECRET = "zebra-orchid-prompt-text"
GENERATE = CallInfo.parse("/sluice.v1.GenerationService/Generate", False, True)
HEALTH = CallInfo.parse("/grpc.health.v1.Health/Check", False, False)


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def make_record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("sluice.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_the_envelope_extras_and_traceback_on_one_line() -> None:
    line = JsonFormatter().format(make_record("ended %s\nhere", "ok", exc=True, request_id="r1", prompt_tokens=5))
    assert "\n" not in line
    event = json.loads(line)
    assert event["level"] == "warning" and event["logger"] == "sluice.test"
    assert event["msg"] == "ended ok\nhere"
    assert (event["request_id"], event["prompt_tokens"]) == ("r1", 5)
    assert event["ts"].endswith("Z") and "T" in event["ts"]
    assert "ValueError: boom" in event["exc"]


def test_an_extra_cannot_overwrite_the_envelope() -> None:
    event = json.loads(JsonFormatter().format(make_record("real", level="fake", ts="fake")))
    assert (event["level"], event["ts"] != "fake") == ("warning", True)


def test_text_lines_append_fields_before_the_traceback() -> None:
    text = TextFormatter().format(make_record("done", exc=True, request_id="r1", e2e_ms=1.5))
    first, _, rest = text.partition("\n")
    assert first.endswith('WARNING sluice.test done request_id="r1" e2e_ms=1.5')
    assert "ValueError: boom" in rest


@pytest.mark.usefixtures("restore_root_logging")
def test_setup_logging_uses_the_configured_format_and_level() -> None:
    out = io.StringIO()
    setup_logging(LogConfig(level=LogLevel.WARNING, format=LogFormat.JSON), out)
    logging.getLogger("sluice.x").info("hidden")
    logging.getLogger("sluice.x").warning("shown", extra={"n": 3})
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["n"] == 3
    setup_logging(LogConfig(level=LogLevel.DEBUG, format=LogFormat.TEXT), out)
    assert isinstance(logging.getLogger().handlers[0].formatter, TextFormatter)
    assert logging.getLogger().level == logging.DEBUG


def finished(info: CallInfo = GENERATE, code: grpc.StatusCode = grpc.StatusCode.OK,
             record: RequestRecord | None = None) -> CallEnd:
    request = generation_pb2.GenerateRequest(prompt=f"tell me {SECRET}", request_id="req-7")
    return CallEnd(info, code, 0.25, "req-7", record, request)


def test_request_fields_hold_counts_and_durations() -> None:
    record = RequestRecord("Generate", "length", prompt_tokens=5, completion_tokens=8, queue_seconds=0.001,
                           ttft_seconds=0.2, e2e_seconds=0.24, inter_token_seconds=(0.01,))
    assert request_fields(finished(record=record)) == {
        "event": "request", "request_id": "req-7", "method": "/sluice.v1.GenerationService/Generate",
        "grpc_code": "OK", "duration_ms": 250.0, "finish_reason": "length", "prompt_tokens": 5,
        "completion_tokens": 8, "e2e_ms": 240.0, "queue_ms": 1.0, "ttft_ms": 200.0}
    rejected = request_fields(finished(code=grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert rejected["finish_reason"] == "rejected" and "prompt_tokens" not in rejected


def test_request_lines_never_hold_prompt_text_by_default(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sluice.request")
    RequestLogger().call_finished(finished(code=grpc.StatusCode.INVALID_ARGUMENT))
    assert len(caplog.records) == 1
    line = JsonFormatter().format(caplog.records[0])
    assert SECRET not in line and json.loads(line)["grpc_code"] == "INVALID_ARGUMENT"
    assert caplog.records[0].levelno == logging.INFO


def test_log_text_adds_the_request_message(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sluice.request")
    RequestLogger(log_text=True).call_finished(finished())
    assert SECRET in json.loads(JsonFormatter().format(caplog.records[0]))["request_text"]


def test_probe_calls_log_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sluice.request")
    RequestLogger().call_finished(finished(info=HEALTH))
    assert caplog.records == []
    caplog.set_level(logging.DEBUG, logger="sluice.request")
    RequestLogger().call_finished(finished(info=HEALTH))
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
