"""KV caches: the in-place growing cache the engines append to (:class:`_GrowingLayer`,
:func:`growing_cache`), its fixed-shape form for compiled decoding (:class:`_RowsStaticLayer`,
:func:`static_cache`), a finished trial's kept cache (:class:`TrialCache`, which the
meta-prover continues from), and the LM-head helpers of a forward pass
(:func:`last_logits_only`, :func:`lm_head_input`).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache, StaticLayer

# ------------------------------------------------------------------ cached engine


@dataclass
class TrialCache:
    """A finished trial's KV cache, kept for the meta-prover.

    keys, values: one [H, L, D] tensor per layer for the trial's L stream tokens (in
    stream order, padding removed); L == len(trial.ids) - 1 (the last token was sampled
    but never fed).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    # The model that computed it, weakly held: the cache is valid for that model object only. (An
    # id() could be reused by another model once the first is freed; a weak reference cannot.)
    model_ref: weakref.ref | None = None

    def computed_by(self, model: torch.nn.Module) -> bool:
        """Whether ``model`` (that very object, still alive) computed this cache."""
        return self.model_ref is not None and self.model_ref() is model

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]


class _GrowingLayer(DynamicLayer):
    """A transformers ``DynamicLayer`` that appends into preallocated storage instead of
    concatenating: ``keys``/``values`` are views of the first ``length`` columns of
    [B, H, capacity, D] buffers whose capacity doubles when full. The stored numbers are
    the same as DynamicLayer's; a decode step copies one new column per row instead of the
    whole cache (``torch.cat`` re-allocated and copied every layer's cache at every step)."""

    def __init__(self, capacity: int = 0):
        super().__init__()
        self._k = self._v = None
        self._len = 0
        self._capacity = capacity  # first allocation (a hint: more is allocated when needed)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, : self._len], self._v[:, :, : self._len]

    def _reserve(self, need: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        cap = 0 if self._k is None else self._k.shape[2]
        if need <= cap:
            return
        new = max(need, 2 * cap, self._capacity)
        k = like_k.new_empty((*like_k.shape[:2], new, like_k.shape[3]))
        v = like_v.new_empty((*like_v.shape[:2], new, like_v.shape[3]))
        if self._len:
            k[:, :, : self._len] = self._k[:, :, : self._len]
            v[:, :, : self._len] = self._v[:, :, : self._len]
        self._k, self._v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        self._reserve(self._len + n, key_states, value_states)
        self._k[:, :, self._len : self._len + n] = key_states
        self._v[:, :, self._len : self._len + n] = value_states
        self._len += n
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._len

    def reset(self) -> None:
        self._k = self._v = None
        self._len = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop: pass a negative number of tokens to remove")
        if tokens_to_remove and self._k is not None:
            self._len = max(0, self._len + tokens_to_remove)
            self._views()

    def _rows(self, fn) -> None:
        if self._k is not None:
            self._k, self._v = fn(self._k), fn(self._v)
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        def select(x: torch.Tensor) -> torch.Tensor:  # the used columns only, into buffers of the same capacity
            out = x.new_empty((len(indices), *x.shape[1:]))
            out[:, :, : self._len] = x[indices, :, : self._len]
            return out

        self._rows(select)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda x: x.repeat_interleave(repeats, dim=0))


def growing_cache(model, capacity: int = 0, data: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` whose full-attention layers are :class:`_GrowingLayer`
    (first allocation ``capacity`` columns); other layer kinds (sliding windows, ...) keep
    transformers' own. ``data``: one (keys, values) [B, H, L, D] pair per layer to start with."""
    cache = DynamicCache(config=model.config)
    cache.layers = [_GrowingLayer(capacity) if type(lay) is DynamicLayer else lay for lay in cache.layers]
    if cache.layer_class_to_replicate is DynamicLayer:  # layers made lazily (a config without layer types)
        cache.layer_class_to_replicate = _GrowingLayer
    for idx, (k, v) in enumerate(data or []):
        cache.update(k, v, idx)
    return cache


class _RowsStaticLayer(StaticLayer):
    """transformers' ``StaticLayer`` (keys, values: [B, H, capacity, D] buffers at fixed addresses,
    written in place at column ``cumulative_length``, the whole buffer attended under the mask), with
    what a decode batch also does to its cache: drop finished rows (:meth:`batch_select_indices`),
    start from given columns (:meth:`load`) and grow (:meth:`grow`). Each of those makes new buffers,
    which a compiled step meets as a new input (a batch size or capacity seen before reuses its graph)."""

    def _place(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values
        self.max_cache_len = keys.shape[2]
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._place(self.keys[indices], self.values[indices])

    def load(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Start from ``keys``/``values`` [B, H, L, D] in columns 0..L-1 (the rest zero)."""
        b, h, length, _ = keys.shape
        self.lazy_initialization(keys[:, :, :0], values[:, :, :0])
        self.keys[:, :, :length] = keys
        self.values[:, :, :length] = values
        self.cumulative_length.fill_(length)

    def grow(self, capacity: int) -> None:
        """Buffers of ``capacity`` columns holding the columns so far."""
        if not self.is_initialized or capacity <= self.max_cache_len:
            self.max_cache_len = max(self.max_cache_len, capacity)
            return
        k = self.keys.new_zeros((*self.keys.shape[:2], capacity, self.keys.shape[3]))
        v = self.values.new_zeros((*self.values.shape[:2], capacity, self.values.shape[3]))
        k[:, :, : self.max_cache_len] = self.keys
        v[:, :, : self.max_cache_len] = self.values
        self._place(k, v)


def static_capacity(columns: int, quantum: int = 64) -> int:
    """Columns of a static cache for ``columns`` tokens: rounded up to a multiple of ``quantum``, so
    that calls of similar length share a shape (and a compiled graph)."""
    return max(quantum, -(-columns // quantum) * quantum)


def static_cache(model, capacity: int) -> StaticCache | None:
    """A ``StaticCache`` of ``capacity`` columns for ``model`` whose layers are :class:`_RowsStaticLayer`;
    None when a layer is not plain full attention (sliding windows, linear attention, ...), which a
    decode batch then runs on :func:`growing_cache`."""
    cache = StaticCache(config=model.config, max_cache_len=capacity)
    if not cache.layers or any(type(lay) is not StaticLayer for lay in cache.layers):
        return None
    cache.layers = [_RowsStaticLayer(max_cache_len=capacity) for _ in cache.layers]
    return cache


def last_logits_only(model) -> dict:
    """``{"logits_to_keep": 1}`` when ``model.forward`` takes that argument (transformers'
    causal LMs): the LM head then runs on each row's last position only, the one whose
    logits are used. Otherwise {} (the logits of every position are computed)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@contextlib.contextmanager
def lm_head_input(model, active: bool = True):
    """While active, a list that receives the input of ``model``'s LM head (its output
    embeddings) at each forward: the last layer's hidden state after the final norm, the
    tensor ``output_hidden_states`` returns last and :meth:`ActorCritic.score` reads, but
    without keeping every layer's (with ``logits_to_keep`` only the kept positions)."""
    seen: list[torch.Tensor] = []
    if not active:
        yield seen
        return
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()
