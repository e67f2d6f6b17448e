"""Draw rules and :func:`sample`: ancestral draws from softmax(logits) (:func:`multinomial`),
counter-based ones (:func:`stream_uniforms`, :func:`draw_tokens`: token = inverse-CDF of
u(trial key, stream position), so a trial's tokens depend on its own key and logits only) or
the argmax, chosen by :func:`draw_rule`; :func:`sample` prefills a batch of token contexts and
runs the one decode loop (:func:`metarl_llm.rollout.decode.decode`) on it.

Sampling is plain ancestral sampling from softmax(logits) (temperature 1, no top-k,
no top-p), so the sampling distribution is the policy the trainer scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metarl_llm.rollout.decode import DecodeBatch, Draw, Sampled, cat_sampled, decode

__all__ = ["Sampled", "check_keys", "draw_rule", "draw_tokens", "multinomial", "sample", "stream_uniforms", "trial_keys"]


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


def draw_rule(
    generator: torch.Generator | None = None,
    keys: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
    greedy: bool = False,
) -> Draw:
    """The draw rule of a :func:`~metarl_llm.rollout.decode.decode` call.

    ``greedy``: the argmax (first index on ties). ``keys`` [R] (with ``start`` [R], each row's
    stream length before its first sampled token): counter-based inverse-CDF draws at
    ``stream_uniforms(keys, start + t)``, so a row's tokens depend on its key and logits only,
    never on the batch it shares or how the batch is chunked. Otherwise ancestral draws
    from ``generator`` (:func:`multinomial`), which depend on the batch's composition."""
    if greedy:
        return lambda logits, t: draw_tokens(logits, None)
    if keys is not None:
        if start is None:
            raise ValueError("draw_rule: counter-based draws need each row's start position")
        return lambda logits, t: draw_tokens(logits, stream_uniforms(keys, start + t))

    def ancestral(logits: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        logp = F.log_softmax(logits.float(), -1)
        tok = multinomial(logp.exp(), generator)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)

    return ancestral


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
    keys: torch.Tensor | None = None,
    value_head: torch.nn.Module | None = None,
    compile_backend: str | None = None,
) -> Sampled:
    """Sample continuations of token contexts with a KV cache, batched: each context is
    prefilled (left-padded) and :func:`~metarl_llm.rollout.decode.decode` continues it.

    Rows stop independently at any id in ``stop_ids`` (episode delimiter, EOS) or at
    their own ``max_new_tokens``. ``max_rows`` bounds the rows per forward pass (larger
    calls run in chunks). Draws (:func:`draw_rule`): ``greedy`` the argmax (log-probs are
    still reported); ``keys`` [N] int64 counter-based draws at each row's stream positions
    (then the result does not depend on ``max_rows``); else ancestral draws from
    ``generator``. ``value_head``: also each sampled token's value (``Sampled.values``).
    ``compile_backend``: compiled decoding (:class:`~metarl_llm.rollout.decode.DecodeBatch`).
    """
    n = len(contexts)
    limits = torch.as_tensor(max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * n)
    if n == 0:
        empty = torch.zeros((0, 0), dtype=torch.long)
        return Sampled(empty, empty.float(), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
    if any(len(c) == 0 for c in contexts):
        raise ValueError("sample: every context needs at least one token")
    if keys is not None:
        keys = torch.as_tensor(keys)
        if keys.shape != (n,) or keys.is_floating_point():
            raise ValueError(f"sample: keys must be an integer tensor of shape [{n}], got {tuple(keys.shape)} {keys.dtype}")
    if n > max_rows:
        parts = [
            sample(
                model,
                contexts[s : s + max_rows],
                limits[s : s + max_rows].tolist(),
                stop_ids,
                pad_id,
                generator,
                max_rows,
                greedy,
                None if keys is None else keys[s : s + max_rows],
                value_head,
                compile_backend,
            )
            for s in range(0, n, max_rows)
        ]
        return cat_sampled(parts, pad_id)
    device = next(model.parameters()).device
    capacity = max(len(c) for c in contexts) + int(limits.max())
    batch = DecodeBatch(model, device, n, capacity, value_head, compile_backend)
    logits = batch.feed(contexts, pad_id)
    start = torch.tensor([len(c) for c in contexts], device=device)
    draw = draw_rule(generator, None if keys is None else keys.long().to(device), start, greedy)
    return decode(batch, logits, limits, stop_ids, pad_id, draw)


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


SMALL_VOCAB = 4096  # vocabularies up to this size draw from one float64 CDF of the whole row
CDF_BLOCK = 1024  # larger ones: the CDF over blocks of this many ids, then within the chosen block
_WORK: dict = {}  # device -> the float32 workspace of the large-vocabulary draw, reused across steps


def draw_tokens(logits: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N], logprobs [N]) from logits [N, V]: inverse-CDF sampling at uniforms
    ``u`` [N] (float64): the first id whose cumulative probability reaches u; or the argmax
    (first index on ties) when ``u`` is None.

    Up to ``SMALL_VOCAB`` ids the CDF of the whole row is built in float64. A larger vocabulary
    (a production tokenizer's 152k) would make that four [N, V] temporaries per decoding step,
    two of them float64, allocated and freed every step; instead the unnormalised probabilities
    go into one preallocated float32 workspace, their sums per block of ``CDF_BLOCK`` ids (float64)
    pick the block and the CDF of that block alone picks the id: the same inverse-CDF rule, the
    sums in another order (differences at float64 rounding), one pass over the row besides the
    max."""
    if logits.shape[-1] > SMALL_VOCAB:
        return _draw_blocked(logits, u)
    logp = F.log_softmax(logits.float(), -1)
    if u is None:
        tok = logp.argmax(-1)
    else:
        cdf = logp.double().exp().cumsum(-1)
        tok = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def _workspace(n: int, width: int, device: torch.device) -> torch.Tensor:
    buf = _WORK.get(device)
    if buf is None or buf.numel() < n * width:
        buf = torch.empty(n * width, dtype=torch.float32, device=device)
        _WORK[device] = buf
    return buf[: n * width].view(n, width)


def _draw_blocked(logits: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`draw_tokens` for a large vocabulary (see there)."""
    x = logits.float()
    n, v = x.shape
    m = x.amax(-1, keepdim=True)
    nb = -(-v // CDF_BLOCK)
    work = _workspace(n, nb * CDF_BLOCK, x.device)
    torch.sub(x, m, out=work[:, :v]).exp_()  # exp(x - max): the unnormalised probabilities
    work[:, v:].zero_()
    blocks = work.view(n, nb, CDF_BLOCK).sum(-1, dtype=torch.float64)  # [N, nb]
    block_cdf = blocks.cumsum(-1)
    total = block_cdf[:, -1]
    if u is None:
        tok = x.argmax(-1)
    else:
        target = u.to(x.device, torch.float64) * total
        bi = torch.searchsorted(block_cdf, target[:, None]).squeeze(-1).clamp(max=nb - 1)
        before = torch.where(bi > 0, block_cdf.gather(-1, (bi - 1).clamp(min=0)[:, None]).squeeze(-1), 0.0)
        inner = work.view(n, nb, CDF_BLOCK)[torch.arange(n, device=x.device), bi].double().cumsum(-1)  # [N, block]
        j = torch.searchsorted(inner, (target - before)[:, None]).squeeze(-1).clamp(max=CDF_BLOCK - 1)
        tok = (bi * CDF_BLOCK + j).clamp(max=v - 1)
    lse = m.squeeze(-1) + total.log().float()
    return tok, x.gather(-1, tok[:, None]).squeeze(-1) - lse


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
