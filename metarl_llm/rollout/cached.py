"""The ``cached`` engine (default): one batched, in-place KV cache per call, kept across each
trial's episodes, observations appended to it; trials step independently. See
:mod:`metarl_llm.rollout.base` for how it compares with the other engines.
"""

from __future__ import annotations

import torch

from metarl_llm.core.batch import length_buckets
from metarl_llm.rollout.base import Engine, episode_limit, finish_generation, prefix_owners, register_engine, start_trials
from metarl_llm.rollout.decode import DecodeBatch, cat_sampled, decode
from metarl_llm.rollout.kv_cache import TrialCache
from metarl_llm.rollout.sampling import check_keys, draw_rule, draw_tokens, stream_uniforms


@register_engine("cached")
class CachedEngine(Engine):
    """KV cache kept across episodes, observations appended, trials stepped independently."""

    supports_values = True

    def __init__(self, max_rows: int = 512, bucket_tokens: int = 128, compile_decode: bool = False, queue_tokens: int = 32):
        super().__init__(max_rows, bucket_tokens, compile_decode)
        # Observations of up to this many tokens are fed one token per pass beside the other rows'
        # sampled tokens (no padded block, no wider cache); longer ones as one block.
        self.queue_tokens = queue_tokens

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
        caches: list[TrialCache | None] = [None] * len(trials)
        for s in range(0, len(trials), self.max_rows):
            idx = list(range(s, min(s + self.max_rows, len(trials))))
            self._run_chunk(
                model,
                codec,
                [envs[i] for i in idx],
                [trials[i] for i in idx],
                keys[idx],
                budget,
                keep_cache,
                greedy,
                caches,
                s,
                value_head,
            )
        for t, c in zip(trials, caches):
            t.cache = c
        return trials

    def _run_chunk(self, model, codec, envs, trials, keys, budget, keep_cache, greedy, caches, offset, value_head=None):
        device = next(model.parameters()).device
        n = len(trials)
        q = self.queue_tokens + 1  # a queue holds the episode's last (sampled, unfed) token and the observation
        # First allocation of the cache: the prompts and every episode of the budget (it grows when needed).
        capacity = (
            max(len(t.ids) for t in trials)
            + budget.max_total_tokens
            + budget.answer_max_tokens
            + (budget.max_episodes + 1) * min(q, 8)
            + 16
        )
        batch = DecodeBatch(model, device, n, capacity, value_head, self.compile_backend)
        forced = [False] * n
        # Per-row state, in tensors: the current episode's sampled tokens, log-probs (and values) so
        # far, and the queue of tokens a row feeds before it samples again (observations).
        # a generation: an episode, the forced answer, or (a rule that segments after) the trial's whole budget
        max_ep = max(
            budget.max_total_tokens if codec.segmenter is not None else budget.max_episode_tokens, budget.answer_max_tokens
        )
        ep_tok = torch.full((n, max_ep), codec.pad_id, dtype=torch.long, device=device)
        ep_lp = torch.zeros((n, max_ep), dtype=torch.float32, device=device)
        ep_val = torch.zeros((n, max_ep), dtype=torch.float32, device=device) if value_head is not None else None
        ep_len = torch.zeros(n, dtype=torch.long, device=device)
        limit = torch.tensor([episode_limit(t, False, budget, codec) for t in trials], device=device)
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
                    done, forced[i], obs_ids, kept = finish_generation(
                        trials[i], envs[i], codec, toks, lps, forced[i], budget, vals
                    )
                    if done:
                        live[r] = False
                        if keep_cache:
                            caches[offset + i] = batch.trial_cache(r)
                        continue
                    if obs_ids:
                        trials[i].append(obs_ids, False, -1)
                    stream_len[r] = len(trials[i].ids)
                    ep_len[r] = 0
                    limit[r] = episode_limit(trials[i], forced[i], budget, codec)
                    if kept < k:  # the tokens after the ending episode are dropped: kept ones are all fed
                        batch.drop_last(r, k - 1 - kept)
                        pending = obs_ids
                    else:
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
        self, model, trials, ends, suffixes, copies, max_new_tokens, stop_ids, pad_id, generator=None, greedy=False, keys=None
    ):
        """:meth:`Engine.continue_prefixes`, continuing each prefix from its trial's kept KV cache
        (``run_trials(..., keep_cache=True)``) when every trial involved kept one computed by
        ``model``: only the suffixes are encoded. Otherwise every prefix is re-encoded (the
        base method). Same keys, same tokens either way (up to float rounding)."""
        owners = prefix_owners(ends, copies)
        keys = check_keys(keys, len(owners), generator)
        used = sorted({i for i, _ in owners})
        if not owners or not all(trials[i].cache is not None and trials[i].cache.computed_by(model) for i in used):
            return super().continue_prefixes(
                model, trials, ends, suffixes, copies, max_new_tokens, stop_ids, pad_id, greedy=greedy, keys=keys
            )
        device = next(model.parameters()).device
        for i, e in enumerate(ends):
            c = trials[i].cache
            if e and c.length < max(e):
                raise ValueError(
                    f"trial {i}: its kept cache covers {c.length} tokens, not the first {max(e)} (run_trials(keep_cache=True))"
                )
        # The kept caches of the trials involved, per layer stacked into [trials, H, L, D] (0 after each one's end).
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
        parts, order = [], []
        # Rows of similar prefix length share a chunk (less left padding), at most max_rows each.
        # A chunk costs 1 + max_new_tokens forward passes (the suffix, then one per token), so
        # its overhead in the bucketing's units (padded positions per pass) is that many passes'.
        for part in length_buckets(row_end, self.bucket_tokens * (1 + max_new_tokens), max_rows=self.max_rows):
            rows = [owners[r] for r in part.tolist()]
            n = len(rows)
            e = row_end[part].to(device)
            width = int(e.max())
            longest = max(len(suffixes[i][b]) for i, b in rows)
            # Each row's prefix, right-aligned at `width`: column c holds the trial's cache column c - (width - end).
            src = torch.arange(width, device=device)[None] - (width - e)[:, None]
            ti = torch.tensor([slot[i] for i, _ in rows], device=device)[:, None]
            data = [
                (pk[ti, :, src.clamp(min=0)].transpose(1, 2), pv[ti, :, src.clamp(min=0)].transpose(1, 2)) for pk, pv in stacks
            ]  # [n, H, width, D]; the padding columns (src < 0) are masked out
            batch = DecodeBatch(model, device, n, compile_backend=self.compile_backend)
            batch.load(data, (src >= 0).long(), e, longest + max_new_tokens)
            suffix = [suffixes[i][b] for i, b in rows]
            logits = batch.feed(suffix, pad_id)
            start = e + torch.tensor([len(x) for x in suffix], device=device)  # each row's stream length: prefix + suffix
            draw = draw_rule(keys=keys[part].to(device), start=start, greedy=greedy)
            parts.append(decode(batch, logits, torch.full((n,), max_new_tokens), stop_ids, pad_id, draw))
            order.append(part)
        out = cat_sampled(parts, pad_id)
        inverse = torch.empty(len(owners), dtype=torch.long)
        inverse[torch.cat(order)] = torch.arange(len(owners))
        return out.tokens[inverse], out.lengths[inverse], owners
