"""Pure measures of success-vs-tokens curves S(t): the curve of a set of trials, cumulative
regret, tokens to a success level, the token-efficiency ratio, maj@k, and scaled budgets
(definitions in :mod:`metarl_llm.evaluation.heldout`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Sequence

import numpy as np

from metarl_llm.config import (
    BudgetConfig,
    EvalConfig,
)
from metarl_llm.core.trial import Trial
from metarl_llm.core.voting import majority_index
from metarl_llm.rollout.meta_prover import boundary_prefixes

log = logging.getLogger(__name__)


LEVEL_TOLERANCE = 1e-9  # S(t) >= level - this: absorbs float rounding when the level is derived from S itself
DEFAULT_EFFICIENCY_SHARE = 0.9  # token_efficiency_ratio's default level: this share of the smaller final success


# ------------------------------------------------------------------ pure measures


def episode_figures(
    outcomes: Sequence[float], answer_episodes: Sequence[int], j_curves: Sequence[Sequence[float]] | None, max_episodes: int
) -> dict[str, float]:
    """Per-episode figures of a set of trials, under the names training and held-out logs share
    (``train/...`` and ``heldout/...`` prefix them):

    - ``J/boundary_<b>``: the mean meta-prover success J at boundary b (after the prompt for b = 0,
      after episode b-1 otherwise) over the trials that reach it (none without ``j_curves``);
    - ``success_by_episode_<j>``, j = 0..max_episodes: the share of trials whose committed answer
      came at episode <= j and was correct (outcome >= 1; ``answer_episodes`` -1: none committed).
    """
    out = {}
    if j_curves is not None:
        for b in range(max(len(c) for c in j_curves)):
            out[f"J/boundary_{b}"] = float(np.mean([c[b] for c in j_curves if len(c) > b]))
    for j in range(max_episodes + 1):
        out[f"success_by_episode_{j}"] = float(np.mean([o >= 1.0 and 0 <= a <= j for o, a in zip(outcomes, answer_episodes)]))
    return out


def curve_tokens(budget: BudgetConfig) -> int:
    """C, the last token count of the success curve: every trial has its outcome by then
    (``max_total_tokens`` before the forced answer, plus ``answer_max_tokens`` for it)."""
    return budget.max_total_tokens + budget.answer_max_tokens


def trial_breakpoints(trial: Trial, j_curve: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints of one trial's success-versus-tokens step function.

    ``j_curve`` [m]: J at the trial's m boundaries, in ``bonus.boundary_prefixes`` order
    (after the prompt, then after each episode before the final-answer one).
    Returns ``tokens`` [m+1] int64, the policy tokens spent at each boundary and then
    the trial's total policy tokens, and ``values`` [m+1] float64, J at each boundary
    and then the trial's outcome.
    """
    ends = boundary_prefixes(trial)
    if len(ends) != len(j_curve):
        raise ValueError(f"trial {trial.problem_id}: {len(j_curve)} J values for {len(ends)} boundaries")
    spent = np.concatenate(
        [[0], np.cumsum(np.asarray(trial.action, dtype=np.int64))]
    )  # [len(ids)+1], spent[e] = actions in ids[:e]
    tokens = np.array([spent[e] for e in ends] + [trial.policy_tokens], dtype=np.int64)
    values = np.array(list(j_curve) + [trial.outcome], dtype=np.float64)
    return tokens, values


def success_curve(breakpoints: Sequence[tuple[np.ndarray, np.ndarray]], budget_tokens: int) -> np.ndarray:
    """S(t) for t = 0..C: the mean over trials of each trial's step function.

    ``breakpoints``: one ``(tokens [n_i], values [n_i])`` pair per trial, tokens
    non-decreasing integers >= 0. A trial's value at t is the value of its last
    breakpoint with tokens <= t (of several at the same tokens, the last wins), and 0
    before its first breakpoint. ``budget_tokens`` is C.
    Returns S [C+1] float64.
    """
    if budget_tokens < 0:
        raise ValueError(f"success_curve: budget_tokens must be >= 0, got {budget_tokens}")
    if len(breakpoints) == 0:
        raise ValueError("success_curve: no trials")
    grid = np.arange(budget_tokens + 1)
    total = np.zeros(budget_tokens + 1)
    for i, (tokens, values) in enumerate(breakpoints):
        tokens = np.asarray(tokens)
        values = np.asarray(values, dtype=np.float64)
        if tokens.ndim != 1 or tokens.shape != values.shape or tokens.size == 0:
            raise ValueError(
                f"success_curve: trial {i} needs 1-D tokens and values of one non-zero length, got {tokens.shape} and {values.shape}"
            )
        if (np.diff(tokens) < 0).any() or tokens[0] < 0:
            raise ValueError(f"success_curve: trial {i} tokens must be non-decreasing and >= 0, got {tokens.tolist()}")
        last = np.searchsorted(tokens, grid, side="right") - 1  # [C+1] index of the last breakpoint <= t, -1 before the first
        total += np.where(last >= 0, values[np.maximum(last, 0)], 0.0)
    return total / len(breakpoints)


def cumulative_regret(curve: np.ndarray, budget_tokens: int | None = None) -> float:
    """Normalised area between 1 and S up to C: (1/C) * sum_{t=0}^{C-1} (1 - S(t)).

    ``curve`` S [>= C] on t = 0, 1, ...; ``budget_tokens`` C (default ``len(curve) - 1``,
    the whole curve of :func:`success_curve`). Exact for a step function that changes
    only at integers: S(t) holds on [t, t+1). 0 means success 1 from the first token on.
    """
    s = np.asarray(curve, dtype=np.float64)
    c = len(s) - 1 if budget_tokens is None else int(budget_tokens)
    if c < 1 or c > len(s):
        raise ValueError(f"cumulative_regret: budget_tokens={c} must be in [1, {len(s)}] for a curve of {len(s)} points")
    return float(np.sum(1.0 - s[:c]) / c)


def tokens_to_success(curve: np.ndarray, level: float) -> int | None:
    """Smallest t with S(t) >= level (up to :data:`LEVEL_TOLERANCE`), or None if S never
    reaches it. ``curve`` S [C+1]."""
    hits = np.flatnonzero(np.asarray(curve, dtype=np.float64) >= level - LEVEL_TOLERANCE)
    return int(hits[0]) if hits.size else None


def success_level(curve: np.ndarray, cfg: EvalConfig) -> float:
    """The level of ``tokens_to_success``: ``cfg.success_level`` x S(C) when relative
    (always reached, at C at the latest), else the absolute ``cfg.success_level``.
    ``curve`` S [C+1]."""
    return cfg.success_level * float(curve[-1]) if cfg.success_level_relative else cfg.success_level


def default_efficiency_level(curve_a: np.ndarray, curve_b: np.ndarray) -> float:
    """0.9 x the smaller of the two final successes S_a(C_a), S_b(C_b).

    Both curves reach it (each ends at or above it), and the margin below the smaller
    final value keeps the level off the flat tail, where one late success more or less
    would move the crossing by many tokens. ``curve_a`` [C_a+1], ``curve_b`` [C_b+1].
    """
    return DEFAULT_EFFICIENCY_SHARE * min(float(curve_a[-1]), float(curve_b[-1]))


def token_efficiency_ratio(curve_a: np.ndarray, curve_b: np.ndarray, level: float | None = None) -> float | None:
    """How many times the tokens of a that b needs to reach ``level``: tokens_b / tokens_a.

    ``curve_a`` S_a [C_a+1], ``curve_b`` S_b [C_b+1] (the grids may differ). ``level``
    defaults to :func:`default_efficiency_level`. Returns None when either curve never
    reaches the level, or when the level is <= 0 (nothing to reach); 1.0 when both reach
    it at t = 0 and inf when only a does.
    """
    if level is None:
        level = default_efficiency_level(curve_a, curve_b)
    if level <= 0:
        return None
    ta, tb = tokens_to_success(curve_a, level), tokens_to_success(curve_b, level)
    if ta is None or tb is None:
        return None
    if ta == 0:
        return 1.0 if tb == 0 else math.inf
    return tb / ta


def maj_at_k(trials: Sequence[Trial]) -> float:
    """Majority-vote success: per problem (trials sharing ``group``), the most frequent
    committed answer (compared after stripping whitespace; ties go to the first seen),
    scored by ``env.score`` of a trial that gave it; the mean over problems.

    Trials without an answer (None or empty) do not vote; a problem with no vote scores
    0. The vote scores the answer text alone: where an environment's outcome also counts
    earlier episodes (planted_subseq), maj@k can be below the trials' success.
    """
    problems: dict[int, list[Trial]] = {}
    for t in trials:
        problems.setdefault(t.group, []).append(t)
    if not problems:
        raise ValueError("maj_at_k: no trials")
    scores = []
    for group in problems.values():
        i = majority_index([t.answer for t in group])
        scores.append(0.0 if i is None else float(group[i].grader.score(group[i].answer.strip())))
    return float(np.mean(scores))


def scale_budget(budget: BudgetConfig, scale: float) -> BudgetConfig:
    """The budget ``scale`` x ``budget``: ``max_episodes`` and ``max_total_tokens`` scaled
    and rounded half up, at least 1 episode and ``max_episode_tokens`` tokens; tokens per
    episode, forced-answer and prompt limits unchanged."""
    if not scale > 0:
        raise ValueError(f"eval.budget_scales: every scale must be > 0, got {scale}")
    half_up = lambda x: int(math.floor(x + 0.5))  # noqa: E731  (Python's round() goes to even: 2.5 -> 2)
    return replace(
        budget,
        max_episodes=max(1, half_up(budget.max_episodes * scale)),
        max_total_tokens=max(budget.max_episode_tokens, half_up(budget.max_total_tokens * scale)),
    )


def budget_label(scale: float) -> str:
    """Key of a budget scale in reports: 0.5 -> "0.5", 1.0 -> "1", 4.0 -> "4"."""
    return f"{float(scale):g}"


def budget_scales(cfg: EvalConfig) -> list[float]:
    """Scales of the final evaluation, ascending and distinct; 1 always, and only 1 when
    ``cfg.extrapolation`` is off."""
    scales = [1.0] + ([float(s) for s in cfg.budget_scales] if cfg.extrapolation else [])
    for s in scales:
        if not s > 0:
            raise ValueError(f"eval.budget_scales: every scale must be > 0, got {s}")
    return sorted({budget_label(s): s for s in scales}.values())


def finite_or_none(x: float | None) -> float | None:
    """``x``, or None for nan and inf (JSON has neither)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x
