"""The ``reencode`` engine: episode by episode, every trial's whole history prefilled again
before each episode (a KV cache inside the episode), with the same counter-based draws as
``cached``, so both give the same trials. Kept as the reference the cached engine is tested against.
"""

from __future__ import annotations

import torch

from metarl_llm.core.trial import StreamCodec
from metarl_llm.rollout.base import Engine, episode_limit, finish_round, register_engine, start_trials
from metarl_llm.rollout.cached import _Batch
from metarl_llm.rollout.sampling import Sampled, check_keys, draw_tokens, stream_uniforms

# ------------------------------------------------------------------ re-encoding engines


@register_engine("reencode")
class ReencodeEngine(Engine):
    """Episode by episode; every history is prefilled again before each episode.

    Draws the same counter-based uniforms as ``cached``, so both engines give the same
    trials (up to floating-point ties)."""

    supports_values = True

    @torch.no_grad()
    def run_trials(self, model, codec, envs, resets, groups, budget, generator=None, keep_cache=False, greedy=False, keys=None,
                   value_head=None):
        trials = start_trials(codec, envs, resets, groups, budget)
        keys = check_keys(keys, len(trials), generator)
        live = list(range(len(trials)))
        forced = [False] * len(trials)
        for _round in range(budget.max_episodes + 2):  # bounded: the env forces an answer after max_episodes
            if not live:
                return trials
            limits = [episode_limit(trials[i], forced[i], budget) for i in live]
            out = _sample_keyed(model, [trials[i].ids for i in live], limits, codec, keys[live], greedy, value_head)
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


def _sample_keyed(model, contexts: list[list[int]], limits: list[int], codec: StreamCodec, keys: torch.Tensor, greedy: bool,
                  value_head: torch.nn.Module | None = None):
    """:func:`rollout.sample` with counter-based draws: a fresh prefill of every context
    (with ``value_head``: the sampled tokens' values too)."""
    device = next(model.parameters()).device
    n = len(contexts)
    batch = _Batch(model, device, n, capacity=max(len(c) for c in contexts) + max(limits), value_head=value_head)
    logits = batch.feed(contexts, codec.pad_id)
    lim = torch.tensor(limits, device=device)
    start = torch.tensor([len(c) for c in contexts], device=device)
    keys = keys.to(device)
    stop_ids = codec.stop_ids.to(device)
    width = int(lim.max())
    tokens = torch.full((n, width), codec.pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((n, width), dtype=torch.float32, device=device)
    values = torch.zeros((n, width), dtype=torch.float32, device=device) if value_head is not None else None
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    done = lim <= 0
    for t in range(width):
        tok, lp = draw_tokens(logits, None if greedy else stream_uniforms(keys, start + t))
        live = ~done
        tokens[:, t] = torch.where(live, tok, codec.pad_id)
        logprobs[:, t] = torch.where(live, lp, 0.0)
        if values is not None:
            values[:, t] = torch.where(live, batch.values, 0.0)
        lengths += live.long()
        hit = live & torch.isin(tok, stop_ids)
        stopped |= hit
        done = done | hit | (lengths >= lim)
        if bool(done.all()):
            break
        logits = batch.feed(tok[:, None], codec.pad_id)

    w = int(lengths.max())
    return Sampled(tokens[:, :w].cpu(), logprobs[:, :w].cpu(), lengths.cpu(), stopped.cpu(),
                   values[:, :w].cpu() if values is not None else None)
