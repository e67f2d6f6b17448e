"""Sampling: ancestral draws from softmax(logits), plain (:func:`multinomial`) or counter-based
(:func:`stream_uniforms`, :func:`draw_tokens`: token = inverse-CDF of u(trial key, stream position),
so a trial's tokens depend on its own key and logits only), and :func:`sample`, the
KV-cached decode loop that continues a batch of token prefixes.

Sampling is plain ancestral sampling from softmax(logits) (temperature 1, no top-k,
no top-p), so the sampling distribution is the policy the trainer scores.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from metarl_llm.core.batch import pad_rows
from metarl_llm.rollout.kv_cache import growing_cache


class Sampled(NamedTuple):
    """Output of :func:`sample`; N rows.

    tokens   [N, L] sampled ids, ``pad_id`` after each row's end.
    logprobs [N, L] log pi of each sampled token under the sampling forward pass (0 after the end).
    lengths  [N]    tokens per row, the stop token included.
    stopped  [N]    True if the row ended on a stop id (False: cut by its length limit).
    values   [N, L] the critic's value of each sampled token from the sampling forward's last
                    hidden state (0 after the end); None unless the engine was given a value head.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor
    values: torch.Tensor | None = None


def multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of ``probs`` [N, V] (unnormalised is fine) -> [N] long.

    ``generator`` may live on another device than ``probs`` (the trainer's CPU generator
    with a CUDA policy): the N uniforms are then drawn from it and inverted through the
    rows' CDF on ``probs``' device; on one device this is ``torch.multinomial``."""
    if generator is None or generator.device.type == probs.device.type:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    u = torch.rand(probs.shape[0], generator=generator, device=generator.device).to(probs.device)
    cdf = probs.cumsum(-1)
    # right=True: the first token whose CDF exceeds u * total, so a zero-probability token is never drawn (even at u = 0).
    return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    contexts: list[list[int]],
    max_new_tokens: int | list[int],
    stop_ids: torch.Tensor,
    pad_id: int,
    generator: torch.Generator | None = None,
    max_rows: int = 512,
    greedy: bool = False,
) -> Sampled:
    """Sample continuations of token contexts with a KV cache, batched (``greedy``: the
    argmax token instead, first index on ties; log-probs are still reported).

    Rows stop independently at any id in ``stop_ids`` (episode delimiter, EOS) or at
    their own ``max_new_tokens``; the batch runs until every row has stopped. Contexts
    are left-padded internally; ``max_rows`` bounds the rows per forward pass.
    """
    n = len(contexts)
    limits = torch.as_tensor(max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * n)
    if n == 0:
        empty = torch.zeros((0, 0), dtype=torch.long)
        return Sampled(empty, empty.float(), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
    if any(len(c) == 0 for c in contexts):
        raise ValueError("sample: every context needs at least one token")
    if n > max_rows:
        parts = [
            sample(model, contexts[s : s + max_rows], limits[s : s + max_rows].tolist(), stop_ids, pad_id, generator, max_rows, greedy)
            for s in range(0, n, max_rows)
        ]
        width = max(p.tokens.shape[1] for p in parts)
        pad = lambda t, v: F.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
        return Sampled(
            torch.cat([pad(p.tokens, pad_id) for p in parts]),
            torch.cat([pad(p.logprobs, 0.0) for p in parts]),
            torch.cat([p.lengths for p in parts]),
            torch.cat([p.stopped for p in parts]),
        )
    device = next(model.parameters()).device
    limits = limits.to(device)
    stop_ids = stop_ids.to(device)
    width = max(len(c) for c in contexts)
    ids, mask = pad_rows(contexts, pad_id, width=width, left=True)
    ids, mask = ids.to(device), mask.to(device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    max_len = int(limits.max())

    out = model(input_ids=ids, attention_mask=mask, position_ids=position, cache=growing_cache(model, width + max_len),
                use_cache=True)
    cache, logits = out.cache, out.logits[:, -1]
    next_pos = position[:, -1:] + 1
    tokens = torch.full((n, max_len), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((n, max_len), dtype=torch.float32, device=device)
    done = limits <= 0
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    for t in range(max_len):
        logp = F.log_softmax(logits.float(), -1)
        tok = logp.argmax(-1) if greedy else multinomial(logp.exp(), generator)
        live = ~done
        tokens[:, t] = torch.where(live, tok, pad_id)
        logprobs[:, t] = torch.where(live, logp.gather(-1, tok[:, None]).squeeze(-1), 0.0)
        lengths += live.long()
        hit = live & torch.isin(tok, stop_ids)
        stopped |= hit
        done = done | hit | (lengths >= limits)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], 1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
        next_pos = next_pos + 1
    width = int(lengths.max())
    return Sampled(tokens[:, :width].cpu(), logprobs[:, :width].cpu(), lengths.cpu(), stopped.cpu())


# ------------------------------------------------------------------ randomness

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, "lowbias32") on int64 tensors holding
    values in [0, 2^32); products wrap in int64, and only their low 32 bits are kept."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def stream_uniforms(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), float64, one per (trial key, stream position) pair.

    keys [N] int64 (any value; 32 bits are used), positions [N] int64 -> [N]. The same
    pair always gives the same number: the draw for a token is fixed by the trial and
    the position it is sampled at, whatever the batching.
    """
    k, p = keys.long(), positions.long()
    hi = _mix32(_mix32(k ^ 0x9E3779B9) ^ _mix32(p + 0x632BE5AB))  # two independent 32-bit hashes of the pair
    lo = _mix32(_mix32(k ^ 0x5BD1E995) ^ _mix32(p + 0x27D4EB2F) ^ 0x165667B1)
    return (hi.double() * 2.0**32 + lo.double() + 0.5) / 2.0**64


def draw_tokens(logits: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N], logprobs [N]) from logits [N, V]: inverse-CDF sampling at uniforms
    ``u`` [N] (float64), or the argmax (first index on ties) when ``u`` is None."""
    logp = F.log_softmax(logits.float(), -1)
    if u is None:
        tok = logp.argmax(-1)
    else:
        cdf = logp.double().exp().cumsum(-1)
        tok = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def trial_keys(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """[n] int64 sampling keys, one per trial, drawn from ``generator`` (CPU)."""
    return torch.randint(0, 2**31 - 1, (n,), generator=generator, dtype=torch.long)


def check_keys(keys: torch.Tensor | None, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """The given sampling keys (checked: [n] integers) or ``n`` fresh ones from ``generator``."""
    if keys is None:
        return trial_keys(n, generator)
    keys = torch.as_tensor(keys)
    if keys.shape != (n,) or keys.is_floating_point():
        raise ValueError(f"run_trials: keys must be an integer tensor of shape [{n}], got {tuple(keys.shape)} {keys.dtype}")
    return keys.long().cpu()
