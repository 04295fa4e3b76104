"""How a configuration setting is declared: every field of the section dataclasses (`service.config`,
`service.config_guard`) carries `setting_doc(...)` as its metadata, which `service.config.config_schema` reads.
"""

from __future__ import annotations

from typing import Any


def setting_doc(
    doc: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    env_only: bool = False,
) -> dict[str, Any]:
    """A setting field's metadata: `doc` feeds --help and config_schema(); numeric bounds are checked at load
    time; `env_only` keeps a secret off the command line (visible in `ps`) and out of files (ConfigMaps)."""
    return {"doc": doc, "low": low, "high": high, "low_open": low_open, "env_only": env_only}
