"""Held-out evaluation at the training budget.

Sampled, not greedy (FINDINGS.md: greedy success saturates while sampled success is
low), with several trials per problem. Reports:

- ``success``: mean outcome over all held-out trials;
- ``pass@k``: share of problems solved by at least one of their k trials;
- ``tokens_per_trial``, ``episodes_per_trial``: policy tokens and episodes spent;
- ``J/boundary_b``: the meta-prover's success after the prompt (b=0) and after each
  episode (b=j+1), averaged over trials that reached that boundary;
- ``success_by_episode_j``: share of trials whose final answer came at episode <= j
  and was correct.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metarl_llm.bonus import JOptions, boundary_prefixes, estimate_sample
from metarl_llm.config import BudgetConfig, EvalConfig
from metarl_llm.rollout import StreamCodec, Trial, run_trials


@dataclass
class EvalResult:
    metrics: dict[str, float]
    trials: list[Trial]
    j_curves: list[np.ndarray]


def heldout_resets(num_problems: int, samples: int) -> tuple[list[dict], list[int]]:
    """Reset arguments for problems 0..num_problems-1 of the held-out split, ``samples`` each."""
    resets = [{"options": {"index": p}} for p in range(num_problems) for _ in range(samples)]
    groups = [p for p in range(num_problems) for _ in range(samples)]
    return resets, groups


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, codec: StreamCodec, envs: list, budget: BudgetConfig, cfg: EvalConfig,
    generator: torch.Generator,
) -> EvalResult:
    """Play ``cfg.samples_per_problem`` trials on each of ``cfg.num_problems`` held-out problems."""
    n = cfg.num_problems * cfg.samples_per_problem
    if len(envs) < n:
        raise ValueError(f"evaluate: {len(envs)} environments for {n} trials")
    was_training = model.training
    model.eval()
    resets, groups = heldout_resets(cfg.num_problems, cfg.samples_per_problem)
    trials = run_trials(model, codec, envs[:n], resets, groups, budget, generator)
    curves = estimate_sample(
        model, codec, trials, JOptions(num_samples=cfg.prover_samples, answer_max_tokens=budget.answer_max_tokens, generator=generator)
    )
    model.train(was_training)
    outcome = np.array([t.outcome for t in trials])
    solved = outcome.reshape(cfg.num_problems, cfg.samples_per_problem).max(1) >= 1.0
    metrics: dict[str, float] = {
        "success": float(outcome.mean()),
        f"pass@{cfg.samples_per_problem}": float(solved.mean()),
        "tokens_per_trial": float(np.mean([t.policy_tokens for t in trials])),
        "episodes_per_trial": float(np.mean([len(t.episode_texts) for t in trials])),
        "forced_answer_rate": float(np.mean([t.forced for t in trials])),
    }
    width = max(len(c) for c in curves)
    for b in range(width):
        vals = [c[b] for c in curves if len(c) > b]
        metrics[f"J/boundary_{b}"] = float(np.mean(vals))
    for j in range(budget.max_episodes + 1):
        metrics[f"success_by_episode_{j}"] = float(
            np.mean([t.outcome >= 1.0 and 0 <= t.answer_episode <= j for t in trials])
        )
    return EvalResult(metrics, trials, curves)


def success_vs_tokens(trials: list[Trial], curves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Points (policy tokens spent at a boundary, J there) over all trials, for plotting."""
    xs, ys = [], []
    for t, c in zip(trials, curves):
        ends = boundary_prefixes(t)
        spent = [sum(t.action[:e]) for e in ends]
        xs += spent
        ys += list(c)
    return np.array(xs, dtype=float), np.array(ys, dtype=float)
