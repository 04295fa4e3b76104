"""Request validation: every field of every request, before any work is done.

Each check raises `InvalidArgument` with the field's dotted path and a message of the form
"<field> must be <allowed>, got <value>" (see `errors.validation_error`). Ranges follow OpenAI and vLLM
where they agree, and are listed in docs/API.md:

    temperature          [0, 2]     (OpenAI's range; 0 is greedy; beyond 2 a small model emits noise)
    top_p                (0, 1]     (0 would leave no token)
    top_k                >= 0       (uint32 on the wire; 0 disables; values >= vocab act as disabled)
    min_p                [0, 1]
    repetition_penalty   (0, 2]     (1 disables; 0 divides by zero; > 2 wrecks any text)
    presence_penalty     [-2, 2]    (OpenAI and vLLM)
    frequency_penalty    [-2, 2]    (OpenAI and vLLM)

Floats are checked for NaN and infinity first, because every range comparison with NaN is False.
Text fields must not contain U+0000 (never meaningful in text, and a classic way to truncate a string in
native code). Invalid UTF-8 and lone surrogates cannot get this far: protobuf rejects them when parsing
and when a string field is assigned. Values that may contain user text are never echoed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from guard.policy import DEFAULT_MAX_MODERATE_CALLS, DEFAULT_MAX_MODERATE_CHARS, PolicyError
from guard.taxonomy import CODE_RE
from service._pb.sluice.v1 import common_pb2, generation_pb2, moderation_pb2
from service.config import Config, GuardBackend
from service.engine.sampler import MAX_TOP_LOGPROBS
from service.errors import GuardDisabled, InvalidArgument, range_problem, validation_error

# A stop string's length bounds how much decoded text the stop matcher must hold back before release,
# so long stop strings delay streaming for every request; 128 characters covers any real delimiter.
MAX_STOP_CHARS: Final = 128
# OpenAI allows 4; 16 leaves room for tool-call delimiters while keeping the per-token match cheap.
MAX_STOP_SEQUENCES: Final = 16
# Far beyond any context window's worth of turns, yet small enough that the chat template renders fast.
MAX_MESSAGES: Final = 256
# Request ids go to logs: bounded and restricted to characters that cannot forge a log line.
REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_CHAT_ROLES: Final = (common_pb2.CHAT_ROLE_SYSTEM, common_pb2.CHAT_ROLE_USER, common_pb2.CHAT_ROLE_ASSISTANT)
_MODERATION_ROLES: Final = (
    moderation_pb2.MODERATION_ROLE_UNSPECIFIED,
    moderation_pb2.MODERATION_ROLE_USER,
    moderation_pb2.MODERATION_ROLE_AGENT,
)

_LAST_ROLE_FOR: Final = {
    moderation_pb2.MODERATION_ROLE_USER: common_pb2.CHAT_ROLE_USER,
    moderation_pb2.MODERATION_ROLE_AGENT: common_pb2.CHAT_ROLE_ASSISTANT,
}

GenerationRequestPb = generation_pb2.GenerateRequest | generation_pb2.CompleteRequest


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds a request must respect; also what GetModelInfo reports in `Limits`.

    Args:
        default_max_new_tokens: used when a request leaves max_new_tokens unset.
        max_new_tokens_cap: the largest accepted max_new_tokens.
        max_stop_sequences: the most stop strings per request.
        max_stop_chars: the longest stop string, in characters.
        max_messages: the most chat messages per request.
        max_top_logprobs: the largest accepted top_logprobs.
        max_moderate_chars: the most characters (all messages together) one Moderate call may send.
        max_moderate_calls: Moderate calls in progress at once; more are refused (RESOURCE_EXHAUSTED).
        guard_enabled: False when the server runs without a guard (GuardOptions then fail).
        categories: every category code the guard knows; None checks only the code syntax.
    """

    default_max_new_tokens: int = 256
    max_new_tokens_cap: int = 2048
    max_stop_sequences: int = MAX_STOP_SEQUENCES
    max_stop_chars: int = MAX_STOP_CHARS
    max_messages: int = MAX_MESSAGES
    max_top_logprobs: int = MAX_TOP_LOGPROBS
    max_moderate_chars: int = DEFAULT_MAX_MODERATE_CHARS
    max_moderate_calls: int = DEFAULT_MAX_MODERATE_CALLS
    guard_enabled: bool = True
    categories: frozenset[str] | None = None


def limits_from_config(config: Config, categories: frozenset[str] | None = None) -> Limits:
    """The limits a server built from `config` enforces.

    Args:
        config: the server configuration.
        categories: every category code the guard knows (None: syntax check only).

    Returns:
        The limits.
    """
    return Limits(
        default_max_new_tokens=config.engine.default_max_new_tokens,
        max_new_tokens_cap=config.engine.max_new_tokens_cap,
        max_moderate_chars=config.guard.max_moderate_chars,
        max_moderate_calls=config.guard.max_moderate_calls,
        guard_enabled=config.guard.backend is not GuardBackend.NONE,
        categories=categories,
    )


def validate_generate(request: GenerationRequestPb, limits: Limits) -> None:
    """Check a GenerateRequest or CompleteRequest (they have the same fields).

    Args:
        request: the request as received.
        limits: the server's limits.

    Raises:
        InvalidArgument: naming the first offending field.
        GuardDisabled: guard options were set but the server has no guard.
    """
    if request.request_id and not REQUEST_ID_RE.fullmatch(request.request_id):
        raise validation_error("request_id", "must be 1 to 128 characters of [A-Za-z0-9._:-]")
    _check_input(request, limits, require_user_last=True)
    if request.HasField("sampling"):
        _check_sampling(request.sampling)
    if request.HasField("max_new_tokens"):
        check_range("max_new_tokens", request.max_new_tokens, 1, limits.max_new_tokens_cap)
    _check_stop(request.stop, limits)
    check_range("top_logprobs", request.top_logprobs, 0, limits.max_top_logprobs)
    if request.top_logprobs and not request.logprobs:
        got = request.top_logprobs
        raise validation_error("top_logprobs", f"must be 0 when logprobs is false, got {got}")
    if request.HasField("guard"):
        _check_guard(request.guard, limits)


def validate_tokenize(request: generation_pb2.TokenizeRequest, limits: Limits) -> None:
    """Check a TokenizeRequest: the same input rules as Generate.

    Args:
        request: the request as received.
        limits: the server's limits.

    Raises:
        InvalidArgument: naming the first offending field.
    """
    _check_input(request, limits, require_user_last=True)


def validate_moderate(request: moderation_pb2.ModerateRequest, limits: Limits) -> None:
    """Check a ModerateRequest.

    Args:
        request: the request as received.
        limits: the server's limits.

    Raises:
        InvalidArgument: naming the first offending field.
        GuardDisabled: the server has no guard.
    """
    if not limits.guard_enabled:
        raise GuardDisabled()
    _check_messages("messages", request.messages, limits, require_user_last=False)
    if all(m.role == common_pb2.CHAT_ROLE_SYSTEM for m in request.messages):
        raise validation_error("messages", "must contain a user or assistant message")
    chars = sum(len(m.content) for m in request.messages)
    if chars > limits.max_moderate_chars:
        raise validation_error("messages", f"hold {chars} characters in all, at most {limits.max_moderate_chars} "
                                           "(guard.max_moderate_chars)")
    if request.role not in _MODERATION_ROLES:
        allowed = "MODERATION_ROLE_USER or MODERATION_ROLE_AGENT"
        raise validation_error("role", f"must be {allowed}, got {request.role}")
    # The guard judges the last turn, so it must be the judged role's (guard.prompt.judged_turns).
    expected = _LAST_ROLE_FOR.get(request.role)
    last = request.messages[-1].role
    if expected is not None and last != expected:
        role = moderation_pb2.ModerationRole.Name(request.role)
        raise validation_error("role", f"is {role}, so the last message must be from {_role_name(expected)}")
    if request.HasField("guard"):
        _check_guard(request.guard, limits)


def guard_policy_error(error: PolicyError) -> InvalidArgument:
    """The InvalidArgument for a `PolicyError` raised by `Policy.tighten` on a request's GuardOptions (an
    attempt to loosen the policy, or an unknown category), naming the option as a request field.

    Args:
        error: the policy's error; its message starts with the option's name.

    Returns:
        e.g. field "guard.output_threshold" and message
        "guard.output_threshold may only be lowered, got 0.9 > 0.5".
    """
    message = str(error)
    name = message.split(" ", 1)[0].rstrip(":")
    if name in common_pb2.GuardOptions.DESCRIPTOR.fields_by_name:
        return InvalidArgument(f"guard.{name}", f"guard.{message}")
    return InvalidArgument("guard", f"guard: {message}")


def check_range(
    field: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise unless `value` is finite and inside the interval; message "x must be in (0, 1], got 1.5".

    Args:
        field: dotted field path.
        value: the value (int or float).
        low: lower bound, or None for none.
        high: upper bound, or None for none.
        low_open: exclude `low` itself.
        high_open: exclude `high` itself.

    Raises:
        InvalidArgument: on NaN, infinity, or a value outside the interval.
    """
    problem = range_problem(value, low, high, low_open=low_open, high_open=high_open)
    if problem is not None:
        raise validation_error(field, problem)


def check_text(field: str, value: str) -> None:
    """Raise if `value` holds U+0000 (never echoes the text).

    Args:
        field: dotted field path.
        value: the text.

    Raises:
        InvalidArgument: naming the field.
    """
    if "\x00" in value:
        raise validation_error(field, "must not contain U+0000")


def _check_sampling(p: generation_pb2.SamplingParams) -> None:
    if p.HasField("temperature"):
        check_range("sampling.temperature", p.temperature, 0.0, 2.0)
    if p.HasField("top_p"):
        check_range("sampling.top_p", p.top_p, 0.0, 1.0, low_open=True)
    check_range("sampling.min_p", p.min_p, 0.0, 1.0)
    if p.HasField("repetition_penalty"):
        check_range("sampling.repetition_penalty", p.repetition_penalty, 0.0, 2.0, low_open=True)
    check_range("sampling.presence_penalty", p.presence_penalty, -2.0, 2.0)
    check_range("sampling.frequency_penalty", p.frequency_penalty, -2.0, 2.0)


def _check_input(
    request: GenerationRequestPb | generation_pb2.TokenizeRequest, limits: Limits, *, require_user_last: bool
) -> None:
    kind = request.WhichOneof("input")
    if kind is None:
        raise validation_error("input", "must be set: one of prompt or messages")
    if kind == "prompt":
        if not request.prompt:
            raise validation_error("prompt", "must not be empty")
        check_text("prompt", request.prompt)
        return
    _check_messages("messages", request.messages.messages, limits, require_user_last=require_user_last)


def _check_messages(
    field: str, messages: Sequence[common_pb2.ChatMessage], limits: Limits, *, require_user_last: bool
) -> None:
    if not 1 <= len(messages) <= limits.max_messages:
        raise validation_error(field, f"must hold 1 to {limits.max_messages} messages, got {len(messages)}")
    for i, message in enumerate(messages):
        role_field = f"{field}[{i}].role"
        if message.role not in _CHAT_ROLES:
            allowed = "CHAT_ROLE_SYSTEM, CHAT_ROLE_USER, CHAT_ROLE_ASSISTANT"
            raise validation_error(role_field, f"must be one of {allowed}, got {_role_name(message.role)}")
        if message.role == common_pb2.CHAT_ROLE_SYSTEM and i > 0:
            raise validation_error(role_field, "must not be CHAT_ROLE_SYSTEM except in the first message")
        if not message.content:
            raise validation_error(f"{field}[{i}].content", "must not be empty")
        check_text(f"{field}[{i}].content", message.content)
    last = len(messages) - 1
    if require_user_last and messages[last].role != common_pb2.CHAT_ROLE_USER:
        raise validation_error(
            f"{field}[{last}].role",
            f"must be CHAT_ROLE_USER in the last message, got {_role_name(messages[last].role)}",
        )


def _role_name(role: int) -> str:
    try:
        return common_pb2.ChatRole.Name(role)  # type: ignore[arg-type]
    except ValueError:
        return str(role)  # an enum number this server does not know


def _check_stop(stop: Sequence[str], limits: Limits) -> None:
    if len(stop) > limits.max_stop_sequences:
        most = limits.max_stop_sequences
        raise validation_error("stop", f"must hold at most {most} strings, got {len(stop)}")
    for i, s in enumerate(stop):
        if not 1 <= len(s) <= limits.max_stop_chars:
            most = limits.max_stop_chars
            raise validation_error(f"stop[{i}]", f"must be 1 to {most} characters, got {len(s)}")
        check_text(f"stop[{i}]", s)


def _check_guard(options: common_pb2.GuardOptions, limits: Limits) -> None:
    if not limits.guard_enabled:
        raise GuardDisabled()
    for i, code in enumerate(options.block_categories):
        well_formed = CODE_RE.fullmatch(code) is not None
        known = well_formed and (limits.categories is None or code in limits.categories)
        if not known:
            # A well-formed code is short and harmless to echo; anything else is not echoed.
            shown = repr(code) if well_formed else "a malformed code"
            field = f"guard.block_categories[{i}]"
            raise validation_error(field, f"must be a known category code, got {shown}")
    # Whether a value loosens the server's policy is the policy's call (guard.policy.Policy.tighten).
    for name in ("input_threshold", "output_threshold"):
        if options.HasField(name):
            check_range(f"guard.{name}", getattr(options, name), 0.0, 1.0)
    if options.HasField("release_window_tokens"):
        check_range("guard.release_window_tokens", options.release_window_tokens, 1)

