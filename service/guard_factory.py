"""Builds the configured moderation backend (composition helper for service/app.py)."""

from __future__ import annotations

from guard.moderator import Moderator
from guard.policy import Policy
from service.config import Config, GuardBackend
from service.engine.engine import Engine


def build_moderator(config: Config, policy: Policy, engine: Engine) -> Moderator:
    """The moderator for `config.guard.backend` (not wrapped in FailSafeModerator; the caller does that)."""
    backend = config.guard.backend
    raise ValueError(f"guard.backend {backend.value} is not available in this build")


__all__ = ["GuardBackend", "build_moderator"]
