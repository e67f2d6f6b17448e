"""Advantage estimators: small registered functions (select with ``algo.advantage``).

Every estimator takes [B, T] tensors and returns ``(advantages, returns)``, both
[B, T] and zero off action tokens. They look only at action tokens: observation and
prompt tokens are part of the transition, so inserting or removing them changes no
advantage. Episode boundaries are not terminal; the trial end is.
"""

from __future__ import annotations

from typing import Callable

import torch

from metarl_llm.core.registry import Registry

AdvantageFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
ADVANTAGES = Registry("advantage estimator", "algo.advantage")  # name -> AdvantageFn
register_advantage = ADVANTAGES.register
get_advantage = ADVANTAGES.lookup


def compress(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices of action tokens, in order.

    mask [B, T] -> (index [B, A], valid [B, A]) where A is the most action tokens of
    any row; ``index[i, :n_i]`` are row i's action positions, the rest point at 0 and
    are invalid.
    """
    m = mask > 0
    counts = m.sum(1)
    width = int(counts.max()) if m.numel() else 0
    order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return torch.where(valid, order, 0), valid


@register_advantage("gae")
def gae(
    token_rewards: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor, *, gamma: float, lam: float, **_
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the sequence of action tokens.

    The next state of action k is the state before action k+1 (whatever observation
    tokens lie between); after the last action the trial ends (V = 0).
    """
    index, valid = compress(action_mask)
    r = token_rewards.gather(1, index) * valid
    v = values.gather(1, index) * valid
    b, a = r.shape
    adv = torch.zeros_like(r)
    running = torch.zeros(b, dtype=r.dtype, device=r.device)
    for k in range(a - 1, -1, -1):  # loop over positions, vectorised over trials
        next_valid = valid[:, k + 1].to(r.dtype) if k + 1 < a else torch.zeros_like(running)
        next_v = v[:, k + 1] * next_valid if k + 1 < a else torch.zeros_like(running)
        delta = r[:, k] + gamma * next_v - v[:, k]
        running = (delta + gamma * lam * next_valid * running) * valid[:, k]
        adv[:, k] = running
    # Write back only valid slots: invalid ones point at column 0 and would collide.
    rows = torch.arange(b, device=index.device)[:, None].expand_as(index)
    out_adv = torch.zeros_like(token_rewards)
    out_adv[rows[valid], index[valid]] = adv[valid]
    out_ret = torch.zeros_like(token_rewards)
    out_ret[rows[valid], index[valid]] = (adv + v)[valid]
    return out_adv, out_ret


def _group_returns(
    token_rewards: torch.Tensor, action_mask: torch.Tensor, group: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trial returns R [B] (undiscounted sum over action tokens), each trial's group slot
    [B], and per group the trial count and the sum of R [G]."""
    ret = (token_rewards * action_mask).sum(1)
    _, inv = torch.unique(group, return_inverse=True)
    n = torch.zeros(int(inv.max()) + 1, dtype=ret.dtype, device=ret.device).index_add_(0, inv, torch.ones_like(ret))
    return ret, inv, n, torch.zeros_like(n).index_add_(0, inv, ret)


@register_advantage("grpo")
def grpo(
    token_rewards: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor, *, group: torch.Tensor, eps: float = 1e-6, **_
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-normalised trial return, (R - mean_g) / (std_g + eps), on every action token.

    R is the undiscounted sum of the trial's token rewards (outcome + bonuses + KL).
    """
    ret, inv, n, total = _group_returns(token_rewards, action_mask, group)
    mean = total / n
    var = torch.zeros_like(n).index_add_(0, inv, (ret - mean[inv]) ** 2) / (n - 1).clamp(min=1)
    adv = (ret - mean[inv]) / (var[inv].sqrt() + eps)
    return adv[:, None] * action_mask, ret[:, None] * action_mask


@register_advantage("rloo")
def rloo(
    token_rewards: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor, *, group: torch.Tensor, **_
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out: R_i minus the mean return of the other trials of its group."""
    ret, inv, n, total = _group_returns(token_rewards, action_mask, group)
    if bool((n < 2).any()):
        raise ValueError("rloo needs at least 2 trials per problem group (algo.group_size >= 2)")
    baseline = (total[inv] - ret) / (n[inv] - 1)
    return (ret - baseline)[:, None] * action_mask, ret[:, None] * action_mask


@register_advantage("termination")
def termination(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    termination_value: torch.Tensor | None = None,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MRT's RL baseline (the released recipe of Qu et al. 2025): on every action token of episode
    j, R - R_term(j). R is the trial's return (the sum of its token rewards); R_term(j) the reward
    of terminating there, i.e. of forcing the answer right before episode j: J at that boundary,
    the meta-prover's estimate from the prompt and episodes 0..j-1 (``termination_value`` [B, T],
    :func:`episode_credit` of the J curves, built by the trainer).

    The baseline is a function of the state (the history so far), never of the episode index
    alone: two trials at the same episode with different histories get different baselines, and
    no statistic is pooled per episode index across the batch. Such pooling is biased when the
    policy decides how many episodes to take: the trials that reach episode j are not a sample
    of all trials.
    """
    if termination_value is None:
        raise ValueError(
            "algo.advantage=termination needs J at every episode boundary (R_term), which the trainer "
            "estimates with bonus.estimator; call it with termination_value=[B, T]"
        )
    ret = (token_rewards * action_mask).sum(1)  # [B]
    return (ret[:, None] - termination_value) * action_mask, ret[:, None] * action_mask


def episode_credit(episode_index: torch.Tensor, action_mask: torch.Tensor, episode_bonus: list[list[float]]) -> torch.Tensor:
    """MRT's dense credit: the bonus of episode j on every action token of episode j.

    episode_index [B, T] (episode of each token, -1 off episodes), action_mask [B, T],
    ``episode_bonus[i][j]`` the bonus of trial i's episode j (episodes without an entry,
    such as the final-answer one, get 0). Returns [B, T], 0 off action tokens.

    Added to the advantages of an estimator run on outcome (and KL) rewards alone, this
    credits each episode with its own progress only. Placed in the reward instead
    (``bonus.credit=return``), a bonus flows into the returns of every earlier token:
    with gamma = lambda = 1 the bonuses from episode j on sum to
    alpha * (J_last - J_{j-1}), whose J_{j-1} part is fixed by the state, so the policy
    gradient sees only alpha * J_last and no per-episode progress.
    """
    b = episode_index.shape[0]
    if len(episode_bonus) != b:
        raise ValueError(f"episode_credit: {len(episode_bonus)} bonus lists for {b} trials")
    width = max([len(x) for x in episode_bonus] + [int(episode_index.max()) + 1, 1])
    table = torch.zeros((b, width + 1), dtype=action_mask.dtype, device=action_mask.device)  # column `width`: no bonus
    for i, bonuses in enumerate(episode_bonus):
        table[i, : len(bonuses)] = torch.as_tensor(bonuses, dtype=table.dtype)
    slot = torch.where(episode_index >= 0, episode_index, width)
    return table.gather(1, slot) * action_mask


def combine_advantages(
    advantages: torch.Tensor, action_mask: torch.Tensor, bonus_credit: torch.Tensor | None, whiten_outcome: bool
) -> torch.Tensor:
    """The advantages the update uses: the estimator's advantages [B, T] (of the outcome and
    KL rewards; with ``bonus.credit=return`` of the bonuses too), whitened over the batch's
    action tokens when ``whiten_outcome`` (``algo.whiten_advantages``), plus ``bonus_credit``
    [B, T] (:func:`episode_credit`, ``bonus.credit=episode``) added *after* the whitening.

    Why after: whitening the sum rescales it to unit size, so where the outcome advantages
    vanish (a batch whose trials all fail, or all succeed, under a group baseline) the
    bonus alone is blown up to full-size steps, and alpha 0.05 and alpha 1.0 give the same
    update. Added after, the bonus stays in reward units beside outcome advantages of unit
    scale (a 0/1 outcome's advantages have a scale of at most 1 before whitening too): the
    update scales with alpha, and alpha is the bonus's weight against a unit outcome
    advantage. Off action tokens the result is 0.
    """
    out = whiten(advantages, action_mask) if whiten_outcome else advantages * action_mask
    return out if bonus_credit is None else out + bonus_credit * action_mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; 0 elsewhere."""
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask
