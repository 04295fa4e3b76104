"""Checks on a whole `Config` that no single setting's bounds can express, and the auth token's resolution.

`service.config.load_config` runs them after every setting was read and bounds-checked, and reports their
problems together with the others in one ConfigError.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from service import config_sources as sources
from service.config import Config, GuardBackend
from service.config_sources import Secret

# Bearer tokens shorter than this are guessable.
MIN_TOKEN_CHARS: Final = 16


def cross_field_problems(c: Config) -> list[str]:
    """Problems between settings that each passed their own bounds (TLS pairs, guard cascade band...)."""
    s, problems = c.security, []
    if (s.tls_cert is None) != (s.tls_key is None):
        problems.append("security.tls_cert and security.tls_key must be set together")
    if s.tls_client_ca is not None and s.tls_cert is None:
        problems.append("security.tls_client_ca requires security.tls_cert and security.tls_key")
    if s.auth_token is not None and s.auth_token_file is not None:
        problems.append("security.auth_token and security.auth_token_file must not both be set")
    if (c.guard.output_encoder is None) != (c.guard.output_head is None):
        problems.append("guard.output_encoder and guard.output_head are set together or not at all")
    if c.guard.backend in (GuardBackend.LLAMA_GUARD, GuardBackend.CASCADE) and c.guard.model is None:
        problems.append(f"guard.model is required when guard.backend is {c.guard.backend.value}")
    g = c.guard
    if g.backend is GuardBackend.CASCADE and not (
        g.cascade_low <= min(g.input_threshold, g.output_threshold)
        and max(g.input_threshold, g.output_threshold) <= g.cascade_high
    ):
        # Otherwise the classifier alone would decide scores it is not confident about.
        problems.append(
            "guard.cascade_low <= guard.input_threshold, guard.output_threshold <= guard.cascade_high "
            "must hold"
        )
    if c.engine.default_max_new_tokens > c.engine.max_new_tokens_cap:
        problems.append(
            f"engine.default_max_new_tokens must be <= engine.max_new_tokens_cap "
            f"({c.engine.max_new_tokens_cap}), got {c.engine.default_max_new_tokens}"
        )
    if c.metrics.enabled and c.metrics.port != 0 and c.metrics.port == c.server.port:
        problems.append(f"metrics.port must differ from server.port, both are {c.server.port}")
    problems.extend(sources.category_problems(c.guard.excluded_categories))
    return problems


def resolve_token(config: Config) -> tuple[Config, list[str]]:
    """Read security.auth_token_file into security.auth_token and check the token's form."""
    security = config.security
    token = security.auth_token
    if security.auth_token_file is not None:
        try:
            token = Secret(security.auth_token_file.read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError) as err:
            return config, [f"security.auth_token_file cannot be read: {err.__class__.__name__}: {err}"]
    if token is None:
        return config, []
    value = token.reveal()
    if len(value) < MIN_TOKEN_CHARS:
        problem = f"must be at least {MIN_TOKEN_CHARS} characters, got {len(value)}"
        return config, [f"security.auth_token {problem}"]
    # It travels in an HTTP/2 header: visible ASCII only.
    if not all("!" <= ch <= "~" for ch in value):
        return config, ["security.auth_token must be visible ASCII characters without spaces"]
    return replace(config, security=replace(security, auth_token=token)), []
