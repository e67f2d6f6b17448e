"""The ``cached`` engine (default): one batched, in-place KV cache per call, kept across each
trial's episodes, observations appended to it; trials step independently. See
:mod:`metarl_llm.rollout.base` for how it compares with the other engines.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from metarl_llm.core.batch import length_buckets, pad_rows
from metarl_llm.core.trial import Trial
from metarl_llm.models import head_values
from metarl_llm.rollout.base import Engine, episode_limit, finish_episode, register_engine, start_trials
from metarl_llm.rollout.kv_cache import TrialCache, _GrowingLayer, growing_cache, last_logits_only, lm_head_input
from metarl_llm.rollout.sampling import check_keys, draw_tokens, multinomial, stream_uniforms


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
            width = max(len(b) for b in blocks)
            # left-padded within the block: every row's last token is in the last column
            ids, block_mask = pad_rows(blocks, pad_id, width=width, left=True)
            ids, block_mask = ids.to(self.device), block_mask.to(self.device)
            pos = self.next_pos[:, None] + (block_mask.cumsum(-1) - 1).clamp(min=0)
            self._append_mask(block_mask)
            self.next_pos = self.next_pos + block_mask.sum(-1)
        with lm_head_input(self.model, self.value_head is not None) as seen:
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, cache=self.cache,
                             use_cache=True, **self._forward_kwargs)
        self.cache = out.cache
        if self.value_head is not None:  # the last position only (blocks are left-padded: each row's last token)
            self.values = head_values(self.value_head, seen[0][:, -1])
        return out.logits[:, -1]

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
                          weakref.ref(self.model))


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
