"""Renders a model's own Jinja chat template, keeping template text and message content apart.

The template comes from the model folder (`tokenizer_config.json` -> `chat_template`) and is rendered the
way Hugging Face `apply_chat_template` renders it: an `ImmutableSandboxedEnvironment` with
`trim_blocks` / `lstrip_blocks`, `raise_exception`, `strftime_now`, a `tojson` filter and the variables
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`.

`render_segments` returns the prompt as `Segment`s: template text is trusted (its special tokens, such as
`<|im_start|>`, become control tokens) while message content is untrusted (the tokenizer encodes it as
plain text, so a user who types `<|im_start|>` cannot forge a turn).

How content is kept apart: each message's content is replaced by a unique random sentinel, the template
is rendered, and the output is split on the sentinels; every sentinel must appear exactly once.

Templates that transform content: Llama 3.x writes `message['content'] | trim`, which a sentinel cannot
see (it has no surrounding whitespace). At construction a probe renders each role with whitespace-padded
sentinels; a role whose padding disappears is marked as trimmed, and its content is `.strip()`ped (what
Jinja's `trim` does) before it is put back. Probing was chosen over grepping the source for `| trim`
because templates spell it many ways (`|trim`, `.strip()`, via a `set` variable) and a probe sees the
behaviour, not the spelling. As a safety net every `render_segments` call checks that the joined
segments equal a plain render of the real messages, and raises if a template transformed content in any
other way (a silent mismatch would mean the model sees a prompt that differs from what was judged).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from guard.moderator import Message
from service.text.tokenizer import Segment

DEFAULT_ROLES: tuple[str, ...] = ("system", "user", "assistant")

# Whitespace put around probe sentinels: a role whose rendered content loses it is a trimming role.
_PROBE_PAD = " \n\t"
# Sentinel delimiters from the Private Use Area: never produced by templates, and no whitespace in them
# for `trim` to remove. The random nonce between them is what guarantees uniqueness.
_OPEN, _CLOSE = "\ue000", "\ue001"
_NONCE_BYTES = 12


class ChatTemplateError(ValueError):
    """The template refused the conversation (its `raise_exception`), e.g. roles out of order."""


class _TemplateRaised(jinja2.TemplateError):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Same signature and defaults as transformers' chat-template `tojson` (not Jinja's HTML-safe one).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env


class ChatTemplate:
    """One model's chat template, compiled once; rendering is thread-safe."""

    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        roles: Sequence[str] = DEFAULT_ROLES,
        clock: Callable[[], datetime] = datetime.now,
    ) -> None:
        """Compile the template and probe which roles it accepts and which it trims.

        Args:
            source: the Jinja source (`tokenizer_config.json` -> `chat_template`).
            bos_token: text of the BOS token, exposed to the template as `bos_token`.
            eos_token: text of the EOS token, exposed as `eos_token`.
            roles: roles to offer; those the template rejects, drops or rewrites are removed.
            clock: source of "now" for `strftime_now` (Llama 3.x prints today's date).

        Raises:
            ValueError: the source does not compile, or the template cannot render a user turn (with
                content it keeps as is or trims).
        """
        try:
            self._template = _make_environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"chat template does not compile: {exc.message} (line {exc.lineno})") from exc
        self._bos = bos_token
        self._eos = eos_token
        self._clock = clock
        self._roles: tuple[str, ...] = ()
        self._trims: frozenset[str] = frozenset()
        probed = {role: self._probe(role) for role in dict.fromkeys(roles)}
        self._roles = tuple(role for role, trims in probed.items() if trims is not None)
        self._trims = frozenset(role for role, trims in probed.items() if trims)
        # Roles whose content the template rewrites beyond trimming (e.g. Llama 3.x JSON-encodes `tool`
        # content) cannot be split into untrusted segments: they are not offered.
        self._roles = tuple(role for role in self._roles if self._round_trips(role))
        self._trims = self._trims & frozenset(self._roles)
        if "user" not in self._roles:
            raise ValueError("chat template cannot render a conversation with a user message")

    @classmethod
    def from_tokenizer_config(
        cls,
        config: Mapping[str, object],
        *,
        roles: Sequence[str] = DEFAULT_ROLES,
        clock: Callable[[], datetime] = datetime.now,
    ) -> ChatTemplate:
        """Build from a parsed `tokenizer_config.json`.

        Args:
            config: the parsed JSON; `chat_template` is a string or a list of {"name", "template"}
                (then "default" is used); `bos_token` / `eos_token` are strings or {"content": ...}.
            roles: as for the constructor.
            clock: as for the constructor.

        Returns:
            The compiled template.
        """
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str):
            raise ValueError("tokenizer_config.json has no usable chat_template")
        return cls(
            source,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            roles=roles,
            clock=clock,
        )

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles this template accepts, in the configured order."""
        return self._roles

    @property
    def trimmed_roles(self) -> frozenset[str]:
        """Roles whose content the template strips of surrounding whitespace."""
        return self._trims

    def render_text(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Render the prompt as one string, exactly as `apply_chat_template(tokenize=False)` would.

        For debugging and tests: the engine must use `render_segments`, which keeps content untrusted.

        Args:
            messages: the conversation.
            add_generation_prompt: append the header of the assistant's next turn.

        Returns:
            The rendered prompt.
        """
        self._validate(messages)
        contents = [m.content for m in messages]
        return self._render([m.role for m in messages], contents, add_generation_prompt, self._clock())

    def render_segments(
        self, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> list[Segment]:
        """Render the prompt as trusted template text and untrusted message content.

        Args:
            messages: the conversation; roles must be in `roles`.
            add_generation_prompt: append the header of the assistant's next turn.

        Returns:
            Non-empty segments in prompt order; joined, they equal `render_text(messages)`.

        Raises:
            ValueError: an unknown role, an empty conversation, or the template refused it
                (`ChatTemplateError`).
            RuntimeError: the template dropped, duplicated or rewrote content (a template problem).
        """
        self._validate(messages)
        roles = [m.role for m in messages]
        now = self._clock()  # one "now" for both renders, so a date in the template cannot differ
        nonce = _fresh_nonce(messages)
        sentinels = [_sentinel(nonce, i) for i in range(len(messages))]
        parts = _split(self._render(roles, sentinels, add_generation_prompt, now), nonce, len(messages))
        segments: list[Segment] = []
        for part in parts:
            if isinstance(part, str):
                if part:
                    segments.append(Segment(part, True))
                continue
            content = messages[part].content
            if roles[part] in self._trims:
                content = content.strip()
            if content:
                segments.append(Segment(content, False))
        expected = self._render(roles, [m.content for m in messages], add_generation_prompt, now)
        if "".join(s.text for s in segments) != expected:
            raise RuntimeError("chat template rewrites message content; segments would not match the prompt")
        return segments

    def _validate(self, messages: Sequence[Message]) -> None:
        if not messages:
            raise ValueError("messages must not be empty")
        for i, m in enumerate(messages):
            if m.role not in self._roles:
                raise ValueError(
                    f"messages[{i}].role must be one of {', '.join(self._roles)}, got {m.role!r}"
                )

    def _render(
        self, roles: Sequence[str], contents: Sequence[str], add_generation_prompt: bool, now: datetime
    ) -> str:
        msgs = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
        try:
            return self._template.render(
                messages=msgs,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
                strftime_now=now.strftime,
            )
        except _TemplateRaised as exc:
            raise ChatTemplateError(f"chat template rejected the conversation: {exc.message}") from exc

    def _probe(self, role: str) -> bool | None:
        """Render a small conversation featuring `role`.

        Returns:
            None if the template rejects or drops the role, else whether it trims that role's content.
        """
        roles = _probe_roles(role)
        nonce = secrets.token_hex(_NONCE_BYTES)
        padded = [_PROBE_PAD + _sentinel(nonce, i) + _PROBE_PAD for i in range(len(roles))]
        try:
            out = self._render(roles, padded, True, self._clock())
        except (ChatTemplateError, jinja2.TemplateError):
            return None
        mine = roles.index(role)
        if out.count(_sentinel(nonce, mine)) != 1:
            return None
        return padded[mine] not in out

    def _round_trips(self, role: str) -> bool:
        """Whether segments of a probe conversation featuring `role` join up to the plain render."""
        probe = [
            Message(r, f"{_PROBE_PAD}probe {i}:{_PROBE_PAD}inner{_PROBE_PAD}")
            for i, r in enumerate(_probe_roles(role))
        ]
        try:
            self.render_segments(probe)
        except (RuntimeError, ValueError):
            return False
        return True


def _probe_roles(role: str) -> list[str]:
    # The shortest conversation most templates accept with `role` in it: system only first, an
    # assistant turn after a user turn, any other role (tool, ipython) after a user turn.
    if role == "user":
        return ["user"]
    if role == "system":
        return ["system", "user"]
    return ["user", role]


def _token_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return ""


def _fresh_nonce(messages: Sequence[Message]) -> str:
    while True:  # a collision with content needs 96 random bits to be guessed; the loop is a formality
        nonce = secrets.token_hex(_NONCE_BYTES)
        if not any(nonce in m.content for m in messages):
            return nonce


def _sentinel(nonce: str, index: int) -> str:
    return f"{_OPEN}{nonce}:{index}{_CLOSE}"


def _split(rendered: str, nonce: str, count: int) -> list[str | int]:
    """Split the render into template text (str) and message indices (int), checking each once."""
    pieces = re.split(f"{_OPEN}{nonce}:([0-9]+){_CLOSE}", rendered)
    parts: list[str | int] = []
    seen: list[int] = []
    for j, piece in enumerate(pieces):
        if j % 2 == 0:
            parts.append(piece)
        else:
            seen.append(int(piece))
            parts.append(int(piece))
    if sorted(seen) != list(range(count)):
        raise RuntimeError(
            f"chat template must render each message's content exactly once; rendered {len(seen)} "
            f"of {count} contents"
        )
    return parts
