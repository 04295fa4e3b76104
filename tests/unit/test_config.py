"""Config: precedence (CLI > env > TOML > defaults), validation messages, typos, schema and --help."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from guard.policy import (
    DEFAULT_FIRST_RELEASE_WINDOW_TOKENS,
    DEFAULT_OUTPUT_CONTEXT_CHARS,
    DEFAULT_RELEASE_WINDOW_TOKENS,
)
from service.config import (
    Config,
    ConfigError,
    GuardBackend,
    LogLevel,
    Secret,
    build_arg_parser,
    config_schema,
    load_config,
)

TOKEN = "abcdefghijklmnop-0123"


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sluice.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(argv: list[str], env: dict[str, str], toml: Path | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        load_config(argv, env, toml)
    return caught.value.problems


def test_defaults_from_the_issue() -> None:
    config = load_config([], {})
    assert config == Config()
    assert (config.server.host, config.server.port, config.metrics.port) == ("127.0.0.1", 50051, 9400)
    assert config.engine.max_slots == 8 and config.engine.max_queue == 64
    assert config.engine.prefill_chunk == 256 and config.engine.max_context == 0
    assert config.server.grace_seconds == 10.0
    assert config.server.max_receive_message_bytes == 4 * 1024 * 1024
    assert config.guard.backend is GuardBackend.CLASSIFIER and config.guard.fail_open is False
    assert config.guard.release_window_tokens == DEFAULT_RELEASE_WINDOW_TOKENS  # guard.policy's default
    assert config.guard.first_release_window_tokens == DEFAULT_FIRST_RELEASE_WINDOW_TOKENS
    assert config.guard.output_context_chars == DEFAULT_OUTPUT_CONTEXT_CHARS
    assert config.guard.input_threshold == config.guard.output_threshold == 0.5
    assert config.log.text is False and config.server.reflection is True


def test_precedence_cli_over_env_over_toml_over_default(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, "[engine]\nmax_slots = 2\nmax_queue = 3\nprefill_chunk = 4\n")
    env = {"SLUICE_MAX_SLOTS": "20", "SLUICE_MAX_QUEUE": "30"}
    config = load_config(["--max-slots", "200"], env, toml)
    assert config.engine.max_slots == 200  # CLI
    assert config.engine.max_queue == 30  # env beats TOML
    assert config.engine.prefill_chunk == 4  # TOML beats default
    assert config.engine.max_new_tokens_cap == 2048  # default


def test_config_file_from_flag_or_env_beats_argument(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[server]\nport = 1111\n")
    (tmp_path / "b.toml").write_text("[server]\nport = 2222\n")
    (tmp_path / "c.toml").write_text("[server]\nport = 3333\n")
    env = {"SLUICE_CONFIG": str(tmp_path / "b.toml")}
    assert load_config(["--config", str(tmp_path / "a.toml")], env, tmp_path / "c.toml").server.port == 1111
    assert load_config([], env, tmp_path / "c.toml").server.port == 2222
    assert load_config([], {}, tmp_path / "c.toml").server.port == 3333


def test_types_from_each_source(tmp_path: Path) -> None:
    toml = write_toml(
        tmp_path,
        '[guard]\nbackend = "cascade"\nmodel = "guard-model"\nexcluded_categories = ["S6", "S8"]\n'
        "input_threshold = 1\ncascade_high = 1\n[log]\ntext = true\n",
    )
    config = load_config(
        ["--no-reflection", "--log-level", "DEBUG"], {"SLUICE_GUARD_FAIL_OPEN": "yes"}, toml
    )
    assert config.guard.backend is GuardBackend.CASCADE
    assert config.guard.model == tmp_path / "guard-model"  # relative to the TOML file
    assert config.guard.excluded_categories == ("S6", "S8")
    assert config.guard.input_threshold == 1.0 and isinstance(config.guard.input_threshold, float)
    assert config.guard.fail_open is True
    assert config.log.text is True and config.log.level is LogLevel.DEBUG
    assert config.server.reflection is False
    env_list = load_config([], {"SLUICE_GUARD_EXCLUDED_CATEGORIES": " S1, S2 ,"})
    assert env_list.guard.excluded_categories == ("S1", "S2")


def test_config_is_frozen() -> None:
    config = load_config([], {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.engine.max_slots = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--max-slots", "0"], {}, "engine.max_slots must be >= 1, got 0 (from --max-slots)"),
        ([], {"SLUICE_PORT": "70000"}, "server.port must be in [0, 65535], got 70000 (from SLUICE_PORT)"),
        (
            ["--guard-output-threshold", "1.5"],
            {},
            "guard.output_threshold must be in [0, 1], got 1.5 (from --guard-output-threshold)",
        ),
        ([], {"SLUICE_GRACE_SECONDS": "nan"}, "server.grace_seconds must be a finite number, got nan"),
        ([], {"SLUICE_MAX_SLOTS": "eight"}, "engine.max_slots must be an integer, got 'eight'"),
        ([], {"SLUICE_LOG_TEXT": "maybe"}, "log.text must be a boolean (true/false/1/0/yes/no/on/off)"),
        ([], {"SLUICE_GUARD_BACKEND": "llama"}, "guard.backend must be one of classifier, llama_guard,"),
        ([], {"SLUICE_MODEL": ""}, "engine.model must not be empty"),
    ],
)
def test_bad_values_name_key_range_and_source(argv: list[str], env: dict[str, str], expected: str) -> None:
    problems = problems_of(argv, env)
    assert len(problems) == 1
    assert problems[0].startswith(expected)


def test_every_problem_is_reported_at_once() -> None:
    problems = problems_of(["--max-slots", "0"], {"SLUICE_MAX_QUEUE": "-1", "SLUICE_PORT": "x"})
    assert len(problems) == 3
    assert any(p.startswith("engine.max_slots must be >= 1, got 0") for p in problems)
    assert any(p.startswith("engine.max_queue must be >= 0, got -1") for p in problems)
    assert any(p.startswith("server.port must be an integer, got 'x'") for p in problems)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SLUICE_MAX_SLOT": "3"}, "variable SLUICE_MAX_SLOT (did you mean SLUICE_MAX_SLOTS?)"),
        ({"SLUICE_SERVICE_HOST": "10.0.0.7"}, "enableServiceLinks: false"),
        ({"SLUICE_PORT": "tcp://10.0.0.7:50051"}, "enableServiceLinks: false"),
    ],
)
def test_unknown_or_kubernetes_env_vars_fail(env: dict[str, str], expected: str) -> None:
    (problem,) = problems_of([], env)
    assert expected in problem


def test_unrelated_and_test_harness_env_vars_are_ignored() -> None:
    env = {"HOME": "/root", "SLUICEBOX": "1", "SLUICE_TEST_MODELS": "/models", "PORT": "1"}
    assert load_config([], env) == Config()


def test_unknown_toml_key_and_section_fail(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, "[engine]\nmax_slot = 2\n[gaurd]\nbackend = 'none'\n")
    problems = problems_of([], {}, toml)
    assert any("unknown key engine.max_slot (did you mean engine.max_slots?)" in p for p in problems)
    assert any("unknown section [gaurd] (did you mean guard?)" in p for p in problems)


def test_toml_type_mistakes_fail(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, "[server]\nport = true\nreflection = 1\n[engine]\nmax_slots = '8'\n")
    problems = problems_of([], {}, toml)
    assert len(problems) == 3
    assert any(p.startswith("server.port must be an integer, got True") for p in problems)
    assert any(p.startswith("server.reflection must be a boolean, got 1") for p in problems)
    assert any(p.startswith("engine.max_slots must be an integer, got '8'") for p in problems)


def test_unknown_or_abbreviated_flag_fails() -> None:
    assert "unrecognized arguments: --max-slot" in problems_of(["--max-slot", "3"], {})[0]


def test_cross_field_rules(tmp_path: Path) -> None:
    problems = problems_of(
        ["--tls-cert", "c.pem", "--guard-backend", "llama_guard", "--default-max-new-tokens", "4096"], {}
    )
    assert "security.tls_cert and security.tls_key must be set together" in problems
    assert "guard.model is required when guard.backend is llama_guard" in problems
    cap_rule = "engine.default_max_new_tokens must be <= engine.max_new_tokens_cap (2048), got 4096"
    assert cap_rule in problems
    (problem,) = problems_of(["--guard-output-head", "h.npz"], {})
    assert problem == "guard.output_encoder and guard.output_head are set together or not at all"
    (problem,) = problems_of(["--tls-client-ca", "ca.pem"], {})
    assert problem == "security.tls_client_ca requires security.tls_cert and security.tls_key"
    (problem,) = problems_of(["--metrics-port", "50051"], {})
    assert problem == "metrics.port must differ from server.port, both are 50051"
    cascade = ["--guard-backend", "cascade", "--guard-model", "m", "--guard-cascade-high", "0.4"]
    (problem,) = problems_of(cascade, {})
    assert problem.startswith("guard.cascade_low <= guard.input_threshold, guard.output_threshold <= guard.")
    (problem,) = problems_of([], {"SLUICE_GUARD_EXCLUDED_CATEGORIES": "S6,s7"})
    assert problem == "guard.excluded_categories must hold codes like S6, got 's7'"


def test_auth_token_from_env_or_file_never_shown(tmp_path: Path) -> None:
    config = load_config([], {"SLUICE_AUTH_TOKEN": TOKEN})
    assert config.security.auth_token == Secret(TOKEN)
    assert TOKEN not in repr(config) and TOKEN not in str(config.as_flat_dict())
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    from_file = load_config(["--auth-token-file", str(token_file)], {})
    assert from_file.security.auth_token is not None
    assert from_file.security.auth_token.reveal() == TOKEN  # trailing newline stripped


def test_auth_token_rules(tmp_path: Path) -> None:
    (problem,) = problems_of([], {"SLUICE_AUTH_TOKEN": "short"})
    assert problem == "security.auth_token must be at least 16 characters, got 5"
    (problem,) = problems_of([], {"SLUICE_AUTH_TOKEN": "has a space in the middle"})
    assert problem == "security.auth_token must be visible ASCII characters without spaces"
    (problem,) = problems_of(["--auth-token-file", str(tmp_path / "missing")], {})
    assert problem.startswith("security.auth_token_file cannot be read: FileNotFoundError")
    both = ["--auth-token-file", "x"]
    assert "must not both be set" in problems_of(both, {"SLUICE_AUTH_TOKEN": TOKEN})[0]
    toml = write_toml(tmp_path, f"[security]\nauth_token = '{TOKEN}'\n")
    (problem,) = problems_of([], {}, toml)
    assert "must not be set in a file (a secret): use SLUICE_AUTH_TOKEN" in problem
    assert "--auth-token " not in build_arg_parser().format_help()  # never a flag: `ps` shows flags


def test_schema_lists_every_key_with_unique_env_and_flag() -> None:
    schema = config_schema()
    required = {
        "server.host": "SLUICE_HOST",
        "server.port": "SLUICE_PORT",
        "metrics.port": "SLUICE_METRICS_PORT",
        "engine.model": "SLUICE_MODEL",
        "security.auth_token": "SLUICE_AUTH_TOKEN",
        "engine.max_slots": "SLUICE_MAX_SLOTS",
        "guard.backend": "SLUICE_GUARD_BACKEND",
        "log.text": "SLUICE_LOG_TEXT",
        "server.reflection": "SLUICE_REFLECTION",
    }
    for key, env in required.items():
        assert schema[key].env == env
    envs = [s.env for s in schema.values()]
    flags = [s.flag for s in schema.values() if s.flag]
    assert len(set(envs)) == len(envs) and len(set(flags)) == len(flags)
    config = Config()
    every_field = {
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(config)
        for f in dataclasses.fields(getattr(config, section.name))
    }
    assert set(schema) == every_field
    assert all(s.doc for s in schema.values())
    assert schema["engine.max_slots"].type_name == "int" and schema["engine.max_slots"].default == 8
    assert schema["guard.backend"].type_name == "enum(classifier|llama_guard|cascade|none)"


def test_help_documents_every_setting() -> None:
    text = build_arg_parser().format_help()
    for setting in config_schema().values():
        if setting.flag:
            assert setting.flag in text
            assert setting.env in text
