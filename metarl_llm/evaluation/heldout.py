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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from metarl_llm.arc.ttt import problem_adapter
from metarl_llm.config import (
    BudgetConfig,
    EvalConfig,
    TrainConfig,
)
from metarl_llm.core.trial import StreamCodec, Trial
from metarl_llm.evaluation import report as plots  # looked up at call time (a test replaces a plot)
from metarl_llm.evaluation.adaptation import adaptation_scalars, evaluate_adaptation
from metarl_llm.evaluation.curves import (
    budget_label,
    budget_scales,
    cumulative_regret,
    curve_tokens,
    episode_figures,
    finite_or_none,
    maj_at_k,
    scale_budget,
    success_curve,
    success_level,
    tokens_to_success,
    trial_breakpoints,
)
from metarl_llm.models import set_temperature, temperature_of, tempered
from metarl_llm.rl.bonus import estimate_sample
from metarl_llm.rollout.base import Engine
from metarl_llm.rollout.engine import engine_from_config, get_engine, heldout_resets, run_trials
from metarl_llm.rollout.meta_prover import JOptions
from metarl_llm.runtime.progress import Progress

log = logging.getLogger(__name__)


EVAL_SEED_OFFSET = 10_000  # evaluation generator seed = cfg.seed + this (apart from training's RNG)

EnvMaker = Callable[[BudgetConfig], object]  # a held-out (split "test") environment for a budget


def clamp_num_problems(cfg: EvalConfig, num_test_problems: int | None) -> None:
    """Cap ``cfg.num_problems`` at the size of the held-out split (None: unbounded), in place."""
    if num_test_problems is not None and cfg.num_problems > num_test_problems:
        log.warning(
            "eval.num_problems=%d but the held-out split has %d problems: evaluating on all %d",
            cfg.num_problems,
            num_test_problems,
            num_test_problems,
        )
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


def eval_generator(seed: int) -> torch.Generator:
    """A fresh generator for one evaluation: the same held-out samples every time."""
    return torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    codec: StreamCodec,
    envs: list,
    budget: BudgetConfig,
    cfg: EvalConfig,
    generator: torch.Generator,
    adapt: Callable[[object], torch.nn.Module] | None = None,
    engine: Engine | None = None,
) -> EvalResult:
    """Play ``cfg.samples_per_problem`` trials on each of ``cfg.num_problems`` held-out
    problems under ``budget`` and measure them. ``envs``: at least N held-out
    environments made with ``max_episodes=budget.max_episodes``.

    ``adapt`` (per-problem adaptation, e.g. :func:`metarl_llm.arc.ttt.problem_adapter`):
    called with the unwrapped environment reset to each problem in turn, it returns the
    model that plays (and, as meta-prover, values) that problem's trials; problems are
    then played one after the other instead of all in one batch. ``engine``: the rollout engine
    that plays the trials and samples the meta-prover's answers (the run's ``rollout`` engine;
    None: a default cached one). The trials and the meta-prover sample at ``cfg.temperature`` (None:
    the model's own, :func:`metarl_llm.models.temperature_of`), or take the argmax (``cfg.greedy``)."""
    k = cfg.samples_per_problem
    n = cfg.num_problems * k
    if len(envs) < n:
        raise ValueError(f"evaluate: {len(envs)} environments for {n} trials")
    was_training = model.training
    model.eval()
    resets, groups = heldout_resets(cfg.num_problems, k)
    engine = engine if engine is not None else get_engine("cached")
    opts = JOptions(
        num_samples=cfg.prover_samples,
        answer_max_tokens=budget.answer_max_tokens,
        generator=generator,
        engine=engine,
        greedy=cfg.greedy,
    )
    temperature = cfg.temperature if cfg.temperature is not None else temperature_of(model)
    if adapt is None:
        with tempered(model, temperature):
            trials = run_trials(
                model, codec, envs[:n], resets, groups, budget, generator, engine=engine, keep_cache=True, greedy=cfg.greedy
            )
            j_curves = estimate_sample(model, codec, trials, opts)  # continues from the kept caches
        for t in trials:
            t.cache = None
    else:
        trials, j_curves = [], []
        progress = Progress(cfg.num_problems, "held-out problems, adapted one by one", unit="problem")
        for p in range(cfg.num_problems):
            rows = slice(p * k, (p + 1) * k)
            envs[p * k].reset(**resets[p * k])
            with torch.enable_grad():
                adapted = adapt(envs[p * k].unwrapped)
            adapted.eval()
            set_temperature(adapted, temperature)
            part = run_trials(
                adapted,
                codec,
                envs[rows],
                resets[rows],
                groups[rows],
                budget,
                generator,
                engine=engine,
                keep_cache=True,
                greedy=cfg.greedy,
            )
            trials += part
            j_curves += estimate_sample(adapted, codec, part, opts)
            for t in part:
                t.cache = None
            progress.update(1, success=float(np.mean([t.outcome for t in trials])))
        progress.close()
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
    metrics.update(
        episode_figures([t.outcome for t in trials], [t.answer_episode for t in trials], j_curves, budget.max_episodes)
    )
    return EvalResult(metrics, trials, j_curves, curve, budget)


def problem_adapter_of(cfg: TrainConfig, model: torch.nn.Module, codec: StreamCodec):
    """The per-problem adaptation ``cfg.adapt`` selects for :func:`evaluate`: None for
    ``adapt=none``; for ``adapt=ttt`` a test-time trainer over a copy of ``model``
    (:func:`metarl_llm.arc.ttt.problem_adapter`)."""
    if cfg.adapt.name == "none":
        return None
    if cfg.adapt.name != "ttt":
        raise ValueError(f"adapt.name={cfg.adapt.name!r}; expected 'none' or 'ttt'")

    return problem_adapter(model, codec.tokenizer, cfg.adapt.ttt)


def evaluate_at_budgets(
    model: torch.nn.Module, codec: StreamCodec, cfg: TrainConfig, make_env: EnvMaker
) -> dict[str, EvalResult]:
    """:func:`evaluate` at every scale of :func:`budget_scales` x ``cfg.budget``, keyed by
    :func:`budget_label` ("0.5", "1", ...), ascending. Each scale gets its own
    environments from ``make_env(budget)`` and a fresh :func:`eval_generator`."""
    n = cfg.eval.num_problems * cfg.eval.samples_per_problem
    adapt = problem_adapter_of(cfg, model, codec)
    engine = engine_from_config(cfg.rollout)
    results = {}
    scales = budget_scales(cfg.eval)
    progress = Progress(len(scales), "held-out evaluation at scaled budgets", unit="budget", every_s=0)
    for scale in scales:
        budget = scale_budget(cfg.budget, scale)
        envs = [make_env(budget) for _ in range(n)]
        results[budget_label(scale)] = evaluate(model, codec, envs, budget, cfg.eval, eval_generator(cfg.seed), adapt, engine)
        log.info(
            "held-out at %sx budget (%d episodes, C=%d tokens): success %.3f, regret %.3f",
            budget_label(scale),
            budget.max_episodes,
            curve_tokens(budget),
            results[budget_label(scale)].metrics["success"],
            results[budget_label(scale)].metrics["regret"],
        )
        progress.update(1)
    progress.close()
    return results


def adaptation_of(model: torch.nn.Module, codec: StreamCodec, cfg: TrainConfig, make_env: EnvMaker) -> dict | None:
    """:func:`metarl_llm.evaluation.adaptation.evaluate_adaptation` of ``model`` as ``cfg.eval`` asks
    (None with ``eval.adaptation=false``, and under ``adapt=ttt``, whose per-problem adaptation it
    does not model: logged)."""
    if not cfg.eval.adaptation:
        return None
    if cfg.adapt.name != "none":
        log.info("eval.adaptation: not measured under adapt=%s (per-problem adaptation)", cfg.adapt.name)
        return None
    return evaluate_adaptation(
        model, codec, cfg.budget, cfg.eval, make_env, lambda: eval_generator(cfg.seed), engine_from_config(cfg.rollout)
    )


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


TRANSCRIPT_COLUMNS = ["problem_id", "episodes", "answer", "outcome", "policy_tokens", "J_per_boundary"]


def transcript_rows(trials: list[Trial], curves: list[np.ndarray] | None, k: int) -> list[list]:
    """Rows of a W&B table (:data:`TRANSCRIPT_COLUMNS`) for the first ``k`` trials."""
    rows = []
    for i, t in enumerate(trials[:k]):
        j = [round(float(x), 3) for x in curves[i]] if curves is not None else []
        rows.append([t.problem_id, " | ".join(t.episode_texts), t.answer, t.outcome, t.policy_tokens, json.dumps(j)])
    return rows


def format_transcript(trial: Trial, codec: StreamCodec, curve: np.ndarray | None = None) -> str:
    """One trial as a reader checks it: the token stream decoded piece by piece, special tokens and
    the chat template's turns included, with every piece labelled. ``[prompt]`` and ``[inserted]``
    are the tokens the environment put there (observations, the forced-answer text); ``[episode
    j]`` the policy's tokens of episode j, preceded by J at the boundary before it (``curve``,
    the meta-prover's estimate: one value per boundary, after the prompt and after each episode
    before the answer), ``(answer, forced)`` marking the forced answer; the outcome last."""
    tok = codec.tokenizer
    pieces, start = [], 0
    for k in range(1, len(trial.ids) + 1):
        if k == len(trial.ids) or (trial.action[k], trial.episode[k]) != (trial.action[start], trial.episode[start]):
            pieces.append((start, k))
            start = k
    lines = [f"=== {trial.problem_id}: outcome {trial.outcome:g}, {trial.policy_tokens} policy tokens ==="]
    for a, b in pieces:
        j = trial.episode[a]
        if not trial.action[a]:
            label = "[prompt]" if a == 0 else "[inserted]"
        else:
            last = j == trial.answer_episode
            label = f"[episode {j}{' (answer, forced)' if last and trial.forced else ' (answer)' if last else ''}]"
            if curve is not None and j < len(curve):
                label = f"-- J = {float(curve[j]):.3f} --\n{label}"
        lines.append(f"{label}\n{tok.decode(trial.ids[a:b], skip_special_tokens=False)}")
    lines.append(f"=== answer {trial.answer!r} -> outcome {trial.outcome:g} ===")
    return "\n".join(lines)


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
    model: torch.nn.Module,
    codec: StreamCodec,
    cfg: TrainConfig,
    make_env: EnvMaker,
    run_dir: Path,
    checkpoint: str,
    tracker,
    step: int,
) -> tuple[dict[str, EvalResult], dict, dict]:
    """The final evaluation of a checkpoint, shared by the trainer and the command line.

    Runs :func:`evaluate_at_budgets`; writes ``eval_<checkpoint>.json``, the first
    ``logger.num_transcripts`` trials as text (``transcripts_<checkpoint>.txt``,
    :func:`format_transcript`),
    ``success_vs_tokens_<checkpoint>.png`` (S(t) per budget scale), with more than
    one scale ``budget_extrapolation_<checkpoint>.png``, and with ``eval.adaptation``
    ``adaptation_<checkpoint>.png`` (:func:`adaptation_of`; its figures under
    ``figures["adaptation"]``, logged as ``heldout_adapt/...``) into ``run_dir``; logs the
    training-budget metrics as ``heldout/...``, the per-scale ones as
    ``heldout_budget/<scale>x/...``, a transcript table and the plots to ``tracker``
    (a :class:`metarl_llm.runtime.tracking.Tracker`). Returns (results, figures, report).
    """
    run_dir = Path(run_dir)
    results = evaluate_at_budgets(model, codec, cfg, make_env)
    figures = heldout_figures(results, cfg.eval)
    adaptation = adaptation_of(model, codec, cfg, make_env)
    if adaptation is not None:
        figures["adaptation"] = adaptation
    report = eval_report(results, figures, cfg, checkpoint)
    (run_dir / f"eval_{checkpoint}.json").write_text(json.dumps(report, indent=1))

    base = results[budget_label(1.0)]
    scalars = {f"heldout/{k}": v for k, v in base.metrics.items()}
    k = cfg.eval.samples_per_problem
    for label, r in results.items():
        for key in ("success", "regret", f"pass@{k}", f"maj@{k}", "tokens_per_trial", "tokens_to_success"):
            scalars[f"heldout_budget/{label}x/{key}"] = r.metrics[key]
    tracker.log(scalars, step=step)
    tracker.table(
        f"transcripts/{checkpoint}",
        TRANSCRIPT_COLUMNS,
        transcript_rows(base.trials, base.j_curves, cfg.logger.num_transcripts),
        step=step,
    )
    shown = base.trials[: cfg.logger.num_transcripts]
    (run_dir / f"transcripts_{checkpoint}.txt").write_text(
        "\n\n".join(
            format_transcript(t, codec, base.j_curves[i] if base.j_curves is not None else None) for i, t in enumerate(shown)
        )
        + "\n"
    )
    if adaptation is not None:
        tracker.log(adaptation_scalars(adaptation), step=step)
        adapt_png = run_dir / f"adaptation_{checkpoint}.png"
        plots.plot_adaptation(
            {checkpoint: adaptation}, adapt_png, title=f"{cfg.env.name}, {checkpoint}: in-context against parallel"
        )
        tracker.image("heldout/adaptation", adapt_png, step=step)
    curves_png = run_dir / f"success_vs_tokens_{checkpoint}.png"
    plots.plot_success_curves(
        {f"{label}x budget (C={curve_tokens(r.budget)})": r.curve for label, r in results.items()},
        curves_png,
        title=f"{cfg.env.name}, {checkpoint}",
    )
    tracker.image("heldout/success_vs_tokens_by_budget", curves_png, step=step)
    if len(results) > 1:
        budget_png = run_dir / f"budget_extrapolation_{checkpoint}.png"
        plots.plot_budget_extrapolation(results, k, budget_png, title=f"{cfg.env.name}, {checkpoint}")
        tracker.image("heldout/budget_extrapolation", budget_png, step=step)
    return results, figures, report
