"""Reading configuration values from their three sources (CLI flags, SLUICE_* environment, TOML) and
turning them into typed values. `service.config` owns the settings themselves; this module only knows how a
setting's type is spelled in each source. Every problem is collected, never raised one at a time, so a
misconfigured deployment learns everything that is wrong from one start.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

from guard.taxonomy import CODE_RE

if TYPE_CHECKING:
    from service.config import Setting

ENV_PREFIX: Final = "SLUICE_"
CONFIG_ENV: Final = "SLUICE_CONFIG"
# Reserved for test harnesses (e.g. SLUICE_TEST_MODELS); never configuration.
IGNORED_ENV_PREFIX: Final = "SLUICE_TEST_"
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
# A Kubernetes Service named "sluice" makes the kubelet inject SLUICE_PORT=tcp://10.0.0.7:50051,
# SLUICE_SERVICE_HOST and friends into every pod of the namespace, which collide with our names.
_K8S_HINT: Final = (
    "; this looks like a Kubernetes service link: set enableServiceLinks: false in the pod spec"
)


class ConfigError(ValueError):
    """Invalid configuration. `problems` lists every problem; str() joins them, one per line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


class Secret:
    """A string that never shows in repr/str (configs get logged). `reveal()` returns the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret value. Compare it with `hmac.compare_digest`, never `==`.

        Returns:
            The value.
        """
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Raw:
    """A value as found, before parsing: where from (for messages) and, for TOML, the file's folder."""

    value: object
    origin: str  # "--max-slots", "SLUICE_MAX_SLOTS", "config.toml", "default"
    base_dir: Path | None = None


class _Problem(Exception):
    """One bad value; collected by the caller."""


def classify(annotation: Any) -> tuple[type, str]:
    """Map a field annotation to (the type values are parsed into, its schema type name).

    Args:
        annotation: a resolved annotation such as `int`, `Path | None`, `tuple[str, ...]`, an enum class.

    Returns:
        e.g. (int, "int"), (Path, "path?"), (tuple, "list[str]"), (GuardBackend, "enum(classifier|...)").
    """
    optional = ""
    if isinstance(annotation, types.UnionType):
        (annotation,) = (a for a in typing.get_args(annotation) if a is not type(None))
        optional = "?"
    if typing.get_origin(annotation) is tuple:
        return tuple, "list[str]"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation, "enum(" + "|".join(str(m.value) for m in annotation) + ")" + optional
    names = {bool: "bool", int: "int", float: "float", str: "str", Path: "path", Secret: "secret"}
    return annotation, names[annotation] + optional


def parse_text(setting: Setting, text: str) -> object:
    """Parse a string from the environment or the command line.

    Args:
        setting: the target setting.
        text: the raw string.

    Returns:
        The typed value (None for an empty optional path or secret).
    """
    kind = setting.kind
    if setting.type_name.endswith("?") and text == "":
        return None
    if kind is bool:
        word = text.strip().lower()
        if word not in _TRUE | _FALSE:
            raise _Problem(f"must be a boolean (true/false/1/0/yes/no/on/off), got {text!r}")
        return word in _TRUE
    if kind is int or kind is float:
        try:
            return kind(text.strip())
        except ValueError:
            article = "an integer" if kind is int else "a number"
            hint = _K8S_HINT if text.startswith("tcp://") else ""
            raise _Problem(f"must be {article}, got {text!r}{hint}") from None
    if kind is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return _parse_typed(setting, text, None)


def parse_toml(setting: Setting, value: object, base_dir: Path | None) -> object:
    """Check and convert a TOML value (already typed by the TOML parser).

    Args:
        setting: the target setting.
        value: the TOML value.
        base_dir: the TOML file's folder; relative paths are resolved against it.

    Returns:
        The typed value.
    """
    kind = setting.kind
    if kind is Secret:
        raise _Problem(f"must not be set in a file (a secret): use {setting.env} or security.auth_token_file")
    # bool is a subclass of int in Python, but `port = true` is a typo, not 1.
    if kind is bool or kind is int:
        if type(value) is not kind:
            raise _Problem(f"must be {'a boolean' if kind is bool else 'an integer'}, got {value!r}")
        return value
    if kind is float:
        if type(value) not in (int, float):
            raise _Problem(f"must be a number, got {value!r}")
        return float(typing.cast(float, value))
    if kind is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _Problem(f"must be an array of strings, got {value!r}")
        return tuple(value)
    if not isinstance(value, str):
        raise _Problem(f"must be a string, got {value!r}")
    return _parse_typed(setting, value, base_dir)


def _parse_typed(setting: Setting, text: str, base_dir: Path | None) -> object:
    kind = setting.kind
    if kind is Path:
        if not text:
            raise _Problem("must not be empty")
        path = Path(text).expanduser()
        return base_dir / path if base_dir is not None and not path.is_absolute() else path
    if kind is Secret:
        return Secret(text)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(text.strip().lower())
        except ValueError:
            allowed = ", ".join(str(m.value) for m in kind)
            raise _Problem(f"must be one of {allowed}, got {text!r}") from None
    return text


def from_env(schema: Mapping[str, Setting], env: Mapping[str, str], problems: list[str]) -> dict[str, Raw]:
    """The SLUICE_* variables, by setting key; unknown SLUICE_* names are problems.

    Args:
        schema: every setting.
        env: the process environment.
        problems: collects problems.

    Returns:
        `{key: Raw}` for the variables that are set.
    """
    by_env = {s.env: s for s in schema.values()}
    out: dict[str, Raw] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV or name.startswith(IGNORED_ENV_PREFIX):
            continue
        setting = by_env.get(name)
        if setting is None:
            problems.append(f"unknown environment variable {name}{_suggest(name, [*by_env, CONFIG_ENV])}")
        else:
            out[setting.key] = Raw(env[name], name)
    return out


def from_toml(schema: Mapping[str, Setting], path: Path, problems: list[str]) -> dict[str, Raw]:
    """The settings in a TOML file, by key; unknown sections and keys are problems.

    Args:
        schema: every setting.
        path: the TOML file.
        problems: collects problems.

    Returns:
        `{key: Raw}` for the keys present.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        problems.append(f"config file {path}: {err}")
        return {}
    sections = sorted({s.section for s in schema.values()})
    out: dict[str, Raw] = {}
    for section, table in data.items():
        if section not in sections or not isinstance(table, dict):
            problems.append(f"{path}: unknown section [{section}]{_suggest(section, sections)}")
            continue
        for name, value in table.items():
            key = f"{section}.{name}"
            if key not in schema:
                problems.append(f"{path}: unknown key {key}{_suggest(key, list(schema))}")
                continue
            out[key] = Raw(value, str(path), path.parent)
    return out


def from_cli(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, Raw]:
    """The flags actually given, by setting key (plus "config" for --config).

    Args:
        parser: from `build_parser`.
        argv: the arguments.

    Returns:
        `{key: Raw}`.
    """
    namespace = parser.parse_args(list(argv))
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    return {key: Raw(value, flags.get(key, key)) for key, value in vars(namespace).items()}


def merge(
    schema: Mapping[str, Setting], layers: Sequence[Mapping[str, Raw]], problems: list[str]
) -> dict[str, tuple[object, str]]:
    """Pick each setting from the first layer that has it, parse it, and fall back to the default.

    Args:
        schema: every setting.
        layers: highest precedence first (CLI, env, TOML).
        problems: collects problems (the default stands in for a bad value so loading can go on).

    Returns:
        `{key: (typed value, origin)}` for every setting.
    """
    out: dict[str, tuple[object, str]] = {}
    for key, setting in schema.items():
        raw = next((layer[key] for layer in layers if key in layer), None)
        if raw is None:
            out[key] = (setting.default, "default")
            continue
        try:
            if raw.base_dir is not None:
                value = parse_toml(setting, raw.value, raw.base_dir)
            elif isinstance(raw.value, str):
                value = parse_text(setting, raw.value)
            else:
                value = raw.value  # a BooleanOptionalAction flag: already a bool
        except _Problem as problem:
            problems.append(f"{key} {problem} (from {raw.origin})")
            value = setting.default
        out[key] = (value, raw.origin)
    return out


def check_bounds(
    schema: Mapping[str, Setting],
    values: Mapping[str, tuple[object, str]],
    range_problem: Callable[..., str | None],
) -> list[str]:
    """Check every numeric setting against its bounds.

    Args:
        schema: every setting.
        values: from `merge`.
        range_problem: `service.errors.range_problem`.

    Returns:
        Messages such as "engine.max_slots must be >= 1, got 0 (from SLUICE_MAX_SLOTS)".
    """
    problems = []
    for key, setting in schema.items():
        value, origin = values[key]
        if setting.kind not in (int, float) or not isinstance(value, int | float):
            continue
        problem = range_problem(value, setting.low, setting.high, low_open=setting.low_open)
        if problem is not None:
            suffix = "" if origin == "default" else f" (from {origin})"
            problems.append(f"{key} {problem}{suffix}")
    return problems


def category_problems(codes: Iterable[str]) -> list[str]:
    """Syntax check of category codes (which codes exist is the guard's business at start-up).

    Args:
        codes: e.g. ("S6", "S8").

    Returns:
        One message per malformed code.
    """
    return [
        f"guard.excluded_categories must hold codes like S6, got {code!r}"
        for code in codes
        if not CODE_RE.fullmatch(code)
    ]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError([f"{self.prog}: {message}"])


def build_parser(prog: str, schema: Mapping[str, Setting], description: str) -> argparse.ArgumentParser:
    """One flag per setting (env-only ones excluded), grouped by section, each help line naming the
    environment variable, the TOML key and the default.

    Args:
        prog: program name for usage.
        schema: every setting.
        description: shown above the flags.

    Returns:
        The parser; its defaults are SUPPRESS so only given flags reach the namespace.
    """
    parser = _Parser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,  # "--max-slot" must be an error, not a silent abbreviation of --max-slots
    )
    parser.add_argument("--config", metavar="PATH", help=f"TOML config file [env {CONFIG_ENV}]")
    groups: dict[str, Any] = {}
    for setting in schema.values():
        if setting.flag is None:
            continue
        group = groups.setdefault(setting.section, parser.add_argument_group(f"[{setting.section}]"))
        default = "none" if setting.default is None else _show(setting.default)
        help_text = f"{setting.doc} [env {setting.env}; toml {setting.key}; default {default}]"
        help_text = help_text.replace("%", "%%")
        if setting.kind is bool:
            group.add_argument(
                setting.flag, dest=setting.key, action=argparse.BooleanOptionalAction, help=help_text
            )
        else:
            metavar = _METAVARS.get(setting.type_name.rstrip("?"))
            if metavar is None:  # an enum: show the choices
                metavar = "{" + setting.type_name.rstrip("?")[5:-1].replace("|", ",") + "}"
            group.add_argument(setting.flag, dest=setting.key, metavar=metavar, help=help_text)
    return parser


_METAVARS: Final = {"str": "TEXT", "int": "INT", "float": "NUM", "path": "PATH", "list[str]": "A,B,..."}


def _show(value: object) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return ",".join(value) or "(empty)"
    return str(value)


def _suggest(name: str, candidates: Sequence[str]) -> str:
    if name.startswith(("SLUICE_SERVICE_", "SLUICE_PORT_")):
        return _K8S_HINT
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {close[0]}?)" if close else ""
