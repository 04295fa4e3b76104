"""Request validation: every rule raises InvalidArgument naming the field, the allowed range and the value."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from google.protobuf.message import DecodeError

from guard.policy import Policy, PolicyError, PolicyOptions
from service._pb.sluice.v1 import common_pb2, generation_pb2, moderation_pb2
from service.config import load_config
from service.errors import GuardDisabled, InvalidArgument
from service.validation import (
    Limits,
    guard_policy_error,
    limits_from_config,
    validate_generate,
    validate_moderate,
    validate_tokenize,
)

LIMITS = Limits(max_new_tokens_cap=100, categories=frozenset({f"S{i}" for i in range(1, 15)}))
USER = common_pb2.CHAT_ROLE_USER
ASSISTANT = common_pb2.CHAT_ROLE_ASSISTANT
SYSTEM = common_pb2.CHAT_ROLE_SYSTEM

Mutation = Callable[[generation_pb2.GenerateRequest], object]


def request() -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(prompt="Hello")


def chat(*turns: tuple[int, str]) -> generation_pb2.GenerateRequest:
    req = generation_pb2.GenerateRequest()
    for role, content in turns:
        req.messages.messages.add(role=role, content=content)
    return req


def rejects(req: generation_pb2.GenerateRequest, limits: Limits = LIMITS) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        validate_generate(req, limits)
    return caught.value


def test_a_full_valid_request_passes() -> None:
    req = chat((SYSTEM, "Be brief."), (USER, "Hi"), (ASSISTANT, "Hello!"), (USER, "Tell me a joke"))
    req.request_id = "req-42.a:b"
    req.sampling.temperature, req.sampling.top_p, req.sampling.top_k = 0.7, 0.9, 40
    req.sampling.min_p, req.sampling.repetition_penalty, req.sampling.seed = 0.05, 1.1, 0
    req.sampling.presence_penalty, req.sampling.frequency_penalty = -2.0, 2.0
    req.max_new_tokens = 100
    req.stop.extend(["\n\n", "x" * 128])
    req.logprobs, req.top_logprobs = True, 20
    req.guard.block_categories.append("S6")
    req.guard.input_threshold, req.guard.output_threshold = 0.0, 0.3
    req.guard.release_window_tokens, req.guard.fail_closed = 1, True
    validate_generate(req, LIMITS)
    validate_generate(generation_pb2.CompleteRequest.FromString(req.SerializeToString()), LIMITS)


def set_attr(path: str, value: object) -> Mutation:
    def mutate(req: generation_pb2.GenerateRequest) -> None:
        target: object = req
        *parents, leaf = path.split(".")
        for name in parents:
            target = getattr(target, name)
        setattr(target, leaf, value)

    return mutate


@pytest.mark.parametrize(
    ("mutate", "field", "message"),
    [
        (set_attr("sampling.top_p", 1.5), "sampling.top_p", "sampling.top_p must be in (0, 1], got 1.5"),
        (set_attr("sampling.top_p", 0.0), "sampling.top_p", "sampling.top_p must be in (0, 1], got 0"),
        (
            set_attr("sampling.temperature", float("nan")),
            "sampling.temperature",
            "sampling.temperature must be a finite number, got nan",
        ),
        (
            set_attr("sampling.temperature", 2.5),
            "sampling.temperature",
            "sampling.temperature must be in [0, 2], got 2.5",
        ),
        (set_attr("sampling.min_p", -0.1), "sampling.min_p", "sampling.min_p must be in [0, 1], got -0.1"),
        (
            set_attr("sampling.repetition_penalty", 0.0),
            "sampling.repetition_penalty",
            "sampling.repetition_penalty must be in (0, 2], got 0",
        ),
        (
            set_attr("sampling.presence_penalty", float("inf")),
            "sampling.presence_penalty",
            "sampling.presence_penalty must be a finite number, got inf",
        ),
        (
            set_attr("sampling.frequency_penalty", -2.5),
            "sampling.frequency_penalty",
            "sampling.frequency_penalty must be in [-2, 2], got -2.5",
        ),
        (set_attr("max_new_tokens", 0), "max_new_tokens", "max_new_tokens must be in [1, 100], got 0"),
        (set_attr("max_new_tokens", 101), "max_new_tokens", "max_new_tokens must be in [1, 100], got 101"),
        (set_attr("top_logprobs", 21), "top_logprobs", "top_logprobs must be in [0, 20], got 21"),
        (set_attr("top_logprobs", 3), "top_logprobs", "top_logprobs must be 0 when logprobs is false, got 3"),
        (set_attr("prompt", ""), "prompt", "prompt must not be empty"),
        (set_attr("prompt", "a\x00b"), "prompt", "prompt must not contain U+0000"),
        (
            set_attr("request_id", "bad id\n"),
            "request_id",
            "request_id must be 1 to 128 characters of [A-Za-z0-9._:-]",
        ),
        (lambda r: r.stop.extend(["s"] * 17), "stop", "stop must hold at most 16 strings, got 17"),
        (lambda r: r.stop.extend(["ok", ""]), "stop[1]", "stop[1] must be 1 to 128 characters, got 0"),
        (lambda r: r.stop.append("x" * 129), "stop[0]", "stop[0] must be 1 to 128 characters, got 129"),
        (lambda r: r.stop.append("\x00"), "stop[0]", "stop[0] must not contain U+0000"),
        (
            lambda r: r.guard.block_categories.append("S99"),
            "guard.block_categories[0]",
            "guard.block_categories[0] must be a known category code, got 'S99'",
        ),
        (
            lambda r: r.guard.block_categories.append("bad code, with text"),
            "guard.block_categories[0]",
            "guard.block_categories[0] must be a known category code, got a malformed code",
        ),
        (
            set_attr("guard.output_threshold", 1.5),
            "guard.output_threshold",
            "guard.output_threshold must be in [0, 1], got 1.5",
        ),
        (
            set_attr("guard.release_window_tokens", 0),
            "guard.release_window_tokens",
            "guard.release_window_tokens must be >= 1, got 0",
        ),
    ],
)
def test_each_rule_names_field_range_and_value(mutate: Mutation, field: str, message: str) -> None:
    req = request()
    if field == "top_logprobs" and "[0, 20]" in message:
        req.logprobs = True
    mutate(req)
    error = rejects(req)
    assert (error.field, error.message) == (field, message)


def test_invalid_unicode_cannot_reach_validation() -> None:
    with pytest.raises(UnicodeEncodeError):
        generation_pb2.GenerateRequest(prompt="a\ud800b")  # lone surrogate
    with pytest.raises(DecodeError, match="UTF-8"):
        # field 2 (prompt), length 2, bytes 0xC3 0x28: invalid UTF-8 on the wire
        generation_pb2.GenerateRequest.FromString(b"\x12\x02\xc3\x28")


def test_input_must_be_set() -> None:
    error = rejects(generation_pb2.GenerateRequest())
    assert (error.field, error.message) == ("input", "input must be set: one of prompt or messages")


@pytest.mark.parametrize(
    ("turns", "field", "message"),
    [
        ((), "messages", "messages must hold 1 to 256 messages, got 0"),
        (
            ((0, "hi"),),
            "messages[0].role",
            "messages[0].role must be one of CHAT_ROLE_SYSTEM, CHAT_ROLE_USER, CHAT_ROLE_ASSISTANT, "
            "got CHAT_ROLE_UNSPECIFIED",
        ),
        (
            ((USER, "hi"), (9, "x")),
            "messages[1].role",
            "messages[1].role must be one of CHAT_ROLE_SYSTEM, CHAT_ROLE_USER, CHAT_ROLE_ASSISTANT, got 9",
        ),
        (
            ((USER, "hi"), (SYSTEM, "x"), (USER, "y")),
            "messages[1].role",
            "messages[1].role must not be CHAT_ROLE_SYSTEM except in the first message",
        ),
        (((USER, ""),), "messages[0].content", "messages[0].content must not be empty"),
        (
            ((USER, "hi"), (ASSISTANT, "hello")),
            "messages[1].role",
            "messages[1].role must be CHAT_ROLE_USER in the last message, got CHAT_ROLE_ASSISTANT",
        ),
        (((SYSTEM, "only a system prompt"),), "messages[0].role", "messages[0].role must be CHAT_ROLE_USER"),
    ],
)
def test_chat_messages(turns: tuple[tuple[int, str], ...], field: str, message: str) -> None:
    req = chat(*turns)
    if not turns:
        req.messages.SetInParent()  # an empty conversation, explicitly chosen
    error = rejects(req)
    assert error.field == field
    assert error.message.startswith(message)


def test_too_many_messages() -> None:
    req = chat(*([(USER, "x")] * 3))
    error = rejects(req, Limits(max_messages=2))
    assert error.message == "messages must hold 1 to 2 messages, got 3"


def test_guard_options_need_a_guard() -> None:
    req = request()
    req.guard.fail_closed = True
    with pytest.raises(GuardDisabled):
        validate_generate(req, Limits(guard_enabled=False))
    validate_generate(request(), Limits(guard_enabled=False))  # no options: fine without a guard


def test_tokenize_uses_the_same_input_rules() -> None:
    validate_tokenize(generation_pb2.TokenizeRequest(prompt="x"), LIMITS)
    with pytest.raises(InvalidArgument) as caught:
        validate_tokenize(generation_pb2.TokenizeRequest(prompt="\x00"), LIMITS)
    assert caught.value.field == "prompt"


def moderate_request(*turns: tuple[int, str], role: int = 0) -> moderation_pb2.ModerateRequest:
    messages = [common_pb2.ChatMessage(role=r, content=c) for r, c in turns]
    return moderation_pb2.ModerateRequest(messages=messages, role=role)  # type: ignore[arg-type]


def test_moderate_rules() -> None:
    validate_moderate(moderate_request((USER, "q"), (ASSISTANT, "a")), LIMITS)  # role inferred later
    validate_moderate(moderate_request((USER, "q"), role=moderation_pb2.MODERATION_ROLE_USER), LIMITS)
    user_on_agent = moderate_request((USER, "q"), (ASSISTANT, "a"), role=moderation_pb2.MODERATION_ROLE_USER)
    with pytest.raises(InvalidArgument) as caught:
        validate_moderate(user_on_agent, LIMITS)
    assert caught.value.message == (
        "role is MODERATION_ROLE_USER, so the last message must be from CHAT_ROLE_USER"
    )
    agent_on_user = moderate_request((USER, "q"), role=moderation_pb2.MODERATION_ROLE_AGENT)
    with pytest.raises(InvalidArgument) as caught:
        validate_moderate(agent_on_user, LIMITS)
    assert caught.value.message == (
        "role is MODERATION_ROLE_AGENT, so the last message must be from CHAT_ROLE_ASSISTANT"
    )
    with pytest.raises(InvalidArgument) as caught:
        validate_moderate(moderate_request((SYSTEM, "s")), LIMITS)
    assert caught.value.message == "messages must contain a user or assistant message"
    with pytest.raises(InvalidArgument) as caught:
        validate_moderate(moderate_request((USER, "q"), role=7), LIMITS)
    assert caught.value.message == "role must be MODERATION_ROLE_USER or MODERATION_ROLE_AGENT, got 7"
    with pytest.raises(GuardDisabled):
        validate_moderate(moderate_request((USER, "q")), Limits(guard_enabled=False))


def test_moderate_text_is_bounded_over_all_messages() -> None:
    limits = Limits(max_moderate_chars=10)
    validate_moderate(moderate_request((USER, "12345"), (ASSISTANT, "67890")), limits)  # exactly the bound
    with pytest.raises(InvalidArgument) as caught:
        validate_moderate(moderate_request((USER, "12345"), (ASSISTANT, "678901")), limits)
    assert caught.value.field == "messages"
    assert caught.value.message == "messages hold 11 characters in all, at most 10 (guard.max_moderate_chars)"


def test_limits_from_config() -> None:
    config = load_config(["--max-new-tokens-cap", "512", "--guard-backend", "none"], {})
    limits = limits_from_config(config)
    assert limits.max_new_tokens_cap == 512 and limits.default_max_new_tokens == 256
    assert limits.guard_enabled is False and limits.max_moderate_chars == 32_768
    assert limits_from_config(load_config(["--guard-max-moderate-chars", "100"], {})).max_moderate_chars == 100


def test_policy_errors_become_field_errors() -> None:
    policy = Policy()
    with pytest.raises(PolicyError) as caught:
        policy.tighten(PolicyOptions(output_threshold=0.9))
    error = guard_policy_error(caught.value)
    assert error.field == "guard.output_threshold"
    assert error.message == "guard.output_threshold may only be lowered, got 0.9 > 0.5"
    with pytest.raises(PolicyError) as caught:
        policy.tighten(PolicyOptions(block_categories=("X9",)))
    assert guard_policy_error(caught.value).field == "guard.block_categories"
    assert guard_policy_error(PolicyError("something else")).message == "guard: something else"
