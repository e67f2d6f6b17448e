"""Held-out evaluation: success, the success-versus-tokens curve, cumulative regret,
token efficiency, maj@k and pass@k, at the training budget and at scaled budgets.

Sampled, not greedy (greedy success saturates while sampled success stays low), with
``eval.samples_per_problem`` (k) trials on each of ``eval.num_problems`` held-out
problems.

The success-versus-tokens curve
-------------------------------
Each trial gives a step function of the *policy tokens* it has spent (prompt and
inserted observation tokens are not spent by the policy):

- t = 0: J_empty, the meta-prover's success right after the prompt;
- at the tokens where episode j ends (every episode before the final-answer one):
  J_j, the meta-prover's success after that prefix (``bonus.boundary_prefixes``;
  J is estimated with ``eval.prover_samples`` sampled forced answers);
- at the trial's total policy tokens: its ``outcome``. The trial has committed its
  answer and spends nothing more, so its value stays there.

S(t) is the mean of these step functions over all trials, on the integer grid
t = 0..C. **C = max_total_tokens + answer_max_tokens**: the forced answer's tokens are
policy tokens (``Trial.policy_tokens`` and ``tokens_per_trial`` count them), and a
trial that runs out of budget spends up to ``max_total_tokens`` and then at most
``answer_max_tokens`` on the forced answer, so at t = C every trial has reached its
outcome and S(C) is the held-out success.

Figures
-------
- ``regret``: cumulative regret at budget C, the normalised area between 1 (the best
  achievable success) and S: (1/C) * sum_{t=0}^{C-1} (1 - S(t)), exact for a step
  function on integers (MRT, Qu et al. 2025).
- ``tokens_to_success``: smallest t with S(t) >= level, the level being
  ``eval.success_level`` x S(C) (default 0.9 of the curve's own final success) or
  the absolute ``eval.success_level`` when ``eval.success_level_relative=false``.
- ``token_efficiency_ratio(S_a, S_b)``: tokens_b / tokens_a at a level both reach
  (default 0.9 x the smaller final success); > 1 means a needs fewer tokens.
- ``maj@k``: per problem, the majority answer of its k trials, scored; ``pass@k``:
  the share of problems solved by at least one trial.
- ``success_by_episode_j``: share of trials whose final answer came at episode <= j
  and was correct; ``J/boundary_b``: J after the prompt (b=0) and after episode b-1.

Extrapolation: the same measures at ``eval.budget_scales`` (default 0.5, 1, 2, 4) times
the training budget (:func:`scale_budget`), each scale with its own environments
(``max_episodes`` follows the budget) and its own C.

Determinism: every evaluation draws from a fresh generator seeded ``seed + 10_000``
(the same at every budget scale: common random numbers), so evaluating the saved final
checkpoint reproduces the training run's final figures exactly (same device and
thread count).

Command line (see :data:`USAGE`)::

    python -m metarl_llm.evaluate run_dir=PATH [checkpoint=latest|iter_000060] [compare=OTHER_RUN_DIR] [KEY=VALUE ...]
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from metarl_llm.bonus import JOptions, boundary_prefixes, estimate_sample
from metarl_llm.config import (
    AlgoConfig,
    BonusConfig,
    BudgetConfig,
    EnvConfig,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    TrainConfig,
)
from metarl_llm.rollout import StreamCodec, Trial, run_trials

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 10_000  # evaluation generator seed = cfg.seed + this (apart from training's RNG)
LEVEL_TOLERANCE = 1e-9  # S(t) >= level - this: absorbs float rounding when the level is derived from S itself
DEFAULT_EFFICIENCY_SHARE = 0.9  # token_efficiency_ratio's default level: this share of the smaller final success

EnvMaker = Callable[[BudgetConfig], object]  # a held-out (split "test") environment for a budget


# ------------------------------------------------------------------ pure measures


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
    spent = np.concatenate([[0], np.cumsum(np.asarray(trial.action, dtype=np.int64))])  # [len(ids)+1], spent[e] = actions in ids[:e]
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
            raise ValueError(f"success_curve: trial {i} needs 1-D tokens and values of one non-zero length, got {tokens.shape} and {values.shape}")
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
        votes: dict[str, list] = {}  # answer -> [count, first trial that gave it]
        for t in group:
            answer = (t.answer or "").strip()
            if answer:
                votes.setdefault(answer, [0, t])[0] += 1
        if not votes:
            scores.append(0.0)
            continue
        answer, (_, trial) = max(votes.items(), key=lambda kv: kv[1][0])  # max keeps the first of equal counts
        scores.append(float(trial.env.score(answer)))
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


def check_eval_config(cfg: EvalConfig) -> None:
    """Fail at start, naming the option, on values the schema's types cannot rule out."""
    for name in ("num_problems", "samples_per_problem", "prover_samples"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"eval.{name} must be >= 1, got {getattr(cfg, name)}")
    budget_scales(cfg)
    if not 0 < cfg.success_level <= 1:
        raise ValueError(f"eval.success_level must be in (0, 1], got {cfg.success_level}")


def clamp_num_problems(cfg: EvalConfig, num_test_problems: int | None) -> None:
    """Cap ``cfg.num_problems`` at the size of the held-out split (None: unbounded), in place."""
    if num_test_problems is not None and cfg.num_problems > num_test_problems:
        log.warning("eval.num_problems=%d but the held-out split has %d problems: evaluating on all %d",
                    cfg.num_problems, num_test_problems, num_test_problems)
        cfg.num_problems = num_test_problems


# -------------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    """One evaluation at one budget.

    metrics:  scalar figures (module docstring); ``tokens_to_success`` is nan when S
              never reaches the level.
    trials:   the N = num_problems x samples_per_problem trials, problem-major.
    j_curves: N arrays, J at each trial's boundaries [m_i].
    curve:    S [C+1], success against policy tokens t = 0..C.
    budget:   the budget the trials ran under (C = :func:`curve_tokens` of it).
    """

    metrics: dict[str, float]
    trials: list[Trial]
    j_curves: list[np.ndarray]
    curve: np.ndarray
    budget: BudgetConfig


def heldout_resets(num_problems: int, samples: int) -> tuple[list[dict], list[int]]:
    """Reset arguments for problems 0..num_problems-1 of the held-out split, ``samples``
    each (problem-major), and the problem index of each: two lists of length
    num_problems x samples."""
    resets = [{"options": {"index": p}} for p in range(num_problems) for _ in range(samples)]
    groups = [p for p in range(num_problems) for _ in range(samples)]
    return resets, groups


def eval_generator(seed: int) -> torch.Generator:
    """A fresh generator for one evaluation: the same held-out samples every time."""
    return torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, codec: StreamCodec, envs: list, budget: BudgetConfig, cfg: EvalConfig,
    generator: torch.Generator, adapt: Callable[[object], torch.nn.Module] | None = None,
) -> EvalResult:
    """Play ``cfg.samples_per_problem`` trials on each of ``cfg.num_problems`` held-out
    problems under ``budget`` and measure them. ``envs``: at least N held-out
    environments made with ``max_episodes=budget.max_episodes``.

    ``adapt`` (per-problem adaptation, e.g. :func:`metarl_llm.ttt.problem_adapter`):
    called with the unwrapped environment reset to each problem in turn, it returns the
    model that plays (and, as meta-prover, values) that problem's trials; problems are
    then played one after the other instead of all in one batch."""
    k = cfg.samples_per_problem
    n = cfg.num_problems * k
    if len(envs) < n:
        raise ValueError(f"evaluate: {len(envs)} environments for {n} trials")
    was_training = model.training
    model.eval()
    resets, groups = heldout_resets(cfg.num_problems, k)
    opts = JOptions(num_samples=cfg.prover_samples, answer_max_tokens=budget.answer_max_tokens, generator=generator)
    if adapt is None:
        trials = run_trials(model, codec, envs[:n], resets, groups, budget, generator, keep_cache=True)
        j_curves = estimate_sample(model, codec, trials, opts)  # continues from the kept caches
        for t in trials:
            t.cache = None
    else:
        trials, j_curves = [], []
        for p in range(cfg.num_problems):
            rows = slice(p * k, (p + 1) * k)
            envs[p * k].reset(**resets[p * k])
            with torch.enable_grad():
                adapted = adapt(envs[p * k].unwrapped)
            adapted.eval()
            part = run_trials(adapted, codec, envs[rows], resets[rows], groups[rows], budget, generator, keep_cache=True)
            trials += part
            j_curves += estimate_sample(adapted, codec, part, opts)
            for t in part:
                t.cache = None
    model.train(was_training)
    outcome = np.array([t.outcome for t in trials])  # [N]
    solved = outcome.reshape(cfg.num_problems, k).max(1) >= 1.0  # [num_problems]
    curve = success_curve([trial_breakpoints(t, c) for t, c in zip(trials, j_curves)], curve_tokens(budget))
    level = success_level(curve, cfg)
    reached = tokens_to_success(curve, level)
    metrics: dict[str, float] = {
        "success": float(outcome.mean()),
        f"pass@{k}": float(solved.mean()),
        f"maj@{k}": maj_at_k(trials),
        "regret": cumulative_regret(curve),
        "tokens_to_success": float(reached) if reached is not None else math.nan,
        "tokens_to_success_level": level,
        "budget_tokens": float(curve_tokens(budget)),
        "tokens_per_trial": float(np.mean([t.policy_tokens for t in trials])),
        "episodes_per_trial": float(np.mean([len(t.episode_texts) for t in trials])),
        "forced_answer_rate": float(np.mean([t.forced for t in trials])),
    }
    width = max(len(c) for c in j_curves)
    for b in range(width):
        metrics[f"J/boundary_{b}"] = float(np.mean([c[b] for c in j_curves if len(c) > b]))
    for j in range(budget.max_episodes + 1):
        metrics[f"success_by_episode_{j}"] = float(
            np.mean([t.outcome >= 1.0 and 0 <= t.answer_episode <= j for t in trials])
        )
    return EvalResult(metrics, trials, j_curves, curve, budget)


def problem_adapter_of(cfg: TrainConfig, model: torch.nn.Module, codec: StreamCodec):
    """The per-problem adaptation ``cfg.adapt`` selects for :func:`evaluate`: None for
    ``adapt=none``; for ``adapt=ttt`` a test-time trainer over a copy of ``model``
    (:func:`metarl_llm.ttt.problem_adapter`)."""
    if cfg.adapt.name == "none":
        return None
    if cfg.adapt.name != "ttt":
        raise ValueError(f"adapt.name={cfg.adapt.name!r}; expected 'none' or 'ttt'")
    from metarl_llm.ttt import problem_adapter

    return problem_adapter(model, codec.tokenizer, cfg.adapt.ttt)


def evaluate_at_budgets(
    model: torch.nn.Module, codec: StreamCodec, cfg: TrainConfig, make_env: EnvMaker
) -> dict[str, EvalResult]:
    """:func:`evaluate` at every scale of :func:`budget_scales` x ``cfg.budget``, keyed by
    :func:`budget_label` ("0.5", "1", ...), ascending. Each scale gets its own
    environments from ``make_env(budget)`` and a fresh :func:`eval_generator`."""
    n = cfg.eval.num_problems * cfg.eval.samples_per_problem
    adapt = problem_adapter_of(cfg, model, codec)
    results = {}
    for scale in budget_scales(cfg.eval):
        budget = scale_budget(cfg.budget, scale)
        envs = [make_env(budget) for _ in range(n)]
        results[budget_label(scale)] = evaluate(model, codec, envs, budget, cfg.eval, eval_generator(cfg.seed), adapt)
        log.info("held-out at %sx budget (%d episodes, C=%d tokens): success %.3f, regret %.3f",
                 budget_label(scale), budget.max_episodes, curve_tokens(budget),
                 results[budget_label(scale)].metrics["success"], results[budget_label(scale)].metrics["regret"])
    return results


def finite_or_none(x: float | None) -> float | None:
    """``x``, or None for nan and inf (JSON has neither)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def heldout_figures(results: dict[str, EvalResult], cfg: EvalConfig) -> dict:
    """The figures that go into summary.json (and eval_<checkpoint>.json): at the training
    budget ("1") ``regret``, ``tokens_to_success`` (None if never reached) at
    ``tokens_to_success_level``, ``maj_at_k`` and ``heldout_success_curve`` (S [C+1] as a
    list); per budget scale ``heldout_success_by_budget``, ``regret_by_budget``,
    ``heldout_tokens_per_trial_by_budget``."""
    base = results[budget_label(1.0)].metrics
    reached = base["tokens_to_success"]
    return {
        "regret": base["regret"],
        "tokens_to_success": None if math.isnan(reached) else int(reached),
        "tokens_to_success_level": base["tokens_to_success_level"],
        "maj_at_k": base[f"maj@{cfg.samples_per_problem}"],
        "heldout_success_curve": results[budget_label(1.0)].curve.tolist(),
        "heldout_success_by_budget": {label: r.metrics["success"] for label, r in results.items()},
        "regret_by_budget": {label: r.metrics["regret"] for label, r in results.items()},
        "heldout_tokens_per_trial_by_budget": {label: r.metrics["tokens_per_trial"] for label, r in results.items()},
    }


# ----------------------------------------------------------------- plots, report


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(plt, fig, ax, path: Path, title: str = "") -> None:
    """The common finish of a [0, 1]-valued plot: y range, title, legend, grid; PNG at ``path``."""
    ax.set_ylim(-0.02, 1.02)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_success_curves(curves: dict[str, np.ndarray], path: Path, title: str = "") -> None:
    """Step plot of S(t) against policy tokens, one line per label; ``curves`` label ->
    S [C+1] (each on its own grid). Writes a PNG at ``path``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, s in curves.items():
        ax.step(np.arange(len(s)), s, where="post",
                label=f"{label} (S(C) {s[-1]:.2f}, regret {cumulative_regret(s):.2f})")
    ax.set_xlabel("policy tokens spent t")
    ax.set_ylabel("held-out success S(t)")
    save_plot(plt, fig, ax, path, title)


def plot_budget_extrapolation(results: dict[str, EvalResult], k: int, path: Path, title: str = "") -> None:
    """Success, pass@k, maj@k and regret against the budget scale (log2 axis). PNG at ``path``."""
    plt = pyplot()
    scales = [float(label) for label in results]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, name in (("success", "success"), (f"pass@{k}", f"pass@{k}"), (f"maj@{k}", f"maj@{k}"), ("regret", "regret")):
        ax.plot(scales, [r.metrics[key] for r in results.values()], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(scales, [f"{s:g}x" for s in scales])
    ax.set_xlabel("budget (x training budget)")
    save_plot(plt, fig, ax, path, title)


TRANSCRIPT_COLUMNS = ["problem_id", "episodes", "answer", "outcome", "policy_tokens", "J_per_boundary"]


def transcript_rows(trials: list[Trial], curves: list[np.ndarray] | None, k: int) -> list[list]:
    """Rows of a W&B table (:data:`TRANSCRIPT_COLUMNS`) for the first ``k`` trials."""
    rows = []
    for i, t in enumerate(trials[:k]):
        j = [round(float(x), 3) for x in curves[i]] if curves is not None else []
        rows.append([t.problem_id, " | ".join(t.episode_texts), t.answer, t.outcome, t.policy_tokens, json.dumps(j)])
    return rows


def eval_report(results: dict[str, EvalResult], figures: dict, cfg: TrainConfig, checkpoint: str) -> dict:
    """JSON-ready record of one evaluation: the figures, and per budget scale the budget,
    C, every metric (nan as None) and the curve S [C+1]."""
    return {
        "checkpoint": checkpoint,
        "seed": cfg.seed,
        "eval": asdict(cfg.eval),
        "figures": figures,
        "budgets": {
            label: {
                "budget": asdict(r.budget),
                "budget_tokens": curve_tokens(r.budget),
                "metrics": {k: finite_or_none(v) for k, v in r.metrics.items()},
                "curve": r.curve.tolist(),
            }
            for label, r in results.items()
        },
    }


def evaluate_and_report(
    model: torch.nn.Module, codec: StreamCodec, cfg: TrainConfig, make_env: EnvMaker, run_dir: Path,
    checkpoint: str, tracker, step: int,
) -> tuple[dict[str, EvalResult], dict, dict]:
    """The final evaluation of a checkpoint, shared by the trainer and the command line.

    Runs :func:`evaluate_at_budgets`; writes ``eval_<checkpoint>.json``,
    ``success_vs_tokens_<checkpoint>.png`` (S(t) per budget scale) and, with more than
    one scale, ``budget_extrapolation_<checkpoint>.png`` into ``run_dir``; logs the
    training-budget metrics as ``heldout/...``, the per-scale ones as
    ``heldout_budget/<scale>x/...``, a transcript table and the plots to ``tracker``
    (a :class:`metarl_llm.tracking.Tracker`). Returns (results, figures, report).
    """
    run_dir = Path(run_dir)
    results = evaluate_at_budgets(model, codec, cfg, make_env)
    figures = heldout_figures(results, cfg.eval)
    report = eval_report(results, figures, cfg, checkpoint)
    (run_dir / f"eval_{checkpoint}.json").write_text(json.dumps(report, indent=1))

    base = results[budget_label(1.0)]
    scalars = {f"heldout/{k}": v for k, v in base.metrics.items()}
    k = cfg.eval.samples_per_problem
    for label, r in results.items():
        for key in ("success", "regret", f"pass@{k}", f"maj@{k}", "tokens_per_trial", "tokens_to_success"):
            scalars[f"heldout_budget/{label}x/{key}"] = r.metrics[key]
    tracker.log(scalars, step=step)
    tracker.table(f"transcripts/{checkpoint}", TRANSCRIPT_COLUMNS,
                  transcript_rows(base.trials, base.j_curves, cfg.logger.num_transcripts), step=step)
    curves_png = run_dir / f"success_vs_tokens_{checkpoint}.png"
    plot_success_curves({f"{label}x budget (C={curve_tokens(r.budget)})": r.curve for label, r in results.items()},
                        curves_png, title=f"{cfg.env.name}, {checkpoint}")
    tracker.image("heldout/success_vs_tokens_by_budget", curves_png, step=step)
    if len(results) > 1:
        budget_png = run_dir / f"budget_extrapolation_{checkpoint}.png"
        plot_budget_extrapolation(results, k, budget_png, title=f"{cfg.env.name}, {checkpoint}")
        tracker.image("heldout/budget_extrapolation", budget_png, step=step)
    return results, figures, report


# ------------------------------------------------------------------ command line

USAGE = """\
usage: python -m metarl_llm.evaluate run_dir=PATH [checkpoint=latest|iter_000060] [compare=OTHER_RUN_DIR] [KEY=VALUE ...]

Evaluates a checkpoint of a training run on held-out problems at the budget scales
eval.budget_scales (success-vs-tokens curves, regret, tokens to success, pass@k, maj@k)
and writes eval_<checkpoint>.json and PNGs into the run directory.

  run_dir=PATH         a directory written by train.py (config.yaml, checkpoints/)
  checkpoint=NAME      latest (default: the one checkpoints/latest names) or a name such as iter_000060
  compare=OTHER_RUN    also report the token-efficiency ratio against OTHER_RUN's
                       evaluation of its latest checkpoint (eval_<its checkpoint>.json)
  KEY=VALUE            Hydra-style override of the run's config, e.g.
                       eval.num_problems=32 eval.samples_per_problem=8 budget.max_episodes=4
                       eval.budget_scales=[1,2] eval.extrapolation=false logger.mode=disabled
"""
CLI_KEYS = ("run_dir", "checkpoint", "compare")


def parse_command_line(argv: Sequence[str]) -> tuple[dict, list]:
    """Split ``argv`` into the command's own options (run_dir, checkpoint, compare) and
    the parsed Hydra overrides of the run's config."""
    parsed = _parse_overrides(argv)
    options = {"run_dir": None, "checkpoint": "latest", "compare": None}
    overrides = []
    for o in parsed:
        if o.key_or_group in CLI_KEYS:
            options[o.key_or_group] = None if o.value() is None else str(o.value())
        else:
            overrides.append(o)
    if options["run_dir"] is None:
        raise ValueError("run_dir=PATH is required (a directory written by train.py)\n" + USAGE)
    return options, overrides


def _parse_overrides(args: Sequence[str]) -> list:
    """Hydra's parse of KEY=VALUE strings; a malformed one is a ValueError naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(list(args))
    except HydraException as e:
        raise ValueError(f"cannot parse the command line {list(args)}: {e}") from e


def _env_schema(saved_env) -> type[EnvConfig]:
    """The EnvConfig subclass that holds every key of a saved env config (the one whose
    default id, then name, matches it when several do)."""
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    keys = set(saved_env.keys())
    fits = [c for c in subclasses(EnvConfig) if keys <= {f.name for f in fields(c)}]
    if not fits:
        raise ValueError(f"config.yaml: no env schema in metarl_llm.config has the keys {sorted(keys)}")
    return max(fits, key=lambda c: (c.id == saved_env.get("id"), c.name == saved_env.get("name")))


def load_run_config(run_dir: Path, overrides: Sequence = ()) -> TrainConfig:
    """The run's ``config.yaml`` as a validated :class:`TrainConfig`, with ``overrides``
    (Hydra override strings or parsed overrides) applied: a misspelt key or a value of
    the wrong type fails, naming the key."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"run_dir={run_dir}: {path} not found (is it a run directory written by train.py?)")
    saved = OmegaConf.load(path)
    env_cls = _env_schema(saved.env)
    schema = OmegaConf.structured(TrainConfig(
        env=env_cls(), budget=BudgetConfig(), model=ModelConfig(), algo=AlgoConfig(), bonus=BonusConfig(), logger=LoggerConfig()
    ))
    cfg = OmegaConf.merge(schema, saved)
    strings = [o for o in overrides if isinstance(o, str)]
    parsed = [o for o in overrides if not isinstance(o, str)] + _parse_overrides(strings)
    for o in parsed:
        if o.is_sweep_override() or o.is_delete():
            raise ValueError(f"override {o.input_line!r}: evaluation takes plain KEY=VALUE overrides (no sweeps, no deletions)")
        value = o.value()
        try:
            OmegaConf.update(cfg, o.key_or_group, value, merge=isinstance(value, dict))
        except Exception as e:  # omegaconf's errors name the full key; say which override caused it
            raise ValueError(f"override {o.input_line!r}: {e}") from e
    return OmegaConf.to_object(cfg)


def checkpoint_name(run_dir: Path, checkpoint: str = "latest") -> str:
    """``checkpoint``, or the checkpoint ``checkpoints/latest`` names when it is "latest"."""
    if checkpoint != "latest":
        return checkpoint
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(f"checkpoint=latest: {pointer} not found (no checkpoint saved in run_dir={run_dir})")
    return pointer.read_text().strip()


def checkpoint_policy_dir(run_dir: Path, checkpoint: str) -> Path:
    """``run_dir/checkpoints/<checkpoint>/policy`` (model and tokenizer), which must exist."""
    root = Path(run_dir) / "checkpoints"
    policy = root / checkpoint / "policy"
    if not policy.is_dir():
        available = sorted(p.name for p in root.glob("iter_*")) if root.is_dir() else []
        raise FileNotFoundError(f"checkpoint={checkpoint!r}: {policy} not found; checkpoints in {root}: {available}")
    return policy


def load_eval_report(run_dir: Path, checkpoint: str = "latest") -> dict:
    """``eval_<checkpoint>.json`` of a run (written by its training or by this command)."""
    name = checkpoint_name(run_dir, checkpoint)
    path = Path(run_dir) / f"eval_{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: evaluate that run first (python -m metarl_llm.evaluate run_dir={run_dir} checkpoint={name})")
    return json.loads(path.read_text())


def compare_reports(report_a: dict, report_b: dict, level: float | None = None) -> dict:
    """Token efficiency of a against b at every budget scale both reports hold: per scale
    ``level`` (default :func:`default_efficiency_level` of the two curves), ``tokens_a``,
    ``tokens_b`` (None: not reached) and ``ratio`` = tokens_b / tokens_a (> 1: a needs
    fewer tokens; None: undefined, or infinite because only a reaches it at t = 0)."""
    by_budget = {}
    for label, a in report_a["budgets"].items():
        if label not in report_b["budgets"]:
            continue
        sa, sb = np.asarray(a["curve"]), np.asarray(report_b["budgets"][label]["curve"])
        lvl = default_efficiency_level(sa, sb) if level is None else level
        by_budget[label] = {
            "level": lvl, "tokens_a": tokens_to_success(sa, lvl), "tokens_b": tokens_to_success(sb, lvl),
            "ratio": finite_or_none(token_efficiency_ratio(sa, sb, lvl)),
        }
    return {"token_efficiency_ratio": by_budget.get(budget_label(1.0), {}).get("ratio"), "by_budget": by_budget}


def compare_runs(run_a: Path, run_b: Path, checkpoint_a: str = "latest", checkpoint_b: str = "latest",
                 level: float | None = None) -> dict:
    """:func:`compare_reports` of two evaluated runs (their ``eval_<checkpoint>.json``);
    for bench code."""
    out = compare_reports(load_eval_report(run_a, checkpoint_a), load_eval_report(run_b, checkpoint_b), level)
    return {"run_a": str(run_a), "run_b": str(run_b), **out}


def format_table(report: dict) -> str:
    """A short text table of a report: one row per budget scale."""
    k = report["eval"]["samples_per_problem"]
    head = f"{'budget':>7} {'episodes':>8} {'C':>5} {'success':>8} {f'pass@{k}':>7} {f'maj@{k}':>6} {'regret':>7} {'t_to_success':>12} {'at level':>8} {'tok/trial':>9}"
    lines = [head]
    for label, b in report["budgets"].items():
        m = b["metrics"]
        t = m["tokens_to_success"]
        lines.append(
            f"{label + 'x':>7} {b['budget']['max_episodes']:>8} {b['budget_tokens']:>5} {m['success']:>8.3f} "
            f"{m[f'pass@{k}']:>7.3f} {m[f'maj@{k}']:>6.3f} {m['regret']:>7.3f} {'-' if t is None else int(t):>12} "
            f"{m['tokens_to_success_level']:>8.3f} {m['tokens_per_trial']:>9.1f}"
        )
    return "\n".join(lines)


def evaluate_run(run_dir: str | Path, checkpoint: str = "latest", overrides: Sequence = (), compare: str | Path | None = None) -> dict:
    """Evaluate a saved checkpoint of a training run, as the training run's final
    evaluation does (same function, same seeds). Writes ``eval_<checkpoint>.json`` and
    the PNGs into ``run_dir``; logs to W&B per ``logger.mode`` (offline by default) in
    ``run_dir/eval/<checkpoint>/``, tagged ``eval``. Returns the report (with
    ``compare`` added when asked)."""
    # The trainer imports this module, so its helpers are imported here, at call time.
    from metarl_llm.models import load_policy
    from metarl_llm.tracking import Tracker
    from metarl_llm.trainer import heldout_env_maker, quiet_libraries, resolve_device, validate
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir={run_dir} does not exist")
    cfg = load_run_config(run_dir, overrides)
    name = checkpoint_name(run_dir, checkpoint)
    policy_dir = checkpoint_policy_dir(run_dir, name)
    if compare is not None:
        if not Path(compare).is_dir():
            raise FileNotFoundError(f"compare={compare} does not exist")
        try:  # before the evaluation: fail early when it is missing
            other = load_eval_report(Path(compare))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"compare={compare}: {e}") from e
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    quiet_libraries()
    device = resolve_device(cfg.device)
    model, tokenizer = load_policy(cfg.model, cfg.seed, str(policy_dir))
    model.to(device)
    codec = StreamCodec(tokenizer, "\n", cfg.env.forced_answer_text)
    make_env = heldout_env_maker(cfg)
    clamp_num_problems(cfg.eval, make_env(cfg.budget).unwrapped.num_problems)

    logger = replace(cfg.logger, tags=[*cfg.logger.tags, "eval"])
    tracker = Tracker(logger, run_dir / "eval" / name, OmegaConf.to_container(OmegaConf.structured(cfg)),
                      f"{run_dir.name}/eval_{name}")
    step = int(name.split("_")[-1]) if name.split("_")[-1].isdigit() else 0
    _, figures, report = evaluate_and_report(model, codec, cfg, make_env, run_dir, name, tracker, step)
    if compare is not None:
        report["compare"] = compare_reports(report, other)
        report["compare"]["run_b"] = str(compare)
        (run_dir / f"eval_{name}.json").write_text(json.dumps(report, indent=1))
    tracker.finish({**figures, "checkpoint": name, **({"compare": report["compare"]} if compare is not None else {})})
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry: parse, evaluate, print a table (and the comparison)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return {}
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    options, overrides = parse_command_line(argv)
    report = evaluate_run(options["run_dir"], options["checkpoint"], overrides, options["compare"])
    print(f"{options['run_dir']}  checkpoint {report['checkpoint']}")
    print(format_table(report))
    if "compare" in report:
        print(f"token efficiency vs {options['compare']} (tokens of the other run / tokens of this run at the level):")
        for label, c in report["compare"]["by_budget"].items():
            print(f"  {label}x: level {c['level']:.3f}: {c['tokens_a']} vs {c['tokens_b']} tokens, ratio {c['ratio']}")
    return report


def cli() -> None:
    """``python -m metarl_llm.evaluate``: :func:`main`, with a missing file or a bad option
    reported on one line and exit status 2."""
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Run the package's copy of this module (the one the trainer imports), not __main__'s.
    from metarl_llm.evaluate import cli as _cli

    _cli()
