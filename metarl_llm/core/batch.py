"""The rollout batch: right-padded [B, T] tensors, one row per trial (docs/design.md section 5).

Rewards are placed on action tokens only:
- the bonus of episode j on episode j's last action token;
- the outcome on the trial's last action token (the trial end, the only terminal);
- with ``kl_in_reward``, ``-kl_coef * (logprob - ref_logprob)`` on every action token.

The bonuses are placed here with ``bonus.credit=return``. With the default
``bonus.credit=episode`` the trainer places outcome and KL only and adds each episode's
bonus to the advantages of that episode's tokens (``metarl_llm.rl.advantages.episode_credit``).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from metarl_llm.core.trial import Trial


class RolloutBatch(NamedTuple):
    """B trials of padded length T. Per-token fields are [B, T]; per-trial fields [B].

    input_ids       long  the whole stream: prompt, episodes, inserted observations; pad after the end
    attention_mask  long  1 on real tokens
    action_mask     float 1 on tokens sampled from the policy
    episode_index   long  episode of each token, -1 on prompt, observation and pad tokens
    logprobs        float log pi_old(x_t | x_<t) of the sampling policy, scored by a forward pass
    ref_logprobs    float the same under the frozen reference
    values          float critic V(x_<t) at rollout time
    token_rewards   float see the module docstring
    advantages      float computed over action tokens only (0 elsewhere)
    returns         float value targets (0 off action tokens)
    outcome         float [B] the trial's outcome reward
    group           long  [B] problem group (trials of one problem share it)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    episode_index: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    token_rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    outcome: torch.Tensor
    group: torch.Tensor

    def select(self, rows: torch.Tensor) -> "RolloutBatch":
        """The trials ``rows``, trimmed to their longest stream."""
        width = int(self.attention_mask[rows].sum(1).max())
        return RolloutBatch(*(f[rows][:, :width] if f.dim() == 2 else f[rows] for f in self))


def length_buckets(
    lengths: torch.Tensor | list[int], pass_tokens: int, max_tokens: int = 0, max_rows: int = 0
) -> list[torch.Tensor]:
    """Group rows of similar length into forward passes, so that short rows are not padded
    to the longest one.

    lengths [n] (real tokens of each row) -> index tensors into the rows, together a
    partition of ``range(n)``. Rows are sorted longest first (stable) and the sorted order
    is cut into runs; a pass is padded to its own longest row (its first). The cuts
    minimise the padded positions of all passes plus ``pass_tokens`` per pass (what one
    more forward pass costs, in padded positions: the per-call overhead), under two caps
    when > 0: ``max_tokens`` padded positions per pass (a single longer row is a pass of its
    own) and ``max_rows`` rows per pass. Exact dynamic programme over the cut points.
    ``pass_tokens`` 0: no grouping by length: one pass of all rows in their order (with
    ``max_rows``: consecutive chunks of that many rows).
    """
    lengths = torch.as_tensor(lengths).reshape(-1)
    n = lengths.shape[0]
    if pass_tokens < 0 or max_tokens < 0 or max_rows < 0:
        raise ValueError(
            f"length_buckets: pass_tokens, max_tokens and max_rows must be >= 0, got {pass_tokens}, {max_tokens}, {max_rows}"
        )
    if n == 0:
        return [torch.arange(0)]
    if pass_tokens == 0:
        step = max_rows or n
        return [torch.arange(s, min(s + step, n)) for s in range(0, n, step)]
    order = torch.argsort(lengths, descending=True, stable=True)
    sizes = np.asarray(lengths[order].tolist(), dtype=np.float64)
    # best[k]: cost of the first k sorted rows; a pass of sorted rows j..k-1 costs (k - j) * sizes[j] + pass_tokens.
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    starts = np.arange(n)
    for k in range(1, n + 1):
        j = starts[:k]
        cost = best[:k] + (k - j) * sizes[:k] + pass_tokens
        ok = np.ones(k, dtype=bool)
        if max_rows:
            ok &= (k - j) <= max_rows
        if max_tokens:
            ok &= ((k - j) * sizes[:k] <= max_tokens) | (j == k - 1)
        cost[~ok] = np.inf
        cut[k] = int(np.argmin(cost))
        best[k] = cost[cut[k]]
    parts, k = [], n
    while k > 0:
        parts.append(order[cut[k] : k])
        k = int(cut[k])
    return parts[::-1]


def pad_rows(
    rows: Sequence[Sequence], value, *, width: int | None = None, left: bool = False, dtype: torch.dtype = torch.long
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one padding into a rectangle: ``[len(rows), width]`` of ``dtype`` holding the rows, each
    padded with ``value`` on the right (``left=True``: on the left, so that every row's last element
    is in the last column, as a batch about to be continued needs), and the ``[len(rows), width]``
    long mask of the real elements. ``width``: the longest row by default; a longer row is an error."""
    lengths = [len(r) for r in rows]
    width = max(lengths, default=0) if width is None else width
    if lengths and max(lengths) > width:
        raise ValueError(f"pad_rows: a row of {max(lengths)} elements does not fit width {width}")
    out = torch.full((len(rows), width), value, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        cols = slice(width - n, width) if left else slice(0, n)
        out[i, cols] = torch.as_tensor(row, dtype=dtype)
        mask[i, cols] = 1
    return out, mask


def _right_padded(rows: list[list[float]], width: int) -> torch.Tensor:
    """[len(rows), width] float32 of the rows, each right-padded with 0."""
    return pad_rows(rows, 0.0, width=width, dtype=torch.float32)[0]


def sampled_logprobs(trials: list[Trial], width: int) -> torch.Tensor:
    """[B, width] the rollout engine's own log-probs of the sampled tokens
    (``Trial.sample_logprobs``: token-aligned with ``ids``, 0 off action tokens), right-padded with 0."""
    return _right_padded([tr.sample_logprobs for tr in trials], width)


def sampled_values(trials: list[Trial], width: int) -> torch.Tensor:
    """[B, width] the critic's values computed by the rollout engine while sampling
    (``Trial.sample_values``: token-aligned with ``ids``, 0 off action tokens; ``run_trials``
    with ``value_head``), right-padded with 0. A trial without them is an error (never zeros)."""
    for i, tr in enumerate(trials):
        if tr.sample_values is None:
            raise ValueError(
                f"sampled_values: trial {i} ({tr.problem_id}) has no values from the rollout "
                f"(run_trials(..., value_head=...) with an engine that supports it)"
            )
    return _right_padded([tr.sample_values for tr in trials], width)


def collate(trials: list[Trial], pad_id: int) -> RolloutBatch:
    """Stack trials into a right-padded batch (model-derived fields zero until scored)."""
    b, t = len(trials), max(len(tr.ids) for tr in trials)
    input_ids, attention = pad_rows([tr.ids for tr in trials], pad_id)
    action = pad_rows([tr.action for tr in trials], 0.0, width=t, dtype=torch.float32)[0]
    episode = pad_rows([tr.episode for tr in trials], -1, width=t)[0]
    zeros = torch.zeros((b, t))
    return RolloutBatch(
        input_ids,
        attention,
        action,
        episode,
        zeros,
        zeros.clone(),
        zeros.clone(),
        zeros.clone(),
        zeros.clone(),
        zeros.clone(),
        torch.tensor([tr.outcome for tr in trials]),
        torch.tensor([tr.group for tr in trials]),
    )


def place_rewards(batch: RolloutBatch, episode_bonus: list[list[float]], kl_coef: float, kl_in_reward: bool) -> torch.Tensor:
    """token_rewards [B, T] from outcomes, per-episode bonuses and (optionally) the KL penalty.

    ``episode_bonus[i][j]`` is the bonus of trial i's episode j (missing entries: 0).
    """
    mask = batch.action_mask
    b, t = mask.shape
    pos = torch.arange(t).expand(b, t)
    rewards = torch.zeros((b, t))
    last = torch.where(mask > 0, pos, -1).max(1).values
    if bool((last < 0).any()):
        raise ValueError("place_rewards: a trial has no action token")
    rewards[torch.arange(b), last] += batch.outcome
    for i, bonuses in enumerate(episode_bonus):
        for j, value in enumerate(bonuses):
            on_j = (batch.episode_index[i] == j).nonzero()
            if len(on_j) == 0:
                raise ValueError(f"place_rewards: trial {i} has a bonus for episode {j} but no such episode")
            rewards[i, on_j[-1, 0]] += value
    if kl_in_reward and kl_coef:
        rewards -= kl_coef * (batch.logprobs - batch.ref_logprobs) * mask
    return rewards
