"""Rollout engines: how trials are generated, behind one small interface.

A trial is a token stream (prompt, episodes, inserted observations; see
:mod:`metarl_llm.rollout`). Engines differ only in how they compute it:

- ``cached`` (default, :class:`CachedEngine`): one batched KV cache per call. Each
  trial's cache is kept across its episodes; the observation tokens the environment
  inserts are appended to it, so the history is never encoded twice. Trials step
  independently: when one ends an episode, the environment is stepped at once and its
  observation is fed one token per forward pass beside the other trials' sampled tokens
  (no trial waits for the slowest episode of the batch, and no pass is padded to the
  longest observation; observations longer than ``queue_tokens`` go in as one block).
  Every pass is then one token per row, the cache grows by one column per pass and is
  appended in place (preallocated, :class:`_GrowingLayer`), prompts of similar length are
  prefilled together (:meth:`_Batch.prefill`), and finished trials leave the batch once a
  quarter of its rows have finished. With ``keep_cache=True`` each finished trial keeps
  its KV cache (:class:`TrialCache`) so that the meta-prover's forced answers continue
  from it (:meth:`CachedEngine.continue_prefixes`) instead of re-encoding every prefix.
- ``reencode`` (:class:`ReencodeEngine`): episode by episode, every trial's whole history
  is prefilled again before each episode (with a KV cache inside the episode). The
  engine of earlier versions, kept as a reference.
- ``hf_generate`` (:class:`HFGenerateEngine`): plain ``model.generate`` once per episode
  on the whole history: the baseline a user of transformers would write.

Sampling is ancestral sampling from softmax(logits) (temperature 1, no top-k/top-p),
so the log-probs are those of the policy the trainer scores. ``cached`` and
``reencode`` draw each token by inverse-CDF from a *counter-based* uniform
u(trial key, stream position) (:func:`stream_uniforms`): a trial's tokens depend only on
its own key and logits, not on which other trials share the batch or how the forward
passes were split. The cached engine therefore reproduces exactly the tokens of a
recomputation from scratch with the same keys (tested), and the two engines agree.

Values while sampling (``value_head``, a shared critic's head; all three engines
support it, :attr:`Engine.supports_values`): the logits a token is drawn from come from a
forward pass whose last-layer hidden state (the LM head's input, :func:`lm_head_input`; the
tensor ``ActorCritic.score`` reads) at that position also gives the critic's value V(x_<t) of
that token, so the engines return each action token's value beside its log-prob
(``Trial.sample_values``) and the trainer needs no policy forward to score a PPO batch
(``algo.old_logprobs=sampled``). Only the sampled positions' hidden states go through
the head; the tokens and log-probs are those drawn without it.

A new backend (for example vLLM for large models) implements :class:`Engine` and
registers itself with :func:`register_engine`; the trainer only calls
``get_engine(name).run_trials(...)``.
"""

from __future__ import annotations

import abc
import contextlib

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from metarl_llm.config import BudgetConfig
from metarl_llm.models import head_values
from metarl_llm.rollout import StreamCodec, Trial, multinomial, sample

ENGINES: dict[str, Callable[[], "Engine"]] = {}


def register_engine(name: str):
    def wrap(cls):
        ENGINES[name] = cls
        cls.name = name
        return cls

    return wrap


def get_engine(name: str, **options) -> "Engine":
    """A new engine registered as ``name``; ``options`` go to its constructor (cached:
    ``max_rows``, ``bucket_tokens``; the others take none)."""
    if name not in ENGINES:
        raise ValueError(f"rollout.engine={name!r} is not registered; choose from {sorted(ENGINES)}")
    return ENGINES[name](**options)


def engine_from_config(cfg) -> "Engine":
    """The engine of a RolloutConfig (``rollout.*``)."""
    if cfg.max_rows < 1:
        raise ValueError(f"rollout.max_rows must be >= 1, got {cfg.max_rows}")
    if cfg.prefill_bucket_tokens < 0:
        raise ValueError(f"rollout.prefill_bucket_tokens must be >= 0, got {cfg.prefill_bucket_tokens}")
    options = {"max_rows": cfg.max_rows, "bucket_tokens": cfg.prefill_bucket_tokens}
    return get_engine(cfg.engine, **(options if cfg.engine == "cached" else {}))


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


# ------------------------------------------------------------------ interface


class Engine(abc.ABC):
    """A rollout backend (abstract). Subclasses implement :meth:`run_trials`.

    ``supports_values``: True when :meth:`run_trials` takes ``value_head`` and fills
    ``Trial.sample_values``; callers pass ``value_head`` only to such engines (the trainer
    otherwise scores the values with a forward pass)."""

    name = "engine"
    supports_values = False

    @abc.abstractmethod
    def run_trials(
        self, model: torch.nn.Module, codec: StreamCodec, envs: list, resets: list[dict], groups: list[int],
        budget: BudgetConfig, generator: torch.Generator | None = None, keep_cache: bool = False,
        greedy: bool = False, keys: torch.Tensor | None = None, value_head: torch.nn.Module | None = None,
    ) -> list[Trial]:
        """Play one trial in each environment (see :func:`metarl_llm.rollout.run_trials`).

        ``keys`` [N] int64: the trials' sampling keys (default: drawn from ``generator``),
        for callers that shard a batch whose keys were drawn globally. ``value_head``
        (engines with ``supports_values``): also store each action token's value, the head
        on the last hidden state of the pass its logits came from, on ``Trial.sample_values``."""


def start_trials(codec: StreamCodec, envs: list, resets: list[dict], groups: list[int], budget: BudgetConfig) -> list[Trial]:
    """Reset every environment and start its trial with the tokenised prompt."""
    if not (len(envs) == len(resets) == len(groups)):
        raise ValueError(f"run_trials: {len(envs)} envs, {len(resets)} resets and {len(groups)} groups must match")
    trials = []
    for env, kw, g in zip(envs, resets, groups):
        prompt, info = env.reset(**kw)
        t = Trial(problem_id=info["problem_id"], group=g, env=env.unwrapped)
        ids = codec.encode(prompt, special=True)
        if len(ids) > budget.max_prompt_tokens:
            raise ValueError(
                f"problem {t.problem_id}: prompt of {len(ids)} tokens exceeds budget.max_prompt_tokens={budget.max_prompt_tokens}"
            )
        if not ids:
            raise ValueError(f"problem {t.problem_id}: the prompt encodes to no tokens")
        t.append(ids, False, -1)
        trials.append(t)
    return trials


def episode_limit(t: Trial, forced: bool, budget: BudgetConfig) -> int:
    """Tokens the next episode of ``t`` may sample."""
    if forced:
        return budget.answer_max_tokens
    return max(1, min(budget.max_episode_tokens, budget.max_total_tokens - t.policy_tokens))


def finish_episode(t: Trial, env, codec: StreamCodec, toks: list[int], logps: list[float], forced: bool,
                   budget: BudgetConfig, values: list[float] | None = None) -> tuple[bool, bool, list[int]]:
    """Record an episode of ``t`` (its tokens, log-probs and, when computed, values) and step its environment.

    Returns (ended, forced_next, observation ids to insert). The trial ends when the
    environment terminates or truncates it; after EOS without a committed answer, at
    ``max_total_tokens`` or when the environment itself forces the answer, the
    forced-answer text is inserted and the next episode is the final answer.
    """
    j = len(t.episode_texts)
    t.append(toks, True, j, logps, values)
    text = codec.episode_text(toks)
    t.episode_texts.append(text)
    obs, reward, terminated, truncated, info = env.step(text)
    t.episode_correct.append(bool(info.get("correct", False)))
    if terminated or truncated:
        t.outcome, t.answer, t.answer_episode, t.forced = float(reward), info.get("answer"), j, forced
        return True, forced, []
    if forced:
        raise RuntimeError(f"problem {t.problem_id}: environment did not end the trial after a forced answer")
    n = len(toks)
    if info.get("forcing_answer"):
        return False, True, codec.forced_prefix(t.ids)
    if (n > 0 and toks[-1] == codec.eos_id) or t.policy_tokens >= budget.max_total_tokens:
        t.env.force_answer()
        return False, True, codec.forced_prefix(t.ids)
    cut = n > 0 and toks[-1] not in codec.delimiter_ids
    return False, False, (codec.delimiter_token if cut else []) + codec.encode(obs)


def finish_round(trials: list[Trial], envs: list, codec: StreamCodec, results: dict, live: list[int],
                 forced: list[bool], budget: BudgetConfig) -> list[int]:
    """One episode of every live trial of an episode-by-episode engine: ``results[i]`` =
    (tokens, log-probs) or (tokens, log-probs, values) of trial i's episode; records it,
    steps the environment, inserts the observation. Updates ``forced`` in place; returns
    the trials still running."""
    still = []
    for i in live:
        toks, logps, *values = results[i]
        done, forced[i], obs_ids = finish_episode(trials[i], envs[i], codec, toks, logps, forced[i], budget,
                                                  values[0] if values else None)
        if not done:
            if obs_ids:
                trials[i].append(obs_ids, False, -1)
            still.append(i)
    return still


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
    model_id: int = 0  # id() of the model that computed it: the cache is only valid for that model

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


class _Batch:
    """The live rows of a :class:`CachedEngine` call: a batched cache and its bookkeeping.

    cache: a :func:`growing_cache` over [R, H, W, D]; mask [R, W] (1 on real tokens, 0 on
    padding, which may sit anywhere), a view of a preallocated [R, capacity] buffer;
    next_pos [R] position id of each row's next token. ``rows`` maps a batch row to its
    trial index. ``capacity``: columns allocated at first (both grow when needed).
    ``value_head``: when given, every :meth:`feed` also sets ``values`` [R] float32, the
    head on the last-layer hidden state at the position of the returned logits (the
    critic's value of the token sampled from them); ``values`` is None otherwise.
    """

    def __init__(self, model, device, n: int, capacity: int = 0, value_head: torch.nn.Module | None = None):
        self.model, self.device = model, device
        self.value_head = value_head
        self.values: torch.Tensor | None = None
        # The LM head on the last position only; with a value head, that head's input (the
        # last layer's normed hidden state) is captured by a hook, so no other layer's
        # hidden states are kept (output_hidden_states would hold every layer's for a prefill).
        self._forward_kwargs = last_logits_only(model)
        self.cache = growing_cache(model, capacity)
        self._mask = torch.zeros((n, capacity), dtype=torch.long, device=device)
        self.width = 0
        self.next_pos = torch.zeros(n, dtype=torch.long, device=device)
        self.rows: list[int] = list(range(n))

    @property
    def mask(self) -> torch.Tensor:
        return self._mask[:, : self.width]

    @mask.setter
    def mask(self, value: torch.Tensor) -> None:
        self._mask, self.width = value.to(self.device, torch.long), value.shape[1]

    def _append_mask(self, block_mask: torch.Tensor) -> None:
        w = block_mask.shape[1]
        if self.width + w > self._mask.shape[1]:
            grown = self._mask.new_zeros((self._mask.shape[0], max(self.width + w, 2 * self._mask.shape[1])))
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
            n, width = len(blocks), max(len(b) for b in blocks)
            ids = torch.full((n, width), pad_id, dtype=torch.long)
            block_mask = torch.zeros((n, width), dtype=torch.long)
            for r, b in enumerate(blocks):  # left-padded within the block: every row's last token is in the last column
                ids[r, width - len(b):] = torch.as_tensor(b)
                block_mask[r, width - len(b):] = 1
            ids, block_mask = ids.to(self.device), block_mask.to(self.device)
            pos = self.next_pos[:, None] + (block_mask.cumsum(-1) - 1).clamp(min=0)
            self._append_mask(block_mask)
            self.next_pos = self.next_pos + block_mask.sum(-1)
        with lm_head_input(self.model, self.value_head is not None) as seen:
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, past_key_values=self.cache,
                             use_cache=True, **self._forward_kwargs)
        self.cache = out.past_key_values
        if self.value_head is not None:  # the last position only (blocks are left-padded: each row's last token)
            self.values = head_values(self.value_head, seen[0][:, -1])
        return out.logits[:, -1]

    def prefill(self, contexts: list[list[int]], pad_id: int, bucket_tokens: int = 0) -> torch.Tensor:
        """The first :meth:`feed` of an empty batch, with contexts of similar length prefilled
        together (:func:`metarl_llm.batch.length_buckets`, cost ``bucket_tokens`` padded
        positions per pass; 0: one pass): each group is trimmed to its own longest context
        and the groups' caches are joined, left-padded to the longest context, so that short
        prompts are not padded to the longest in the prefill. Same cache and logits as one
        pass up to float rounding. Models with other cache layers than full attention
        (sliding windows, ...) get one pass."""
        from metarl_llm.batch import length_buckets

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
            sub = _Batch(self.model, self.device, len(rows), value_head=self.value_head)
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
                k[idx, :, longest - w:] = lay.keys
                v[idx, :, longest - w:] = lay.values
            mask[idx, longest - w:] = sub.mask
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

    def trial_cache(self, r: int) -> TrialCache:
        """Row ``r``'s cache with the padding columns removed."""
        cols = self.mask[r].bool()
        layers = self.cache.layers
        return TrialCache([lay.keys[r][:, cols].clone() for lay in layers], [lay.values[r][:, cols].clone() for lay in layers],
                          id(self.model))


@register_engine("cached")
class CachedEngine(Engine):
    """KV cache kept across episodes, observations appended, trials stepped independently."""

    supports_values = True

    def __init__(self, max_rows: int = 512, bucket_tokens: int = 128, queue_tokens: int = 32):
        self.max_rows = max_rows  # trials per batched cache (larger calls run in chunks)
        self.bucket_tokens = bucket_tokens  # prompts of similar length prefilled together (_Batch.prefill; 0: one pass)
        # Observations of up to this many tokens are fed one token per pass beside the other rows'
        # sampled tokens (no padded block, no wider cache); longer ones as one block.
        self.queue_tokens = queue_tokens

    @torch.no_grad()
    def run_trials(self, model, codec, envs, resets, groups, budget, generator=None, keep_cache=False, greedy=False, keys=None,
                   value_head=None):
        trials = start_trials(codec, envs, resets, groups, budget)
        keys = check_keys(keys, len(trials), generator)
        caches: list[TrialCache | None] = [None] * len(trials)
        for s in range(0, len(trials), self.max_rows):
            idx = list(range(s, min(s + self.max_rows, len(trials))))
            self._run_chunk(model, codec, [envs[i] for i in idx], [trials[i] for i in idx], keys[idx], budget,
                            keep_cache, greedy, caches, s, value_head)
        for t, c in zip(trials, caches):
            t.cache = c
        return trials

    def _run_chunk(self, model, codec, envs, trials, keys, budget, keep_cache, greedy, caches, offset, value_head=None):
        device = next(model.parameters()).device
        n = len(trials)
        q = self.queue_tokens + 1  # a queue holds the episode's last (sampled, unfed) token and the observation
        # First allocation of the cache: the prompts and every episode of the budget (it grows when needed).
        capacity = (max(len(t.ids) for t in trials) + budget.max_total_tokens + budget.answer_max_tokens
                    + (budget.max_episodes + 1) * min(q, 8) + 16)
        batch = _Batch(model, device, n, capacity, value_head)
        forced = [False] * n
        # Per-row state, in tensors: the current episode's sampled tokens, log-probs (and values) so
        # far, and the queue of tokens a row feeds before it samples again (observations).
        max_ep = max(budget.max_episode_tokens, budget.answer_max_tokens)
        ep_tok = torch.full((n, max_ep), codec.pad_id, dtype=torch.long, device=device)
        ep_lp = torch.zeros((n, max_ep), dtype=torch.float32, device=device)
        ep_val = torch.zeros((n, max_ep), dtype=torch.float32, device=device) if value_head is not None else None
        ep_len = torch.zeros(n, dtype=torch.long, device=device)
        limit = torch.tensor([episode_limit(t, False, budget) for t in trials], device=device)
        stream_len = torch.tensor([len(t.ids) for t in trials], device=device)  # tokens of each stream so far
        row_keys = keys.to(device)
        stop_ids = codec.stop_ids.to(device)
        queue = torch.full((n, q), codec.pad_id, dtype=torch.long, device=device)
        q_pos = torch.zeros(n, dtype=torch.long, device=device)
        q_len = torch.zeros(n, dtype=torch.long, device=device)
        live = torch.ones(n, dtype=torch.bool, device=device)
        logits = batch.prefill([t.ids for t in trials], codec.pad_id, self.bucket_tokens)
        ar = torch.arange(n, device=device)  # batch row indices; rebuilt when finished rows are dropped
        # Bound: every step a live row samples a token or feeds one queued token (or one block);
        # a trial has at most max_episodes + 1 episodes of at most max_ep tokens.
        for _step in range((budget.max_episodes + 2) * (max_ep + q + 1) + 1):
            sampling = live & (q_pos >= q_len)  # rows whose logits are for their next policy token
            u = None if greedy else stream_uniforms(row_keys, stream_len + ep_len)
            tok, lp = draw_tokens(logits, u)
            col = ep_len.clamp(max=max_ep - 1)
            ep_tok[ar, col] = torch.where(sampling, tok, ep_tok[ar, col])
            ep_lp[ar, col] = torch.where(sampling, lp, ep_lp[ar, col])
            if ep_val is not None:  # the value from the pass these logits came from
                ep_val[ar, col] = torch.where(sampling, batch.values, ep_val[ar, col])
            ep_len += sampling.long()
            ended = sampling & (torch.isin(tok, stop_ids) | (ep_len >= limit))
            blocks: dict[int, list[int]] = {}
            if bool(ended.any()):
                ending = ended.nonzero().flatten().tolist()
                # Most live rows ending together (lockstep episodes): their observations go in as one
                # block, cheaper than one pass per token; otherwise each row queues its own.
                together = 2 * len(ending) >= int(live.sum())
                for r in ending:  # Python only at episode ends
                    i = batch.rows[r]
                    k = int(ep_len[r])
                    toks, lps = ep_tok[r, :k].tolist(), ep_lp[r, :k].tolist()
                    vals = ep_val[r, :k].tolist() if ep_val is not None else None
                    done, forced[i], obs_ids = finish_episode(trials[i], envs[i], codec, toks, lps, forced[i], budget, vals)
                    if done:
                        live[r] = False
                        if keep_cache:
                            caches[offset + i] = batch.trial_cache(r)
                        continue
                    if obs_ids:
                        trials[i].append(obs_ids, False, -1)
                    stream_len[r] = len(trials[i].ids)
                    ep_len[r] = 0
                    limit[r] = episode_limit(trials[i], forced[i], budget)
                    pending = [toks[-1]] + obs_ids  # the episode's last token was sampled but not fed yet
                    if len(pending) <= q and not together:  # fed one token per step, beside the other rows' tokens
                        queue[r, : len(pending)] = torch.as_tensor(pending)
                        q_pos[r], q_len[r] = 0, len(pending)
                    else:  # a long observation, or most rows at once: one block in the next pass
                        blocks[r] = pending
                n_live = int(live.sum())
                if n_live == 0:
                    return
                if 4 * (len(batch.rows) - n_live) >= len(batch.rows):  # a quarter of the rows finished: drop them
                    keep = live.nonzero().flatten()
                    old = keep.tolist()
                    new_index = {r: j for j, r in enumerate(old)}
                    blocks = {new_index[r]: b for r, b in blocks.items()}
                    batch.keep(keep)
                    ep_tok, ep_lp, ep_len, limit = ep_tok[keep], ep_lp[keep], ep_len[keep], limit[keep]
                    ep_val = ep_val[keep] if ep_val is not None else None
                    stream_len, row_keys, live = stream_len[keep], row_keys[keep], live[keep]
                    queue, q_pos, q_len, tok = queue[keep], q_pos[keep], q_len[keep], tok[keep]
                    ar = torch.arange(len(batch.rows), device=device)
            feeding = q_pos < q_len
            inp = torch.where(feeding, queue[ar, q_pos.clamp(max=q - 1)], tok)
            inp = torch.where(live, inp, codec.pad_id)  # finished rows not dropped yet feed padding (ignored)
            q_pos = q_pos + feeding.long()
            if blocks:
                feed = [[t] for t in inp.tolist()]
                for r, b in blocks.items():
                    feed[r] = b
                logits = batch.feed(feed, codec.pad_id)
            else:
                logits = batch.feed(inp[:, None], codec.pad_id)
        raise RuntimeError(f"{len(batch.rows)} trial(s) did not terminate within the engine's step bound")

    @torch.no_grad()
    def continue_prefixes(
        self, model, trials: list[Trial], ends: list[list[int]], suffixes: list[list[list[int]]], copies: int,
        max_new_tokens: int, stop_ids: torch.Tensor, pad_id: int, generator: torch.Generator | None = None,
        max_rows: int = 256, greedy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Sample ``copies`` continuations of each prefix ``trial.ids[:end]`` followed by
        ``suffixes[i][b]`` (the forced-answer tokens), reusing each trial's kept cache for
        the prefix (``run_trials(..., keep_cache=True)``); only the suffix is encoded.

        Returns (tokens [M, L], lengths [M], owners) with one row per (trial i,
        boundary b, copy), ``owners[row] = (i, b)``. Rows are sampled by ancestral
        sampling from ``generator`` (``greedy``: the argmax, first index on ties).
        """
        from metarl_llm.batch import length_buckets

        owners = [(i, b) for i, e in enumerate(ends) for b in range(len(e)) for _ in range(copies)]
        if not owners:
            return torch.zeros((0, 0), dtype=torch.long), torch.zeros(0, dtype=torch.long), owners
        device = next(model.parameters()).device
        stop_ids = stop_ids.to(device)
        for i, e in enumerate(ends):
            c = trials[i].cache
            if e and (c is None or c.length < max(e)):
                raise ValueError(f"trial {i}: no kept cache covering its first {max(e)} tokens (run_trials(keep_cache=True))")
        # The kept caches of the trials involved, per layer stacked into [trials, H, L, D] (0 after each one's end).
        used = sorted({i for i, _ in owners})
        slot = {i: s for s, i in enumerate(used)}
        longest_cache = max(trials[i].cache.length for i in used)
        stacks = []
        for layer in range(len(trials[used[0]].cache.keys)):
            k0 = trials[used[0]].cache.keys[layer]
            pk = k0.new_zeros((len(used), k0.shape[0], longest_cache, k0.shape[2]))
            pv = torch.zeros_like(pk)
            for s, i in enumerate(used):
                c = trials[i].cache
                pk[s, :, : c.length] = c.keys[layer]
                pv[s, :, : c.length] = c.values[layer]
            stacks.append((pk.to(device), pv.to(device)))
        row_end = torch.tensor([ends[i][b] for i, b in owners])
        tok_out = torch.full((len(owners), max_new_tokens), pad_id, dtype=torch.long)
        len_out = torch.zeros(len(owners), dtype=torch.long)
        # Rows of similar prefix length share a chunk (less left padding), at most max_rows each.
        # A chunk costs 1 + max_new_tokens forward passes (the suffix, then one per token), so
        # its overhead in the bucketing's units (padded positions per pass) is that many passes'.
        for part in length_buckets(row_end, self.bucket_tokens * (1 + max_new_tokens), max_rows=max_rows):
            rows = [owners[r] for r in part.tolist()]
            n = len(rows)
            e = row_end[part].to(device)
            width = int(e.max())
            longest = max(len(suffixes[i][b]) for i, b in rows)
            # Each row's prefix, right-aligned at `width`: column c holds the trial's cache column c - (width - end).
            src = torch.arange(width, device=device)[None] - (width - e)[:, None]
            ti = torch.tensor([slot[i] for i, _ in rows], device=device)[:, None]
            data = [(pk[ti, :, src.clamp(min=0)].transpose(1, 2), pv[ti, :, src.clamp(min=0)].transpose(1, 2))
                    for pk, pv in stacks]  # [n, H, width, D]; the padding columns (src < 0) are masked out
            batch = _Batch(model, device, n)
            batch.cache = growing_cache(model, width + longest + max_new_tokens, data=data)
            batch.mask = F.pad((src >= 0).long(), (0, longest + max_new_tokens))
            batch.width = width
            batch.next_pos = e.clone()
            logits = batch.feed([suffixes[i][b] for i, b in rows], pad_id)
            toks = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
            lengths = torch.zeros(n, dtype=torch.long, device=device)
            done = torch.zeros(n, dtype=torch.bool, device=device)
            for t in range(max_new_tokens):
                if greedy:
                    tok = logits.float().argmax(-1)
                else:
                    tok = multinomial(F.softmax(logits.float(), -1), generator)
                toks[:, t] = torch.where(done, pad_id, tok)
                lengths += (~done).long()
                done = done | torch.isin(tok, stop_ids)
                if bool(done.all()) or t == max_new_tokens - 1:
                    break
                logits = batch.feed(tok[:, None], pad_id)
            tok_out[part] = toks.cpu()
            len_out[part] = lengths.cpu()
        return tok_out[:, : int(len_out.max())], len_out, owners


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
    from metarl_llm.rollout import Sampled

    w = int(lengths.max())
    return Sampled(tokens[:, :w].cpu(), logprobs[:, :w].cpu(), lengths.cpu(), stopped.cpu(),
                   values[:, :w].cpu() if values is not None else None)


@register_engine("hf_generate")
class HFGenerateEngine(Engine):
    """``model.generate`` once per episode on the whole re-encoded history (the
    transformers baseline). Sampling: ``do_sample=True`` from softmax of the raw logits, every
    logits processor and warper the model's own ``generation_config`` may set (repetition
    penalty, n-gram blocking, min length, suppressed tokens, top-k/p, ...) switched off
    (:data:`_NEUTRAL_GENERATION`), and an error if ``generate`` still changed the scores it drew
    from; log-probs from the raw generation logits (values, with ``value_head``: from the
    generation's last-layer hidden states). Rows with different token limits are
    generated in separate calls (one per distinct limit)."""

    supports_values = True

    @torch.no_grad()
    def run_trials(self, model, codec, envs, resets, groups, budget, generator=None, keep_cache=False, greedy=False, keys=None,
                   value_head=None):
        trials = start_trials(codec, envs, resets, groups, budget)
        live = list(range(len(trials)))
        forced = [False] * len(trials)
        for _round in range(budget.max_episodes + 2):
            if not live:
                return trials
            limits = {i: episode_limit(trials[i], forced[i], budget) for i in live}
            results = {}
            for lim in sorted(set(limits.values())):
                rows = [i for i in live if limits[i] == lim]
                out = _generate(model, [trials[i].ids for i in rows], lim, codec, greedy, value_head)
                for row, i in enumerate(rows):
                    results[i] = _episode(out, row)
            live = finish_round(trials, envs, codec, results, live, forced, budget)
        if live:
            raise RuntimeError(f"{len(live)} trial(s) did not terminate within max_episodes+2 rounds")
        return trials


# Every GenerationConfig entry with which ``model.generate`` changes the logits before it draws a
# token (a logits processor or warper), or decodes otherwise than one token per step from them
# (beams, extra sequences, constrained, contrastive, assisted or DoLa decoding, stop strings), at
# its "off" value. ``generate`` merges the model's own ``generation_config`` (a checkpoint's
# generation_config.json; Qwen2.5-Instruct ships repetition_penalty 1.05-1.1) into every call: it
# fills what the call leaves unset, and a ``generation_config=`` argument does not stop it (its
# defaults / None entries are replaced by the model's). Only keyword arguments win: they are applied
# last, None included (``GenerationConfig.update(**kwargs)`` in ``_prepare_generation_config``,
# transformers 4.56 and 5.x alike). Entries a transformers version lacks are left out.
_WARPERS = ("temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff")
_NEUTRAL_GENERATION = {
    # warpers (applied when sampling only)
    "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None, "top_h": None, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    # processors
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None, "min_length": 0,
    "min_new_tokens": None, "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "remove_invalid_values": False,
    "renormalize_logits": False, "guidance_scale": None, "watermarking_config": None, "token_healing": False,
    # decoding mode and stopping
    "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "penalty_alpha": None, "dola_layers": None,
    "constraints": None, "force_words_ids": None, "prompt_lookup_num_tokens": None, "assistant_early_exit": None,
    "use_mtp": False, "stop_strings": None, "max_time": None,
}


def _neutral_generation_kwargs(greedy: bool = False) -> dict:
    """:data:`_NEUTRAL_GENERATION` less the entries this transformers' GenerationConfig does not have
    (``generate`` would pass those to the model's forward) and, greedy, less the warpers (unused
    without sampling; transformers warns about them)."""
    from transformers import GenerationConfig

    known = GenerationConfig()
    return {k: v for k, v in _NEUTRAL_GENERATION.items() if hasattr(known, k) and not (greedy and k in _WARPERS)}


def _raw_logprobs_checked(scores, logits, new: torch.Tensor, valid: torch.Tensor,
                          atol: float = 1e-4) -> tuple[torch.Tensor, int, float]:
    """The raw logits' log-probs of the generated tokens ``new`` [N, L], and (number of valid positions,
    largest |log p| difference) where ``generate``'s processed scores (what it drew from) give another
    log-softmax than its raw logits. Step by step on the tensors ``generate`` returned: no forward pass,
    no [N, L, V] copy, one device sync."""
    logprobs = torch.zeros(new.shape, dtype=torch.float32, device=new.device)
    worst = torch.zeros(new.shape[0], device=new.device)
    count = torch.zeros((), dtype=torch.long, device=new.device)
    for t in range(min(len(logits), new.shape[1])):
        raw, proc = F.log_softmax(logits[t].float(), -1), F.log_softmax(scores[t].float(), -1)
        logprobs[:, t] = raw.gather(-1, new[:, t, None]).squeeze(-1)
        diff = torch.where(proc == raw, 0.0, (proc - raw).abs()).nan_to_num(nan=float("inf")).amax(-1)  # -inf == -inf: 0
        diff = torch.where(valid[:, t], diff, 0.0)  # a stopped row's later positions do not count
        worst = torch.maximum(worst, diff)
        count += (diff > atol).sum()
    return logprobs, int(count), float(worst.max()) if worst.numel() else 0.0


def _processor_error(model, positions: int, worst: float) -> ValueError:
    config = getattr(model, "generation_config", None)
    set_here = {k: getattr(config, k) for k, off in _NEUTRAL_GENERATION.items()
                if getattr(config, k, None) is not None and getattr(config, k) != off}
    cause = (f"the model's generation_config sets {', '.join(f'{k}={v!r}' for k, v in set_here.items())} and generate "
             f"still applied it as a logits processor" if set_here else
             "a logits processor from outside the model's generation_config (a subclass's or remote code's "
             "generate / _get_logits_processor, or a processor this transformers version adds)")
    return ValueError(
        f"rollout.engine=hf_generate: model.generate drew {positions} token(s) from processed scores that differ from "
        f"the raw logits (largest |log p difference| {worst:.3g}), so the sampled tokens do not follow the policy whose "
        f"log-probs are stored and trained on. Likely cause: {cause}. Fix: set those entries of model.generation_config "
        f"to their neutral values (or replace it: model.generation_config = transformers.GenerationConfig(eos_token_id=..., "
        f"pad_token_id=...)), or use rollout.engine=cached.")


def _generate(model, contexts: list[list[int]], max_new_tokens: int, codec: StreamCodec, greedy: bool,
              value_head: torch.nn.Module | None = None):
    from metarl_llm.rollout import Sampled

    device = next(model.parameters()).device
    n, width = len(contexts), max(len(c) for c in contexts)
    ids = torch.full((n, width), codec.pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, width - len(c):] = torch.as_tensor(c)
        mask[i, width - len(c):] = 1
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
        **{**_neutral_generation_kwargs(greedy), "do_sample": not greedy, "eos_token_id": codec.stop_ids.tolist(),
           "pad_token_id": codec.pad_id, "return_dict_in_generate": True, "output_logits": True, "output_scores": True},
        **({"output_hidden_states": True} if value_head is not None else {}),
    )
    new = out.sequences[:, width:]
    is_stop = torch.isin(new, codec.stop_ids.to(new.device))
    first_stop = torch.where(is_stop.any(1), is_stop.float().argmax(1), torch.full((n,), new.shape[1], device=new.device))
    lengths = torch.clamp(first_stop + 1, max=new.shape[1])
    valid = torch.arange(new.shape[1], device=new.device)[None] < lengths[:, None]
    # log-probs of the raw logits, the policy's; an error unless they are also those generate drew from
    logprobs, positions, worst = _raw_logprobs_checked(out.scores, out.logits, new, valid)
    if positions:
        raise _processor_error(model, positions, worst)
    values = None
    if value_head is not None:  # hidden_states: one tuple of layers per generation step; its last position gave the logits
        hidden = torch.stack([step[-1][:, -1] for step in out.hidden_states[: new.shape[1]]], 1)  # [n, L, H]
        values = (head_values(value_head, hidden) * valid).cpu()
    return Sampled(torch.where(valid, new, codec.pad_id).cpu(), (logprobs * valid).cpu(), lengths.cpu(), is_stop.any(1).cpu(),
                   values)


__all__ = ["ENGINES", "CachedEngine", "Engine", "HFGenerateEngine", "ReencodeEngine", "TrialCache", "draw_tokens",
           "get_engine", "register_engine", "sample", "stream_uniforms", "trial_keys"]
