"""The engines registered by name, built from ``rollout`` config (:func:`engine_from_config`), and
:func:`run_trials`, the one call the jobs make to play trials; :func:`heldout_resets` gives the
reset arguments of held-out problems.
"""

from __future__ import annotations

import logging

import torch

from metarl_llm.config import (
    BudgetConfig,
)
from metarl_llm.core.trial import StreamCodec, Trial
from metarl_llm.rollout import cached, hf_generate, reencode  # noqa: F401  (each registers its engine)
from metarl_llm.rollout.base import ENGINES, Engine

log = logging.getLogger(__name__)


def get_engine(name: str, **options) -> "Engine":
    """A new engine registered as ``name``; ``options`` go to its constructor (every engine takes
    ``max_rows`` and ``bucket_tokens``, :class:`Engine`). This module imports every engine
    shipped, so all are registered."""
    return ENGINES.lookup(name)(**options)


def run_trials(
    model: torch.nn.Module,
    codec: StreamCodec,
    envs: list,
    resets: list[dict],
    groups: list[int],
    budget: BudgetConfig,
    generator: torch.Generator | None = None,
    engine="cached",
    keep_cache: bool = False,
    keys: torch.Tensor | None = None,
    value_head: torch.nn.Module | None = None,
    greedy: bool = False,
) -> list[Trial]:
    """Play one trial in each environment, all trials batched.

    ``envs`` are Gymnasium environments (as made by ``gymnasium.make``); ``resets``
    the keyword arguments of each ``reset`` (``seed``, ``options``); ``groups`` the
    problem group of each trial (trials of one problem share it). ``engine`` is a
    :class:`metarl_llm.rollout.base.Engine` or the name of one (``cached``: the KV cache kept
    across episodes; ``reencode``; ``hf_generate``); ``keep_cache`` keeps each trial's KV cache
    on ``trial.cache`` for the meta-prover (``cached`` only); ``keys`` [N] fixes the
    trials' sampling keys (default: drawn from ``generator``). ``value_head``: a shared
    critic's head (``ActorCritic.value_head``, [..., H] -> [..., 1]); the engine then also
    applies it to the last hidden state of every forward pass it samples from and stores
    each action token's value on ``Trial.sample_values`` (the values ``ActorCritic.score``
    gives, without its forward pass); an engine that cannot (``supports_values`` False)
    is an error. ``greedy``: the argmax token at every step instead of a draw.

    Budget: an episode ends at the delimiter, EOS or ``max_episode_tokens``; the trial
    ends when the environment terminates it (a committed answer). When the policy
    emits EOS without committing, spends ``max_total_tokens``, or the environment
    reaches ``max_episodes``, the forced-answer text is inserted and the next episode
    (at most ``answer_max_tokens``) is the final answer.
    """

    if isinstance(engine, str):
        engine = get_engine(engine)
    extra = {}
    if value_head is not None:
        if not getattr(engine, "supports_values", False):
            raise ValueError(
                f"rollout engine {getattr(engine, 'name', type(engine).__name__)!r} cannot compute the "
                f"critic's values while sampling (supports_values is False); score them with a forward pass"
            )
        extra["value_head"] = value_head
    return engine.run_trials(
        model, codec, envs, resets, groups, budget, generator, keep_cache=keep_cache, greedy=greedy, keys=keys, **extra
    )


def engine_from_config(cfg) -> "Engine":
    """The engine of a RolloutConfig (``rollout.*``): ``rollout.engine`` with ``rollout.max_rows``,
    ``rollout.prefill_bucket_tokens`` and ``rollout.compile_decode``."""
    return get_engine(
        cfg.engine, max_rows=cfg.max_rows, bucket_tokens=cfg.prefill_bucket_tokens, compile_decode=cfg.compile_decode
    )


def heldout_resets(num_problems: int, samples: int) -> tuple[list[dict], list[int]]:
    """Reset arguments for problems 0..num_problems-1 of the held-out split, ``samples``
    each (problem-major), and the problem index of each: two lists of length
    num_problems x samples."""
    resets = [{"options": {"index": p}} for p in range(num_problems) for _ in range(samples)]
    groups = [p for p in range(num_problems) for _ in range(samples)]
    return resets, groups
