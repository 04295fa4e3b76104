"""Logging setup from config (stdlib logging)."""

from __future__ import annotations

import logging

from service.config import LogConfig


def setup_logging(cfg: LogConfig) -> None:
    logging.basicConfig(level=cfg.level.value.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
