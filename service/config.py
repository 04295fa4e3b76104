"""The server's configuration: one frozen, typed object, read once at start and passed down.

Sources, highest precedence first: CLI flags > `SLUICE_*` environment variables > TOML file > defaults.
Every setting is a field of one of the section dataclasses below (the guard section's is in
`service.config_guard`); its metadata (`service.config_field.setting_doc`: doc, bounds) generates the
environment name, the CLI flag, `config_schema()` and `sluice serve --help`, so they cannot drift apart.

Naming: the TOML key is `section.name`; the environment variable is `SLUICE_` + NAME for the server, engine
and security sections (SLUICE_HOST, SLUICE_MAX_SLOTS, SLUICE_TLS_CERT) and `SLUICE_<SECTION>_<NAME>` for
guard, metrics and log (SLUICE_GUARD_BACKEND, SLUICE_METRICS_PORT, SLUICE_LOG_LEVEL); the flag is the
environment name without SLUICE_, lower-case with dashes (--max-slots, --guard-backend). SLUICE_CONFIG or
--config names the TOML file; relative paths inside it are relative to the file.

A typo must fail: unknown TOML sections or keys and unknown SLUICE_* variables are errors. Variables under
SLUICE_TEST_ are left to the test harness. Every problem found is reported at once in one ConfigError.
"""

from __future__ import annotations

import argparse
import enum
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Final

from service import config_sources as sources
from service.config_field import setting_doc as _doc
from service.config_guard import GuardBackend as GuardBackend
from service.config_guard import GuardConfig as GuardConfig
from service.config_sources import ConfigError as ConfigError
from service.config_sources import Secret as Secret
from service.errors import range_problem

MIB: Final = 1024 * 1024


class KvDtype(enum.StrEnum):
    AUTO = "auto"  # what the model folder was exported with
    FLOAT32 = "float32"
    FLOAT16 = "float16"


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    # Loopback, so a developer's `sluice serve` is never reachable from the network; containers set 0.0.0.0.
    host: str = field(default="127.0.0.1", metadata=_doc("Address the gRPC server binds."))
    port: int = field(default=50051, metadata=_doc("gRPC port (0 picks a free port).", low=0, high=65535))
    # Below Kubernetes' default terminationGracePeriodSeconds (30 s), so drain ends before the SIGKILL.
    grace_seconds: float = field(
        default=10.0,
        metadata=_doc("After SIGTERM, open streams get this long; the rest end with UNAVAILABLE.", low=0),
    )
    # gRPC's own default. A whole context window of text is far smaller; larger bodies are abuse.
    max_receive_message_bytes: int = field(
        default=4 * MIB, metadata=_doc("Largest accepted request message.", low=1024)
    )
    # A Complete answer at the token cap with 20 top logprobs per token stays around 1 MiB.
    max_send_message_bytes: int = field(default=4 * MIB, metadata=_doc("Largest response message.", low=1024))
    # gRPC's default is 2 h; a minute notices a vanished client of a long stream (its slot is then freed).
    keepalive_time_seconds: float = field(
        default=60.0, metadata=_doc("Ping an idle connection after this long.", low=1)
    )
    keepalive_timeout_seconds: float = field(
        default=20.0, metadata=_doc("Close a connection whose ping is unanswered this long.", low=1)
    )
    # Off, as in gRPC. In Kubernetes set e.g. 300: clients then reconnect and new replicas get load.
    max_connection_age_seconds: float = field(
        default=0.0, metadata=_doc("Send GOAWAY once a connection is this old (0 = never).", low=0)
    )
    # Longer than a long generation (2048 tokens at ~40 tokens/s), so recycling never cuts a stream.
    max_connection_age_grace_seconds: float = field(
        default=60.0, metadata=_doc("After that GOAWAY, open streams get this long to finish.", low=0)
    )
    # The contract is public; reflection lets grpcurl work without the .proto files.
    reflection: bool = field(default=True, metadata=_doc("Serve gRPC server reflection."))


@dataclass(frozen=True, slots=True)
class EngineConfig:
    # Where `make model` writes the default export, so `make run` and a bare `sluice serve` agree.
    model: Path = field(
        default=Path("models/smollm2-135m-instruct-int4"), metadata=_doc("Model folder made by `make model`.")
    )
    intra_op_threads: int = field(
        default=0, metadata=_doc("onnxruntime intra-op threads (0 = one per physical core).", low=0)
    )
    # On CPU a decode step of the 135M model costs little more for 8 sequences than for 1; beyond that the
    # per-token latency of every stream grows about linearly.
    max_slots: int = field(
        default=8, metadata=_doc("Sequences decoded together (batch size); bounds KV memory.", low=1)
    )
    # Waiting behind more than 8 full batches means minutes: reject fast (RESOURCE_EXHAUSTED) instead.
    max_queue: int = field(
        default=64, metadata=_doc("Requests waiting for a slot; more get RESOURCE_EXHAUSTED.", low=0)
    )
    max_context: int = field(
        default=0, metadata=_doc("Context window served, in tokens (0 = the model's own).", low=0)
    )
    # Bounds one engine step, so a long prompt's prefill cannot stall every decoding stream for long.
    prefill_chunk: int = field(default=256, metadata=_doc("Prompt tokens prefilled per engine step.", low=1))
    # The engine's own GenerationRequest default.
    default_max_new_tokens: int = field(
        default=256, metadata=_doc("max_new_tokens when a request leaves it unset.", low=1)
    )
    max_new_tokens_cap: int = field(
        default=2048, metadata=_doc("Largest max_new_tokens a request may ask for.", low=1)
    )
    kv_dtype: KvDtype = field(
        default=KvDtype.AUTO, metadata=_doc("KV cache element type (auto = the model export's).")
    )


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = field(default=True, metadata=_doc("Serve Prometheus metrics over HTTP."))
    # Loopback for the same reason as server.host; Kubernetes sets 0.0.0.0 so Prometheus can scrape.
    host: str = field(default="127.0.0.1", metadata=_doc("Address the metrics endpoint binds."))
    # Clear of the gRPC port and of the usual exporters' ports.
    port: int = field(default=9400, metadata=_doc("Metrics port (0 picks a free port).", low=0, high=65535))


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: LogLevel = field(default=LogLevel.INFO, metadata=_doc("Log level."))
    format: LogFormat = field(default=LogFormat.TEXT, metadata=_doc("Log line format (json for collectors)."))
    # Prompts are user data: off unless someone debugging on their own machine turns it on.
    text: bool = field(default=False, metadata=_doc("DEBUG ONLY: allow prompt and output text in logs."))


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    tls_cert: Path | None = field(default=None, metadata=_doc("Server certificate chain (PEM); enables TLS."))
    tls_key: Path | None = field(default=None, metadata=_doc("Server private key (PEM)."))
    tls_client_ca: Path | None = field(
        default=None, metadata=_doc("CA bundle (PEM) for client certificates; enables mutual TLS.")
    )
    auth_token_file: Path | None = field(
        default=None, metadata=_doc("File holding the bearer token clients must send.")
    )
    auth_token: Secret | None = field(
        default=None, metadata=_doc("Bearer token clients must send (environment only).", env_only=True)
    )


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def as_flat_dict(self) -> dict[str, object]:
        """Every setting as `{"section.name": value}`, safe to log (secrets show as '***')."""
        return {s.key: getattr(getattr(self, s.section), s.name) for s in config_schema().values()}


SECTIONS: Final[Mapping[str, type]] = {
    "server": ServerConfig,
    "engine": EngineConfig,
    "guard": GuardConfig,
    "metrics": MetricsConfig,
    "log": LogConfig,
    "security": SecurityConfig,
}
_ENV_SECTION_PREFIX: Final = {"guard": "GUARD_", "metrics": "METRICS_", "log": "LOG_"}


@dataclass(frozen=True, slots=True)
class Setting:
    """One configuration key, as listed by `config_schema()`."""

    key: str  # "engine.max_slots"
    section: str
    name: str
    type_name: str  # "int", "float", "bool", "str", "path", "path?", "secret?", "list[str]", "enum(a|b)"
    default: object
    doc: str
    env: str  # "SLUICE_MAX_SLOTS"
    flag: str | None  # "--max-slots"; None for env-only settings
    kind: type | None
    low: float | None
    high: float | None
    low_open: bool


def config_schema() -> dict[str, Setting]:
    """Every configuration key with its type, default, doc, environment variable and flag.

    Returns:
        `{"section.name": Setting}` in declaration order.
    """
    out: dict[str, Setting] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            meta = f.metadata
            env_name = f"{_ENV_SECTION_PREFIX.get(section, '')}{f.name}".upper()
            kind, type_name = sources.classify(hints[f.name])
            out[f"{section}.{f.name}"] = Setting(
                key=f"{section}.{f.name}",
                section=section,
                name=f.name,
                type_name=type_name,
                default=f.default,
                doc=meta["doc"],
                env=f"SLUICE_{env_name}",
                flag=None if meta["env_only"] else "--" + env_name.lower().replace("_", "-"),
                kind=kind,
                low=meta["low"],
                high=meta["high"],
                low_open=meta["low_open"],
            )
    return out


_HELP: Final = """Run the Sluice gRPC server.

Every setting can come from, highest precedence first: a flag below, its SLUICE_* environment variable,
the TOML file (--config or SLUICE_CONFIG; keys as [section] name = value), or the default shown.
Unknown TOML keys and unknown SLUICE_* variables are errors. The bearer token is read only from
SLUICE_AUTH_TOKEN or the file named by --auth-token-file, never from a flag."""


def build_arg_parser(prog: str = "sluice serve") -> argparse.ArgumentParser:
    """The `sluice serve` parser, generated from the schema: one flag per setting, each documented.

    Args:
        prog: program name shown in usage.

    Returns:
        A parser whose namespace holds only the flags actually given (argparse.SUPPRESS defaults);
        a bad flag raises ConfigError instead of exiting.
    """
    return sources.build_parser(prog, config_schema(), _HELP)


def load_config(argv: Sequence[str], env: Mapping[str, str], toml_path: Path | None = None) -> Config:
    """Load, merge and validate the configuration (CLI > SLUICE_* env > TOML > defaults).

    Args:
        argv: `sluice serve` arguments (without the program and subcommand). `--help` exits.
        env: the process environment; only SLUICE_* entries are read.
        toml_path: TOML file to read when neither --config nor SLUICE_CONFIG names one.

    Returns:
        The validated, frozen Config.

    Raises:
        ConfigError: listing every problem found.
    """
    from service import config_checks as checks  # it reads the types defined above

    schema = config_schema()
    problems: list[str] = []
    cli = sources.from_cli(build_arg_parser(), argv)
    config_flag = cli.pop("config", None)
    path = (config_flag.value if config_flag else None) or env.get(sources.CONFIG_ENV) or toml_path
    toml = sources.from_toml(schema, Path(str(path)), problems) if path else {}
    values = sources.merge(schema, [cli, sources.from_env(schema, env, problems), toml], problems)
    sections = {
        name: cls(**{s.name: values[s.key][0] for s in schema.values() if s.section == name})
        for name, cls in SECTIONS.items()
    }
    config = Config(**sections)
    problems.extend(sources.check_bounds(schema, values, range_problem))
    problems.extend(checks.cross_field_problems(config))
    if not problems:
        config, token_problems = checks.resolve_token(config)
        problems.extend(token_problems)
    if problems:
        raise ConfigError(problems)
    return config
