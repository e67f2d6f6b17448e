"""The one decode loop (:func:`decode`) and the batch of streams it runs on (:class:`DecodeBatch`).

Every place that samples a continuation token by token runs :func:`decode` on a
:class:`DecodeBatch`: :func:`metarl_llm.rollout.sampling.sample` (fresh prefixes: the
``reencode`` engine's episodes, the meta-prover's answers without a kept cache, ARC's
predictions) and :meth:`metarl_llm.rollout.cached.CachedEngine.continue_prefixes` (the
meta-prover's answers continued from kept KV caches). They differ only in how the batch was
filled and in the draw rule (:func:`metarl_llm.rollout.sampling.draw_rule`). The cached
engine's own loop is not a plain decode: its rows end episodes, step environments and feed
observations while the other rows sample, so it keeps its loop and shares the batch.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from metarl_llm.core.batch import length_buckets, pad_rows
from metarl_llm.models import head_values
from metarl_llm.rollout.kv_cache import (
    TrialCache,
    _GrowingLayer,
    growing_cache,
    last_logits_only,
    lm_head_input,
    static_cache,
    static_capacity,
)

log = logging.getLogger(__name__)


class Sampled(NamedTuple):
    """Output of :func:`decode` (and of :func:`metarl_llm.rollout.sampling.sample`); N rows.

    tokens   [N, L] sampled ids, ``pad_id`` after each row's end.
    logprobs [N, L] log pi of each sampled token under the sampling forward pass (0 after the end).
    lengths  [N]    tokens per row, the stop token included.
    stopped  [N]    True if the row ended on a stop id (False: cut by its length limit).
    values   [N, L] the critic's value of each sampled token from the sampling forward's last
                    hidden state (0 after the end); None unless the batch was given a value head.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor
    values: torch.Tensor | None = None


# A draw rule: (logits [R, V] of the rows' next token, t = tokens sampled so far in this decode) ->
# (tokens [R] long, their log-probs [R] float32 under softmax(logits)).
Draw = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]

# One compiled forward per (model class, torch.compile backend), shared by every DecodeBatch: the
# model is an argument (dynamo guards on it), so no compiled object keeps a model alive.
_COMPILED: dict[tuple[type, str], Callable] = {}
_COMPILE_LOGGED: set[int] = set()  # id() of each compiled forward whose first call (the compile) was logged


def compiled_forward(model: torch.nn.Module, backend: str) -> Callable:
    """``torch.compile`` of ``type(model).forward`` with ``backend`` (``inductor``: generated kernels;
    ``eager``: tracing only, for tests), called as ``fn(model, **inputs)``. Shapes are static at first;
    a batch size or cache capacity that changes makes dynamo recompile once with that dimension
    symbolic, after which one graph serves them all."""
    key = (type(model), backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(type(model).forward, backend=backend)
    return _COMPILED[key]


class DecodeBatch:
    """A batch of token streams being decoded: a batched KV cache and its bookkeeping (the live
    rows of a :class:`~metarl_llm.rollout.cached.CachedEngine` call, or the rows of :func:`decode`).

    cache: a :func:`growing_cache` over [R, H, W, D]; mask [R, W] (1 on real tokens, 0 on
    padding, which may sit anywhere), a view of a preallocated [R, capacity] buffer;
    next_pos [R] position id of each row's next token. ``rows`` maps a batch row to its
    trial index. ``capacity``: columns allocated at first (both grow when needed).
    ``value_head``: when given, every :meth:`feed` also sets ``values`` [R] float32, the
    head on the last-layer hidden state at the position of the returned logits (the
    critic's value of the token sampled from them); ``values`` is None otherwise.

    ``compile_backend``: compiled decoding (``rollout.compile_decode``). The cache is then a static
    one (:func:`static_cache`: [R, H, C, D] buffers of a capacity C rounded to a multiple of 64,
    the mask [R, C] attended whole, growing only by reallocation), and every one-token step
    (:meth:`feed` with a tensor, the decoding path) runs ``torch.compile`` of the model's forward
    with that backend (:func:`compiled_forward`); blocks (prompts, observations) run eagerly on the
    same cache. The tokens are those of the eager path up to float rounding. Not with a value head,
    nor for models with other layers than full attention: those decode eagerly.
    """

    def __init__(
        self,
        model,
        device,
        n: int,
        capacity: int = 0,
        value_head: torch.nn.Module | None = None,
        compile_backend: str | None = None,
    ):
        self.model, self.device = model, device
        self.value_head = value_head
        self.values: torch.Tensor | None = None
        # The LM head on the last position only; with a value head, that head's input (the
        # last layer's normed hidden state) is captured by a hook, so no other layer's
        # hidden states are kept (output_hidden_states would hold every layer's for a prefill).
        self._forward_kwargs = last_logits_only(model)
        self._step = None  # the compiled one-token forward (compile_backend), None: eager
        cache = None
        if compile_backend is not None and value_head is None:
            capacity = static_capacity(capacity)
            cache = static_cache(model, capacity)
            if cache is not None:
                self._step = compiled_forward(model, compile_backend)
        self.cache = cache if cache is not None else growing_cache(model, capacity)
        self._mask = torch.zeros((n, capacity), dtype=torch.long, device=device)
        self.width = 0
        self.next_pos = torch.zeros(n, dtype=torch.long, device=device)
        self.rows: list[int] = list(range(n))

    @property
    def static(self) -> bool:
        """Whether the cache has a fixed capacity attended whole (compiled decoding)."""
        return self._step is not None

    @property
    def mask(self) -> torch.Tensor:
        """[R, W] 1 on real tokens: W = the columns fed so far, or the whole capacity of a static
        cache (its columns after the fed ones are 0)."""
        return self._mask if self.static else self._mask[:, : self.width]

    def load(self, data: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, next_pos: torch.Tensor, room: int) -> None:
        """Start an empty batch from given cache columns: ``data`` one (keys, values) [R, H, W, D]
        pair per layer, ``mask`` [R, W] (1 on real tokens), ``next_pos`` [R] each row's next
        position id; room for ``room`` more columns before the cache grows."""
        if self.width:
            raise RuntimeError("load: the batch already holds tokens")
        w = mask.shape[1]
        capacity = w + room
        if self.static:
            capacity = static_capacity(capacity)
            self.cache = static_cache(self.model, capacity)
            for lay, (k, v) in zip(self.cache.layers, data):
                lay.load(k, v)
        else:
            self.cache = growing_cache(self.model, capacity, data=data)
        self._mask = F.pad(mask.to(self.device, torch.long), (0, capacity - w))
        self.width = w
        self.next_pos = next_pos.to(self.device).clone()

    def _append_mask(self, block_mask: torch.Tensor) -> None:
        w = block_mask.shape[1]
        if self.width + w > self._mask.shape[1]:
            columns = max(self.width + w, 2 * self._mask.shape[1])
            if self.static:  # the cache's buffers and the mask keep one capacity
                columns = static_capacity(columns)
                for lay in self.cache.layers:
                    lay.grow(columns)
            grown = self._mask.new_zeros((self._mask.shape[0], columns))
            grown[:, : self.width] = self._mask[:, : self.width]
            self._mask = grown
        self._mask[:, self.width : self.width + w] = block_mask
        self.width += w

    def feed(self, blocks: list[list[int]] | torch.Tensor, pad_id: int) -> torch.Tensor:
        """Append each row's tokens to its stream; returns the next-token logits [R, V]
        after each row's last token (and, with a value head, sets ``values`` [R] at the
        same positions). ``blocks``: one list of >= 1 ids per row, or an [R, 1] tensor of
        one token per row (the decoding fast path, no Python per row)."""
        if torch.is_tensor(blocks):
            ids = blocks.to(self.device)
            self._append_mask(torch.ones_like(ids))
            pos = self.next_pos[:, None]
            self.next_pos = self.next_pos + 1
        else:
            width = max(len(b) for b in blocks)
            # left-padded within the block: every row's last token is in the last column
            ids, block_mask = pad_rows(blocks, pad_id, width=width, left=True)
            ids, block_mask = ids.to(self.device), block_mask.to(self.device)
            pos = self.next_pos[:, None] + (block_mask.cumsum(-1) - 1).clamp(min=0)
            self._append_mask(block_mask)
            self.next_pos = self.next_pos + block_mask.sum(-1)
        if self._step is not None and torch.is_tensor(blocks):
            out = self._compiled_step(ids, pos)
            return out.logits[:, -1]
        with lm_head_input(self.model, self.value_head is not None) as seen:
            out = self.model(
                input_ids=ids,
                attention_mask=self.mask,
                position_ids=pos,
                cache=self.cache,
                use_cache=True,
                **self._forward_kwargs,
            )
        self.cache = out.cache
        if self.value_head is not None:  # the last position only (blocks are left-padded: each row's last token)
            self.values = head_values(self.value_head, seen[0][:, -1])
        return out.logits[:, -1]

    def _compiled_step(self, ids: torch.Tensor, pos: torch.Tensor):
        first = id(self._step) not in _COMPILE_LOGGED
        t0 = time.perf_counter()
        out = self._step(
            self.model,
            input_ids=ids,
            attention_mask=self._mask,
            position_ids=pos,
            cache=self.cache,
            use_cache=True,
            **self._forward_kwargs,
        )
        if first:  # the first call compiles: say how long it took (later shapes may compile once more)
            _COMPILE_LOGGED.add(id(self._step))
            log.info("compiled decode step for %s: first call %.1f s", type(self.model).__name__, time.perf_counter() - t0)
        return out

    def prefill(self, contexts: list[list[int]], pad_id: int, bucket_tokens: int = 0) -> torch.Tensor:
        """The first :meth:`feed` of an empty batch, with contexts of similar length prefilled
        together (:func:`metarl_llm.core.batch.length_buckets`, cost ``bucket_tokens`` padded
        positions per pass; 0: one pass): each group is trimmed to its own longest context
        and the groups' caches are joined, left-padded to the longest context, so that short
        prompts are not padded to the longest in the prefill. Same cache and logits as one
        pass up to float rounding. Models with other cache layers than full attention
        (sliding windows, ...) get one pass."""

        if self.width or self.cache.get_seq_length():
            raise RuntimeError("prefill: the batch already holds tokens")
        n, longest = len(contexts), max(len(c) for c in contexts)
        parts = length_buckets([len(c) for c in contexts], bucket_tokens)
        layers = self.cache.layers
        if len(parts) == 1 or not layers or not all(isinstance(lay, _GrowingLayer) for lay in layers):
            return self.feed(contexts, pad_id)
        logits, keys, values = None, [], []
        head_out = None  # the value head's outputs (with a value head)
        mask = torch.zeros((n, longest), dtype=torch.long, device=self.device)
        for part in parts:
            rows = part.tolist()
            sub = DecodeBatch(self.model, self.device, len(rows), value_head=self.value_head)
            out = sub.feed([contexts[i] for i in rows], pad_id)
            idx = part.to(self.device)
            if sub.values is not None:
                if head_out is None:
                    head_out = sub.values.new_empty(n)
                head_out[idx] = sub.values
            if logits is None:
                logits = out.new_empty((n, out.shape[-1]))
                for lay in sub.cache.layers:
                    keys.append(lay.keys.new_zeros((n, lay.keys.shape[1], longest, lay.keys.shape[3])))
                    values.append(lay.values.new_zeros((n, lay.values.shape[1], longest, lay.values.shape[3])))
            logits[idx] = out
            w = sub.width
            for k, v, lay in zip(keys, values, sub.cache.layers):
                k[idx, :, longest - w :] = lay.keys
                v[idx, :, longest - w :] = lay.values
            mask[idx, longest - w :] = sub.mask
            self.next_pos[idx] = sub.next_pos
        capacity = max(self._mask.shape[1], longest)
        self.cache = growing_cache(self.model, capacity, data=list(zip(keys, values)))
        self._mask = F.pad(mask, (0, capacity - longest))
        self.width = longest
        self.values = head_out
        return logits

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (a [R'] index tensor), in that order."""
        self.cache.batch_select_indices(rows.to(self.device))
        self._mask = self._mask[rows]
        self.next_pos = self.next_pos[rows]
        self.rows = [self.rows[r] for r in rows.tolist()]  # one host copy, not one sync per row

    def drop_last(self, r: int, m: int) -> None:
        """Forget row ``r``'s last ``m`` fed tokens: their cache columns are masked out and the
        row's next token takes the first of their positions (a stream cut back after generation)."""
        if m <= 0:
            return
        cols = self.mask[r].nonzero().flatten()[-m:]
        if len(cols) != m:
            raise RuntimeError(f"drop_last: row {r} holds {len(cols)} tokens, not {m}")
        self._mask[r, cols] = 0
        self.next_pos[r] -= m

    def trial_cache(self, r: int) -> TrialCache:
        """Row ``r``'s cache with the padding columns removed."""
        cols = self.mask[r].bool()
        layers = self.cache.layers
        return TrialCache(
            [lay.keys[r][:, cols].clone() for lay in layers],
            [lay.values[r][:, cols].clone() for lay in layers],
            weakref.ref(self.model),
        )


def decode(
    batch: DecodeBatch, logits: torch.Tensor, limits: torch.Tensor, stop_ids: torch.Tensor, pad_id: int, draw: Draw
) -> Sampled:
    """Sample continuations of every row of ``batch`` until each has stopped.

    ``logits`` [R, V]: the next-token logits after each row's last fed token (the output of
    the batch's last :meth:`DecodeBatch.feed`); ``limits`` [R] the most tokens each row may
    sample (a row stops earlier at any id of ``stop_ids``); ``draw`` the draw rule. Each
    sampled token is fed back to its row; the loop is bounded by ``limits.max()`` steps and
    ends as soon as every row has stopped. With a value head on the batch, each sampled
    token's value (from the pass its logits came from) is returned too. Returns CPU tensors.
    """
    device = logits.device
    n = logits.shape[0]
    limits = limits.to(device)
    stop_ids = stop_ids.to(device)
    width = int(limits.max()) if n else 0
    tokens = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((n, width), dtype=torch.float32, device=device)
    values = torch.zeros((n, width), dtype=torch.float32, device=device) if batch.value_head is not None else None
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    done = limits <= 0
    for t in range(width):
        tok, lp = draw(logits, t)
        live = ~done
        tokens[:, t] = torch.where(live, tok, pad_id)
        logprobs[:, t] = torch.where(live, lp, 0.0)
        if values is not None:
            values[:, t] = torch.where(live, batch.values, 0.0)
        lengths += live.long()
        hit = live & torch.isin(tok, stop_ids)
        stopped |= hit
        done = done | hit | (lengths >= limits)
        if bool(done.all()):
            break
        logits = batch.feed(tok[:, None], pad_id)
    w = int(lengths.max()) if n else 0
    return Sampled(
        tokens[:, :w].cpu(),
        logprobs[:, :w].cpu(),
        lengths.cpu(),
        stopped.cpu(),
        values[:, :w].cpu() if values is not None else None,
    )


def cat_sampled(parts: list[Sampled], pad_id: int) -> Sampled:
    """Row-wise concatenation of :class:`Sampled` chunks (padded to the widest)."""
    width = max(p.tokens.shape[1] for p in parts)
    pad = lambda t, v: F.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    values = None if parts[0].values is None else torch.cat([pad(p.values, 0.0) for p in parts])
    return Sampled(
        torch.cat([pad(p.tokens, pad_id) for p in parts]),
        torch.cat([pad(p.logprobs, 0.0) for p in parts]),
        torch.cat([p.lengths for p in parts]),
        torch.cat([p.stopped for p in parts]),
        values,
    )
