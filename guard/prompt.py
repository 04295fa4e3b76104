"""The Llama Guard 3 prompt and verdict format: pure and strict.

`build_guard_prompt` renders exactly the prompt of Meta's Llama Guard 3 chat template, split into three
parts so that an engine can reuse work and keep user text inert:

- `prefix`: everything before the first turn. It depends only on the role and the categories, so an
  engine prefills it once per (policy, role) and reuses its KV cache.
- `conversation`: the turns, "User: ...\\n\\n" / "Agent: ...\\n\\n". The only untrusted part.
- `suffix`: "<END CONVERSATION>", the closing instructions and the assistant header.

The split points are where Llama 3's pre-tokenizer splits anyway (after "CONVERSATION>\\n\\n" and before
"<END"), so tokenizing the parts separately yields the same ids as tokenizing the whole string.

Hostile content stays inert by two independent means:

1. Text level (here): each turn is stripped (as Meta's template does), its line breaks normalised to
   "\\n", and then a zero-width space (U+200B) is inserted into anything that reads as structure:
   "<|" (every Llama 3 / ChatML special token starts so) becomes "<\\u200b|"; "<BEGIN" / "<END" (any
   case, optional "/" or blanks) become "<\\u200bBEGIN" / "<\\u200bEND"; and a line starting with a
   turn label or a category code ("User:", "agent :", "S1:") gets the zero-width space before its colon.
   So the prompt's structural markers occur exactly once and its turn headers are exactly ours.
2. Token level (the engine, see `guard.backends.llama_guard.GuardLM`): the conversation part is
   encoded as plain text, with special-token matching off.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from guard.moderator import Message, Role
from guard.taxonomy import BUILTIN_CODES, Category, sort_codes

ZWSP = "\u200b"

_HEADER = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
_TASK = (
    "Task: Check if there is unsafe content in '{role}' messages in conversations "
    "according our safety policy with the below categories.\n\n"  # "according our": Meta's wording
)
_BEGIN_CATEGORIES = "<BEGIN UNSAFE CONTENT CATEGORIES>\n"
_END_CATEGORIES = "\n<END UNSAFE CONTENT CATEGORIES>\n\n"
_BEGIN_CONVERSATION = "<BEGIN CONVERSATION>\n\n"
_END_CONVERSATION = "<END CONVERSATION>\n\n"
_INSTRUCTIONS = (
    "Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
    " - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories."
)
_ASSISTANT_TURN = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"

# Every structural marker of the prompt; tests check each occurs exactly once whatever the content.
STRUCTURAL_MARKERS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<BEGIN UNSAFE CONTENT CATEGORIES>",
    "<END UNSAFE CONTENT CATEGORIES>",
    "<BEGIN CONVERSATION>",
    "<END CONVERSATION>",
    "<|eot_id|>",
)

# Message.role -> the label Llama Guard uses for that turn. 'system' turns are not judged (skipped).
TURN_LABELS: dict[str, Role] = {"user": Role.USER, "assistant": Role.AGENT}
_SKIPPED_ROLES = frozenset({"system"})

# Anything a tokenizer or a reader may take for a line break, folded to "\n" before neutralising.
_LINE_BREAK_RE = re.compile(r"\r\n|[\r\v\f\x85\u2028\u2029]")
_MARKER_RE = re.compile(r"<(?=[ \t]*/?[ \t]*(?:BEGIN|END))", re.IGNORECASE)
_LABEL_LINE_RE = re.compile(
    r"^([ \t]*(?:user|agent|[a-z][a-z_]*[0-9]+)[ \t]*)(?=[:\uff1a])", re.IGNORECASE | re.MULTILINE
)


class ConversationError(ValueError):
    """The conversation cannot be judged as asked (a client error, not a backend failure)."""


class VerdictParseError(ValueError):
    """The guard model's answer is not exactly 'safe' or 'unsafe\\n<codes>'."""


@dataclass(frozen=True, slots=True)
class GuardPrompt:
    """A rendered guard prompt; `prefix + conversation + suffix` is the exact Llama Guard 3 text."""

    prefix: str
    conversation: str
    suffix: str

    @property
    def text(self) -> str:
        """The whole prompt."""
        return self.prefix + self.conversation + self.suffix


def neutralize(content: str) -> str:
    """Make one turn's text unable to act as prompt structure (see the module docstring).

    Args:
        content: untrusted message text.

    Returns:
        The stripped text with line breaks normalised and structural look-alikes broken by U+200B.
    """
    text = _LINE_BREAK_RE.sub("\n", content).strip()
    text = text.replace("<|", "<" + ZWSP + "|")
    text = _MARKER_RE.sub("<" + ZWSP, text)
    return _LABEL_LINE_RE.sub(lambda m: m.group(1) + ZWSP, text)


def render_categories(categories: Sequence[Category]) -> str:
    """The lines between the category markers: "S1: Violent Crimes." (+ description lines if any).

    Args:
        categories: the categories in prompt order.

    Returns:
        The lines joined by "\\n", without a trailing newline.
    """
    lines = []
    for cat in categories:
        line = f"{cat.code}: {cat.name}."
        lines.append(f"{line}\n{cat.description}" if cat.description else line)
    return "\n".join(lines)


def judged_turns(conversation: Sequence[Message], role: Role) -> tuple[Message, ...]:
    """Validate a conversation for judging `role` and drop the turns the guard never sees.

    Args:
        conversation: the turns, oldest first.
        role: whose last message is judged.

    Returns:
        The user/assistant turns, in order; the last one belongs to `role`.
        Raises ConversationError if a role is unknown, nothing is left, or the last turn is not `role`'s.
    """
    turns = []
    for message in conversation:
        if message.role in _SKIPPED_ROLES:
            continue
        if message.role not in TURN_LABELS:
            raise ConversationError(
                f"message role must be 'user', 'assistant' or 'system', got {message.role!r}"
            )
        turns.append(message)
    if not turns:
        raise ConversationError("conversation must contain at least one user or assistant turn")
    last = TURN_LABELS[turns[-1].role]
    if last is not role:
        raise ConversationError(f"the last turn must be the judged role's ({role.value}), got {last.value}")
    return tuple(turns)


def build_guard_prompt(
    conversation: Sequence[Message], role: Role, categories: Sequence[Category]
) -> GuardPrompt:
    """Render the Llama Guard 3 prompt judging the last message of `role`.

    Args:
        conversation: the turns, oldest first; 'system' turns are skipped.
        role: Role.USER to judge the user's last message, Role.AGENT to judge the model's answer.
        categories: the categories listed in the prompt (a policy's active ones), in order.

    Returns:
        The prompt in three parts (see `GuardPrompt`). Raises ConversationError as `judged_turns` does,
        and ValueError for an empty category list.
    """
    if not categories:
        raise ValueError("a guard prompt needs at least one category")
    turns = judged_turns(conversation, role)
    prefix = (
        _HEADER
        + _TASK.format(role=role.value)
        + _BEGIN_CATEGORIES
        + render_categories(categories)
        + _END_CATEGORIES
        + _BEGIN_CONVERSATION
    )
    body = "".join(f"{TURN_LABELS[t.role].value}: {neutralize(t.content)}\n\n" for t in turns)
    suffix = _END_CONVERSATION + _INSTRUCTIONS.format(role=role.value) + _ASSISTANT_TURN
    return GuardPrompt(prefix=prefix, conversation=body, suffix=suffix)


def parse_verdict(text: str, known_codes: Collection[str] = BUILTIN_CODES) -> tuple[bool, tuple[str, ...]]:
    """Parse the guard model's answer, strictly.

    Accepted: "safe", or "unsafe" + "\\n" + codes joined by "," with no blanks (e.g. "unsafe\\nS1,S10"),
    each code in `known_codes`, no duplicates. Surrounding ASCII whitespace (" \\t\\r\\n") is ignored
    because Llama Guard 3 prefixes "\\n\\n" when the prompt lacks the blank line after the assistant
    header, and engines may keep a trailing newline; nothing else is tolerated (no inner blanks, no
    "\\r\\n", no third line, no special tokens: decode the answer without them).

    Args:
        text: the generated answer.
        known_codes: codes the answer may name (a policy's known codes: built-in and custom, including
            excluded ones, which the policy then ignores).

    Returns:
        (safe, codes): (True, ()) or (False, codes in natural order).
        Raises VerdictParseError otherwise; its message never quotes the text (it may echo user input).
    """
    lines = text.strip(" \t\r\n").split("\n")
    if lines == ["safe"]:
        return True, ()
    if lines[0] == "safe":
        raise VerdictParseError("'safe' must be the only line of the verdict")
    if lines[0] != "unsafe":
        raise VerdictParseError(f"first line must be 'safe' or 'unsafe' ({len(text)} chars)")
    if len(lines) != 2:
        raise VerdictParseError(
            f"'unsafe' must be followed by exactly one line of codes, got {len(lines) - 1}"
        )
    codes = lines[1].split(",")
    unknown = [c for c in codes if c not in known_codes]
    if unknown:
        raise VerdictParseError(f"{len(unknown)} unknown category code(s) in the verdict")
    if len(set(codes)) != len(codes):
        raise VerdictParseError("duplicate category codes in the verdict")
    return False, sort_codes(codes)
