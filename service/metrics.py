"""Prometheus metrics (filled in by the observability work; this keeps the seam)."""

from __future__ import annotations

from service.config import Config
from service.stats import NullSink, StatsSink


def start_metrics(config: Config) -> StatsSink:
    return NullSink()
