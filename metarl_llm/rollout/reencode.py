"""The ``reencode`` engine: episode by episode, every trial's whole history prefilled again
before each episode (a KV cache inside the episode), with the same counter-based draws as
``cached``, so both give the same trials. Kept as the reference the cached engine is tested against.
"""

from __future__ import annotations

import torch

from metarl_llm.rollout.base import Engine, episode_limit, finish_round, register_engine, start_trials
from metarl_llm.rollout.sampling import check_keys, sample

# ------------------------------------------------------------------ re-encoding engines


@register_engine("reencode")
class ReencodeEngine(Engine):
    """Episode by episode; every history is prefilled again before each episode.

    Draws the same counter-based uniforms as ``cached``, so both engines give the same
    trials (up to floating-point ties)."""

    supports_values = True

    @torch.no_grad()
    def run_trials(
        self,
        model,
        codec,
        envs,
        resets,
        groups,
        budget,
        generator=None,
        keep_cache=False,
        greedy=False,
        keys=None,
        value_head=None,
    ):
        trials = start_trials(codec, envs, resets, groups, budget)
        keys = check_keys(keys, len(trials), generator)
        live = list(range(len(trials)))
        forced = [False] * len(trials)
        for _round in range(budget.max_episodes + 2):  # bounded: the env forces an answer after max_episodes
            if not live:
                return trials
            limits = [episode_limit(trials[i], forced[i], budget, codec) for i in live]
            out = sample(
                model,
                [trials[i].ids for i in live],
                limits,
                codec.stop_ids,
                codec.pad_id,
                max_rows=self.max_rows,
                greedy=greedy,
                keys=keys[live],
                value_head=value_head,
                compile_backend=self.compile_backend,
            )
            results = {i: _episode(out, row) for row, i in enumerate(live)}
            live = finish_round(trials, envs, codec, results, live, forced, budget)
        if live:
            raise RuntimeError(f"{len(live)} trial(s) did not terminate within max_episodes+2 rounds")
        return trials


def _episode(out, row: int) -> tuple:
    """Row ``row`` of a :class:`Sampled`: (tokens, log-probs[, values]) as lists, for :func:`finish_round`."""
    k = int(out.lengths[row])
    res = (out.tokens[row, :k].tolist(), out.logprobs[row, :k].tolist())
    return res if out.values is None else (*res, out.values[row, :k].tolist())
