"""Choosing the guard head's thresholds and calibrating the head so that each maps to a score of 0.5.

The rule (`choose_threshold`) is the lowest threshold within the issue's two false-positive budgets, each
source separately. The shipped head has one threshold for both stages, chosen on all rows. Opt-in
(`train_guard --stage-thresholds`), the same rule runs per stage (`choose_stage_thresholds`): the input
threshold on User turns, the output one on Agent turns, and the head carries the difference (`agent_offset`).
Measured and not shipped (docs/GUARD.md, "Per-stage thresholds"): once Self-Instruct's reference answers no
longer bind the input threshold, it falls until a borderline budget binds, at the target's edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from guard.backends.classifier import Head, shift_logit
from guard.features import FloatArray
from tools.guard_data import Example

# Everyday traffic (instructions, casual queries, requests with personal context): their safe rows (prompts and,
# for Self-Instruct, reference answers) get the ordinary FPR budget. Every other safe source is borderline (rows
# written or collected because they look alarming): its safe User prompts get the borderline budget.
ORDINARY_SOURCES = frozenset({"self_instruct", "own_ordinary", "own_casual_ordinary", "own_personal_context",
                              "own_r7_everyday_howto"})


def logit(p: float) -> float:
    """log(p / (1 - p)) for p in (0, 1)."""
    return math.log(p / (1.0 - p))


def choose_threshold(examples: Sequence[Example], overall: FloatArray, ordinary_fpr: float,
                     borderline_fpr: float) -> float:
    """The lowest threshold within both false-positive budgets, mirroring the issue's two targets.

    The safe rows of every ordinary-traffic source (`ORDINARY_SOURCES`: prompts, and Self-Instruct's reference
    answers) may be flagged at most `ordinary_fpr`, and the safe user prompts of every other source (borderline
    sets) at most `borderline_fpr`, each source separately so that a big easy source cannot hide a hard small
    one (pooled, the casual queries and personal-context requests added in the third data round let
    Self-Instruct's FPR rise to 0.074). Other safe Agent turns are measured, not budgeted: refusals that name a
    weapon are the head's known weakness and would otherwise set the threshold. The lowest such threshold keeps
    recall as high as the budgets allow. Pass one stage's rows (`choose_stage_thresholds`) for that stage's.

    Args:
        examples: rows with sources.
        overall: (n,) out-of-fold overall scores.
        ordinary_fpr: FPR budget on each ordinary source.
        borderline_fpr: FPR budget on each borderline safe source.

    Returns:
        The threshold (0.95 when none fits).
    """
    return _lowest_within(overall, _budgets(examples, ordinary_fpr, borderline_fpr))


def _budgets(examples: Sequence[Example], ordinary_fpr: float, borderline_fpr: float
             ) -> list[tuple[np.ndarray, float]]:
    """(rows mask, FPR budget) per budgeted source, as `choose_threshold` describes; empty when none is."""
    safe = np.array([not ex.unsafe for ex in examples], dtype=bool)
    user = np.array([ex.role == "User" for ex in examples], dtype=bool)
    sources = np.array([ex.source for ex in examples])
    budgets = []
    for source in sorted(set(sources.tolist())):
        m = safe & (sources == source)
        if source not in ORDINARY_SOURCES:
            m &= user
        if m.any():
            budgets.append((m, ordinary_fpr if source in ORDINARY_SOURCES else borderline_fpr))
    return budgets


def _lowest_within(overall: FloatArray, budgets: Sequence[tuple[np.ndarray, float]]) -> float:
    """The lowest threshold on the grid at which every budgeted source's FPR is within its budget (0.95 if none)."""
    for t in np.linspace(0.05, 0.95, 181):
        if all((overall[m] >= t).mean() <= budget for m, budget in budgets):
            return float(t)
    return 0.95


def _user_rows(examples: Sequence[Example]) -> tuple[np.ndarray, list[Example]]:
    """The mask of the User rows (input stage) and those rows."""
    user = np.array([ex.role == "User" for ex in examples], dtype=bool)
    return user, [ex for ex, keep in zip(examples, user, strict=True) if keep]


def choose_stage_thresholds(examples: Sequence[Example], overall: FloatArray, ordinary_fpr: float,
                            borderline_fpr: float) -> tuple[float, float]:
    """`choose_threshold` on the User rows (input stage) and on the Agent rows (output stage) separately.

    Args:
        examples: rows with roles and sources.
        overall: (n,) out-of-fold overall scores.
        ordinary_fpr: FPR budget on each ordinary source.
        borderline_fpr: FPR budget on each borderline safe source (User prompts only).

    Returns:
        (input threshold, output threshold); a stage without budgeted rows takes the other's threshold.
    """
    user, users = _user_rows(examples)
    agents = [ex for ex, keep in zip(examples, user, strict=True) if not keep]
    found: list[float | None] = []
    for m, rows in ((user, users), (~user, agents)):
        budgets = _budgets(rows, ordinary_fpr, borderline_fpr)
        found.append(_lowest_within(overall[m], budgets) if budgets else None)
    t_in, t_out = found
    if t_in is None:
        t_in = t_out
    if t_out is None:
        t_out = t_in
    if t_in is None or t_out is None:  # neither stage has a budgeted row
        t = choose_threshold(examples, overall, ordinary_fpr, borderline_fpr)
        return t, t
    return t_in, t_out


def choose_input_margin_thresholds(examples: Sequence[Example], overall: FloatArray, ordinary_fpr: float,
                                   borderline_fpr: float, input_borderline_fpr: float) -> tuple[float, float]:
    """The output threshold by the shipped rule; the input one lowered where the User rows allow, with a margin.

    The shipped rule's one threshold is bound by Self-Instruct pooled over its prompts and its reference answers,
    an output-stage property that holds the input threshold up (docs/GUARD.md, "Per-stage thresholds"). Here the
    output threshold stays the shipped rule's, and the input threshold is the lower of it and `choose_threshold`
    on the User rows alone with every borderline budget at `input_borderline_fpr`: the target less a margin,
    since budgets equal to the targets leave none for sets never trained on.

    Args:
        examples: rows with roles and sources.
        overall: (n,) out-of-fold overall scores.
        ordinary_fpr: FPR budget on each ordinary source (both thresholds).
        borderline_fpr: FPR budget on each borderline safe source (the output threshold's rule).
        input_borderline_fpr: FPR budget on each borderline safe source for the input threshold.

    Returns:
        (input threshold, output threshold), input <= output.
    """
    t_out = choose_threshold(examples, overall, ordinary_fpr, borderline_fpr)
    user, users = _user_rows(examples)
    if not users:
        return t_out, t_out
    t_user = choose_threshold(users, overall[user], ordinary_fpr, input_borderline_fpr)
    return min(t_user, t_out), t_out


def threshold_rule_conflict(per_stage: bool, input_borderline_fpr: float | None) -> str | None:
    """Why the two rules cannot be asked for together (both set the input threshold), or None when they are not.

    Args:
        per_stage: the per-stage rule is asked for.
        input_borderline_fpr: the margin rule's budget, if asked for.

    Returns:
        The message for the caller to raise or print, or None.
    """
    if per_stage and input_borderline_fpr is not None:
        return "per_stage and input_borderline_fpr (--stage-thresholds, --input-borderline-fpr) are two rules " \
               "for the input threshold: pick one"
    return None


def choose_thresholds(examples: Sequence[Example], overall: FloatArray, ordinary_fpr: float,
                      borderline_fpr: float, per_stage: bool = False,
                      input_borderline_fpr: float | None = None) -> tuple[float, float]:
    """(input, output) thresholds: one `choose_threshold` over all rows (the shipped rule), per stage, or with
    the input threshold lowered within margined budgets (`choose_input_margin_thresholds`).

    Args:
        examples: rows with roles and sources.
        overall: (n,) out-of-fold overall scores.
        ordinary_fpr: FPR budget on each ordinary source.
        borderline_fpr: FPR budget on each borderline safe source.
        per_stage: `choose_stage_thresholds` instead of one threshold.
        input_borderline_fpr: with it, `choose_input_margin_thresholds` (not together with `per_stage`).

    Returns:
        (input threshold, output threshold), equal unless `per_stage` or `input_borderline_fpr`.

    Raises:
        ValueError: both `per_stage` and `input_borderline_fpr` (two rules for the input threshold).
    """
    conflict = threshold_rule_conflict(per_stage, input_borderline_fpr)
    if conflict:
        raise ValueError(conflict)
    if per_stage:
        return choose_stage_thresholds(examples, overall, ordinary_fpr, borderline_fpr)
    if input_borderline_fpr is not None:
        return choose_input_margin_thresholds(examples, overall, ordinary_fpr, borderline_fpr, input_borderline_fpr)
    t = choose_threshold(examples, overall, ordinary_fpr, borderline_fpr)
    return t, t


def stage_adjusted(examples: Sequence[Example], scores: FloatArray, agent_offset: float) -> FloatArray:
    """Scores with the overall column of Agent rows shifted by `-agent_offset` in logit space, as served.

    A head with input threshold t_in and output threshold t_out flags an Agent turn at raw score s when
    logit(s) - agent_offset >= logit(t_in), agent_offset = logit(t_out) - logit(t_in); so after this shift one
    threshold, t_in, reads every row as its stage would (for reports over mixed-role rows).

    Args:
        examples: the rows of `scores`.
        scores: (n, 1 + categories) raw scores.
        agent_offset: logit(t_out) - logit(t_in).

    Returns:
        A shifted copy.
    """
    out = np.array(scores, dtype=np.float32, copy=True)
    agent = np.array([ex.role != "User" for ex in examples], dtype=bool)
    if agent.any() and agent_offset:
        out[agent, 0] = shift_logit(out[agent, 0], agent_offset)  # as Head.for_role does when served
    return out


def calibrated(head: Head, threshold: float, category_thresholds: FloatArray,
               output_threshold: float | None = None) -> Head:
    """Shift the output biases so that every chosen threshold maps to a score of exactly 0.5.

    The policy compares scores with its own thresholds (0.5 by default), so a head whose decision
    point is 0.5 means the same thing in the classifier, the policy and the cascade band. With an output
    threshold, the head also carries `agent_offset` = logit(output) - logit(input): Agent turns' overall
    scores are shifted by it when served, so 0.5 is the output threshold for them.

    Args:
        head: a trained head.
        threshold: chosen overall (input-stage) threshold in (0, 1).
        category_thresholds: (14,) chosen category thresholds in (0, 1).
        output_threshold: chosen output-stage threshold (None = the same as `threshold`).

    Returns:
        The head with shifted `out_b`, all thresholds 0.5 and its `agent_offset`.
    """
    chosen = np.r_[threshold, category_thresholds].astype(np.float64)
    shift = np.log(chosen / (1.0 - chosen))  # logit of each threshold
    offset = 0.0 if output_threshold is None or output_threshold == threshold else (
        logit(output_threshold) - logit(threshold))
    fields = {k: getattr(head, k) for k in head.__dataclass_fields__}
    fields.update(out_b=(head.out_b - shift).astype(np.float32), threshold=0.5,
                  category_thresholds=np.full(len(head.categories), 0.5, np.float32), agent_offset=offset)
    return Head(**fields)
