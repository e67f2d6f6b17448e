"""The rollout batch: right-padded [B, T] tensors, one row per trial (DESIGN.md section 5).

Rewards are placed on action tokens only:
- the bonus of episode j on episode j's last action token;
- the outcome on the trial's last action token (the trial end, the only terminal);
- with ``kl_in_reward``, ``-kl_coef * (logprob - ref_logprob)`` on every action token.

The bonuses are placed here with ``bonus.credit=return``. With the default
``bonus.credit=episode`` the trainer places outcome and KL only and adds each episode's
bonus to the advantages of that episode's tokens (``metarl_llm.advantages.episode_credit``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from metarl_llm.rollout import Trial


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


def collate(trials: list[Trial], pad_id: int) -> RolloutBatch:
    """Stack trials into a right-padded batch (model-derived fields zero until scored)."""
    b, t = len(trials), max(len(tr.ids) for tr in trials)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    attention = torch.zeros((b, t), dtype=torch.long)
    action = torch.zeros((b, t))
    episode = torch.full((b, t), -1, dtype=torch.long)
    for i, tr in enumerate(trials):
        n = len(tr.ids)
        input_ids[i, :n] = torch.as_tensor(tr.ids)
        attention[i, :n] = 1
        action[i, :n] = torch.as_tensor(tr.action, dtype=torch.float32)
        episode[i, :n] = torch.as_tensor(tr.episode)
    zeros = torch.zeros((b, t))
    return RolloutBatch(
        input_ids, attention, action, episode, zeros, zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone(),
        zeros.clone(), torch.tensor([tr.outcome for tr in trials]), torch.tensor([tr.group for tr in trials]),
    )


def place_rewards(
    batch: RolloutBatch, episode_bonus: list[list[float]], kl_coef: float, kl_in_reward: bool
) -> torch.Tensor:
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
