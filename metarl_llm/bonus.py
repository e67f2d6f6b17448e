"""Dense per-episode bonuses (DESIGN.md section 6).

``none`` gives zeros. ``info_gain`` gives MRT's progress bonus

    bonus_j = alpha * (J(z_0..j) - J(z_0..j-1)),

where J(prefix) is the meta-prover's success after the prefix: append the
forced-answer text, let the policy answer, score the answer with the environment's
``score``. Progress is potential-based, so the bonuses of a trial telescope to
``alpha * (J_last - J_empty)``: padding a trial with empty episodes earns nothing.

Boundaries: J_empty is measured after the prompt; J_j after every episode j that
is not the final-answer episode (the outcome already rewards that one).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from metarl_llm.config import BonusConfig
from metarl_llm.rollout import StreamCodec, Trial, sample

Estimator = Callable[..., list[np.ndarray]]
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    def wrap(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        return fn

    return wrap


def boundary_prefixes(trial: Trial) -> list[int]:
    """Stream lengths of the prefixes at which J is measured: after the prompt, then
    after each episode before the final-answer one."""
    prompt_len = trial.action.index(1) if 1 in trial.action else len(trial.ids)
    n = trial.answer_episode if trial.answer_episode >= 0 else len(trial.episode_ends)
    return [prompt_len] + [trial.episode_ends[j] + 1 for j in range(n)]


@register_estimator("sample")
def estimate_sample(
    model: torch.nn.Module,
    codec: StreamCodec,
    trials: list[Trial],
    *,
    num_samples: int,
    answer_max_tokens: int,
    generator: torch.Generator | None = None,
) -> list[np.ndarray]:
    """J at every boundary of every trial: the mean score of ``num_samples`` meta-prover
    answers (all boundaries of all trials in one batched sampling call)."""
    contexts, owners = [], []
    boundaries = [boundary_prefixes(t) for t in trials]
    for i, (t, ends) in enumerate(zip(trials, boundaries)):
        for b, end in enumerate(ends):
            ctx = t.ids[:end] + codec.forced_prefix(t.ids[:end])
            for _ in range(num_samples):
                contexts.append(ctx)
                owners.append((i, b))
    out = sample(model, contexts, answer_max_tokens, codec.stop_ids, codec.pad_id, generator)
    sums = [np.zeros(len(ends)) for ends in boundaries]
    for row, (i, b) in enumerate(owners):
        text = codec.episode_text(out.tokens[row, : int(out.lengths[row])].tolist())
        sums[i][b] += trials[i].env.score(text)
    return [s / num_samples for s in sums]


def progress(j_values: np.ndarray, clip: float | None = None) -> np.ndarray:
    """Per-episode progress J_j - J_{j-1} from J at [empty, after ep 0, after ep 1, ...]."""
    p = np.diff(np.asarray(j_values, dtype=np.float64))
    return np.clip(p, -clip, clip) if clip is not None else p


def episode_bonuses(
    cfg: BonusConfig,
    model: torch.nn.Module,
    codec: StreamCodec,
    trials: list[Trial],
    answer_max_tokens: int,
    generator: torch.Generator | None = None,
) -> tuple[list[list[float]], list[np.ndarray] | None]:
    """Bonus of each episode of each trial, and the J curves they came from (None for ``none``)."""
    if cfg.name == "none":
        return [[] for _ in trials], None
    if cfg.name != "info_gain":
        raise ValueError(f"bonus.name={cfg.name!r}; expected 'none' or 'info_gain'")
    if cfg.estimator not in ESTIMATORS:
        raise ValueError(f"bonus.estimator={cfg.estimator!r} is not available; choose from {sorted(ESTIMATORS)}")
    curves = ESTIMATORS[cfg.estimator](
        model, codec, trials, num_samples=cfg.num_samples, answer_max_tokens=answer_max_tokens, generator=generator
    )
    bonuses = [list(cfg.alpha * progress(c, cfg.clip)) for c in curves]
    return bonuses, curves
