"""Advantage estimators (metarl_llm/advantages.py) against independent references.

GAE is checked against a per-row Python loop over the action positions; the
invariance to inserted observation tokens (docs/design.md section 5) is checked for
gae, grpo and rloo; grpo/rloo against hand-computed numbers.
"""

from __future__ import annotations

import random

import pytest
import torch

from metarl_llm.rl.advantages import ADVANTAGES, compress, episode_credit, gae, get_advantage, grpo, rloo, whiten

# ----------------------------------------------------------------------------- helpers


def reference_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Plain per-row loop: over the action positions only, V after the last action = 0."""
    adv = torch.zeros(rewards.shape, dtype=torch.float64)
    ret = torch.zeros(rewards.shape, dtype=torch.float64)
    for i in range(rewards.shape[0]):
        pos = [t for t in range(rewards.shape[1]) if mask[i, t] > 0]
        running = 0.0
        for k in range(len(pos) - 1, -1, -1):
            v_k = float(values[i, pos[k]])
            v_next = float(values[i, pos[k + 1]]) if k + 1 < len(pos) else 0.0
            delta = float(rewards[i, pos[k]]) + gamma * v_next - v_k
            running = delta + gamma * lam * running
            adv[i, pos[k]] = running
            ret[i, pos[k]] = running + v_k
    return adv, ret


def random_stream_batch(gen: torch.Generator, b: int, t: int):
    """Random [B, T] rewards/values/action mask: position 0 is a prompt token (never an
    action, the alignment convention of models.py), actions come in runs separated by
    observation gaps, and each row is right padded after a random length."""
    mask = torch.zeros(b, t)
    for i in range(b):
        length = int(torch.randint(2, t + 1, (1,), generator=gen))
        mask[i, 1:length] = (torch.rand(length - 1, generator=gen) < 0.6).float()
        if i == 0:
            mask[i, 1:t] = 1.0  # one row that is all actions after the prompt, no padding
    rewards = torch.randn(b, t, generator=gen)
    values = torch.randn(b, t, generator=gen)
    return rewards, values, mask


def insert_observations(rng: random.Random, rewards, values, mask, max_insert: int = 4):
    """Insert 1..max_insert observation tokens (mask 0, arbitrary reward/value) at random
    places of every row (before, between and after action tokens), re-pad on the right.

    Returns the new tensors and, per row, the new column of each old column."""
    rows, where = [], []
    for i in range(mask.shape[0]):
        cols = [(float(rewards[i, t]), float(values[i, t]), float(mask[i, t]), t) for t in range(mask.shape[1])]
        for _ in range(rng.randint(1, max_insert)):
            at = rng.randint(1, len(cols))  # after the prompt token, anywhere up to the end
            cols.insert(at, (rng.uniform(-50, 50), rng.uniform(-50, 50), 0.0, None))
        rows.append(cols)
    t_new = max(len(c) for c in rows)
    r = torch.zeros(mask.shape[0], t_new)
    v = torch.zeros(mask.shape[0], t_new)
    m = torch.zeros(mask.shape[0], t_new)
    for i, cols in enumerate(rows):
        mapping = {}
        for j, (rr, vv, mm, old) in enumerate(cols):
            r[i, j], v[i, j], m[i, j] = rr, vv, mm
            if old is not None:
                mapping[old] = j
        # padding columns: arbitrary garbage, never an action
        r[i, len(cols) :] = 1e3
        v[i, len(cols) :] = -1e3
        where.append(mapping)
    return r, v, m, where


# ----------------------------------------------------------------------------- GAE


@pytest.mark.parametrize("seed", range(8))
def test_gae_matches_reference_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 6, (1,), generator=gen))
    t = int(torch.randint(2, 20, (1,), generator=gen))
    gamma = float(torch.rand((), generator=gen)) * 0.5 + 0.5
    lam = float(torch.rand((), generator=gen))
    rewards, values, mask = random_stream_batch(gen, b, t)

    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = reference_gae(rewards, values, mask, gamma, lam)

    torch.testing.assert_close(adv.double(), ref_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, rtol=1e-5, atol=1e-5)
    off = mask == 0
    assert torch.all(adv[off] == 0) and torch.all(ret[off] == 0)
    # returns are A + V on action tokens
    on = mask > 0
    torch.testing.assert_close(ret[on], adv[on] + values[on])


def test_gae_hand_computed():
    # stream: prompt, a0, obs, a1, a2, pad ; gamma=0.5, lam=0.5
    #   r = [., 0, 9, 1, 2, .]   v = [., 1, 7, 2, 4, .]   (obs/pad entries must be ignored)
    # delta_2 = 2 + 0.5*0 - 4       = -2      A_2 = -2
    # delta_1 = 1 + 0.5*4 - 2       =  1      A_1 = 1 + 0.25*(-2)  =  0.5
    # delta_0 = 0 + 0.5*2 - 1       =  0      A_0 = 0 + 0.25*0.5   =  0.125
    rewards = torch.tensor([[5.0, 0.0, 9.0, 1.0, 2.0, 3.0]])
    values = torch.tensor([[5.0, 1.0, 7.0, 2.0, 4.0, 3.0]])
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.125, 0.0, 0.5, -2.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 1.125, 0.0, 2.5, 2.0, 0.0]]))


def test_gae_action_at_position_zero():
    """A row whose first token is an action, shorter than the other row.

    (models.py's convention keeps position 0 a non-action, but gae is a public
    estimator and must not silently drop an action's advantage.)
    """
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    values = torch.zeros(2, 4)
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(ret, adv)


# ----------------------------------------------------------------------------- invariance


def _action_values(x: torch.Tensor, mask: torch.Tensor, i: int) -> torch.Tensor:
    return x[i][mask[i] > 0]


@pytest.mark.parametrize("name", ["gae", "grpo", "rloo"])
@pytest.mark.parametrize("seed", range(4))
def test_inserting_observation_tokens_changes_no_advantage(name, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    rng = random.Random(seed)
    b, t = 6, 14
    rewards, values, mask = random_stream_batch(gen, b, t)
    for i in range(b):  # every row keeps at least one action
        mask[i, 1] = 1.0
    group = torch.tensor([0, 2, 1, 1, 0, 2])  # interleaved groups, each of >= 2 trials
    kwargs = dict(gamma=0.9, lam=0.8, group=group)

    adv, ret = ADVANTAGES[name](rewards, values, mask, **kwargs)
    r2, v2, m2, where = insert_observations(rng, rewards, values, mask)
    assert m2.sum() == mask.sum() and m2.shape[1] >= mask.shape[1]
    adv2, ret2 = ADVANTAGES[name](r2, v2, m2, **kwargs)

    for i in range(b):
        torch.testing.assert_close(_action_values(adv2, m2, i), _action_values(adv, mask, i), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(_action_values(ret2, m2, i), _action_values(ret, mask, i), rtol=1e-6, atol=1e-6)
        # and each action token kept its own advantage (positions mapped through the insertion)
        for old, new in where[i].items():
            if mask[i, old] > 0:
                assert abs(float(adv2[i, new]) - float(adv[i, old])) < 1e-5
    assert torch.all(adv2[m2 == 0] == 0) and torch.all(ret2[m2 == 0] == 0)


# ----------------------------------------------------------------------------- grpo / rloo


def _group_batch():
    """7 trials, groups interleaved: group 5 has returns [1, 0, 1, 1], group 9 [0, 0, 1].

    Each return is spread over two action tokens (0.4 + 0.6); a large reward sits on a
    non-action token of every row and must be ignored.
    """
    group = torch.tensor([5, 9, 5, 5, 9, 5, 9])
    returns = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]] * 7)
    mask[1, 4] = 1.0  # rows may have different numbers of action tokens
    rewards = torch.zeros(7, 5)
    rewards[:, 1] = 0.4 * returns
    rewards[:, 3] = 0.6 * returns
    rewards[:, 0] = 100.0  # prompt position
    rewards[:, 2] = -100.0  # observation position
    return rewards, mask, group, returns


def test_grpo_hand_computed():
    rewards, mask, group, returns = _group_batch()
    eps = 0.1
    adv, ret = grpo(rewards, torch.zeros_like(rewards), mask, group=group, eps=eps)
    # group 5: R = [1, 0, 1, 1], mean 0.75,
    #   unbiased var = (3 * 0.25^2 + 0.75^2) / 3 = 0.75 / 3 = 0.25, std 0.5
    #   A(R=1) = 0.25 / (0.5 + 0.1) = 0.41667   A(R=0) = -0.75 / 0.6 = -1.25
    # group 9: R = [0, 0, 1], mean 1/3,
    #   unbiased var = (2 * (1/3)^2 + (2/3)^2) / 2 = (6/9) / 2 = 1/3, std = 0.57735
    #   A(R=0) = -(1/3) / 0.67735 = -0.49211   A(R=1) = (2/3) / 0.67735 = 0.98422
    s9 = (1 / 3) ** 0.5
    a5_one, a5_zero = 0.25 / 0.6, -0.75 / 0.6
    a9_zero, a9_one = -(1 / 3) / (s9 + eps), (2 / 3) / (s9 + eps)
    expected = torch.tensor([a5_one, a9_zero, a5_zero, a5_one, a9_zero, a5_one, a9_one])
    torch.testing.assert_close(adv, expected[:, None] * mask)
    torch.testing.assert_close(ret, returns[:, None] * mask)


def test_grpo_default_eps_is_small():
    rewards, mask, group, _ = _group_batch()
    adv, _ = grpo(rewards, torch.zeros_like(rewards), mask, group=group)
    # with eps ~ 0 group 5's advantages are 0.25/0.5 = 0.5 and -0.75/0.5 = -1.5
    assert abs(float(adv[0, 1]) - 0.5) < 1e-4
    assert abs(float(adv[2, 1]) + 1.5) < 1e-4


def test_rloo_hand_computed():
    rewards, mask, group, returns = _group_batch()
    adv, ret = rloo(rewards, torch.zeros_like(rewards), mask, group=group)
    # group 5, R = [1, 0, 1, 1], total 3:
    #   R=1: baseline (3 - 1) / 3 = 2/3 -> A = 1/3 ;  R=0: baseline 3/3 = 1 -> A = -1
    # group 9, R = [0, 0, 1], total 1:
    #   R=0: baseline (1 - 0) / 2 = 0.5 -> A = -0.5 ;  R=1: baseline 0/2 = 0 -> A = 1
    expected = torch.tensor([1 / 3, -0.5, -1.0, 1 / 3, -0.5, 1 / 3, 1.0])
    torch.testing.assert_close(adv, expected[:, None] * mask)
    torch.testing.assert_close(ret, returns[:, None] * mask)


def test_rloo_singleton_group_raises():
    rewards, mask, _, _ = _group_batch()
    group = torch.tensor([0, 0, 1, 1, 2, 3, 3])  # group 2 has one trial
    with pytest.raises(ValueError, match="at least 2"):
        rloo(rewards, torch.zeros_like(rewards), mask, group=group)


def test_get_advantage_unknown_names_options():
    assert get_advantage("gae") is gae
    with pytest.raises(ValueError) as err:
        get_advantage("nope")
    msg = str(err.value)
    assert "'nope'" in msg
    for name in ("gae", "grpo", "rloo"):
        assert name in msg


# ----------------------------------------------------------------------------- whiten / compress


def test_whiten_masked_moments():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 11, generator=gen) * 3 + 2
    mask = (torch.rand(5, 11, generator=gen) < 0.5).float()
    x_garbage = torch.where(mask > 0, x, torch.full_like(x, 1e6))  # huge values off the mask
    w = whiten(x_garbage, mask)
    sel = w[mask > 0].double()
    assert abs(float(sel.mean())) < 1e-5
    assert abs(float(((sel - sel.mean()) ** 2).mean()) - 1.0) < 1e-4
    assert torch.all(w[mask == 0] == 0)
    # independent reference: standardise the selected entries
    xs = x[mask > 0].double()
    torch.testing.assert_close(sel, (xs - xs.mean()) / xs.std(unbiased=False), rtol=1e-4, atol=1e-4)


def test_compress_gives_action_positions_in_order():
    mask = torch.tensor([[0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    index, valid = compress(mask.float())
    assert index.shape == valid.shape == (4, 3)
    assert index[0].tolist() == [1, 3, 4]
    assert index[1, :1].tolist() == [4]
    assert index[3].tolist() == [0, 1, 2]
    assert valid.tolist() == [[True] * 3, [True, False, False], [False] * 3, [True] * 3]
    # invalid slots point at position 0
    assert torch.all(index[~valid] == 0)


# ------------------------------------------------------------------- episode credit


def test_episode_credit_hand_built():
    # trial 0: prompt, ep 0 (2 tokens), observation, ep 1 (1 token), answer ep 2 (1 token), pad
    # trial 1: prompt, ep 0 (3 tokens), pad...
    episode = torch.tensor([[-1, 0, 0, -1, 1, 2, -1], [-1, 0, 0, 0, -1, -1, -1]])
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0]], dtype=torch.float32)
    credit = episode_credit(episode, mask, [[0.25, -0.5], [0.125]])  # no entry for trial 0's answer episode
    expected = torch.tensor([[0, 0.25, 0.25, 0, -0.5, 0, 0], [0, 0.125, 0.125, 0.125, 0, 0, 0]])
    torch.testing.assert_close(credit, expected)
    assert torch.all(episode_credit(episode, mask, [[], []]) == 0)
    with pytest.raises(ValueError, match="2 trials"):
        episode_credit(episode, mask, [[0.1]])


def test_episode_credit_is_local_where_reward_placement_telescopes():
    """With gamma = lambda = 1 a bonus placed in the reward reaches every earlier token;
    episode credit gives each episode's tokens their own episode's bonus only."""
    episode = torch.tensor([[-1, 0, 0, 1, 1, 2]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    bonus = [[0.3, -0.1]]
    rewards = torch.zeros(1, 6)
    rewards[0, 2], rewards[0, 4], rewards[0, 5] = 0.3, -0.1, 1.0  # bonuses on each episode's last token, outcome at the end
    adv, _ = gae(rewards, torch.zeros(1, 6), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0, 1.2, 1.2, 0.9, 0.9, 1.0]]))  # 1 + 0.3 - 0.1 on episode 0
    outcome_only = rewards.clone()
    outcome_only[0, 2] = outcome_only[0, 4] = 0.0
    adv_out, _ = gae(outcome_only, torch.zeros(1, 6), mask, gamma=1.0, lam=1.0)
    local = adv_out + episode_credit(episode, mask, bonus)
    torch.testing.assert_close(local, torch.tensor([[0, 1.3, 1.3, 0.9, 0.9, 1.0]]))


# ------------------------------------------------------------ MRT's termination baseline


def _two_trials():
    """Two trials of two episodes each, same layout, outcome 1 and 0 on their last tokens;
    episode j's tokens get J right before it from ``curves``."""
    episode = torch.tensor([[-1, 0, 0, -1, 1, 1], [-1, 0, 0, -1, 1, 1]])
    mask = (episode >= 0).to(torch.float64)
    rewards = torch.zeros(2, 6, dtype=torch.float64)
    rewards[0, 5], rewards[1, 5] = 1.0, 0.0
    return episode, mask, rewards


def test_the_termination_baseline_is_r_minus_j_before_each_episode():
    from metarl_llm.rl.advantages import termination

    episode, mask, rewards = _two_trials()
    curves = [[0.2, 0.7], [0.2, 0.1]]  # J after the prompt, J after episode 0
    term = episode_credit(episode, mask, curves)
    adv, ret = termination(rewards, torch.zeros_like(rewards), mask, termination_value=term)
    expect = torch.tensor([[0, 0.8, 0.8, 0, 0.3, 0.3], [0, -0.2, -0.2, 0, -0.1, -0.1]], dtype=torch.float64)
    torch.testing.assert_close(adv, expect)
    torch.testing.assert_close(ret, torch.tensor([[0, 1, 1, 0, 1, 1], [0.0] * 6], dtype=torch.float64))
    with pytest.raises(ValueError, match="algo.advantage=termination needs J"):
        termination(rewards, torch.zeros_like(rewards), mask)


def test_the_termination_baseline_depends_on_the_history_not_the_episode_index():
    """Same episode index and return, different histories (J before episode 1): different
    advantages. And no statistic pooled per episode index: a trial's advantages are the same
    alone and beside any other trials (a per-index mean would move with the batch)."""
    from metarl_llm.rl.advantages import termination

    episode, mask, rewards = _two_trials()
    rewards[1, 5] = 1.0  # both succeed: equal R at every episode index
    curves = [[0.2, 0.9], [0.2, 0.3]]
    adv, _ = termination(rewards, torch.zeros_like(rewards), mask, termination_value=episode_credit(episode, mask, curves))
    assert adv[0, 1] == adv[1, 1]  # the same state (J after the prompt): the same baseline
    assert float(adv[0, 4]) == pytest.approx(0.1) and float(adv[1, 4]) == pytest.approx(0.7)  # same index, other state
    alone, _ = termination(
        rewards[:1], torch.zeros_like(rewards[:1]), mask[:1], termination_value=episode_credit(episode[:1], mask[:1], curves[:1])
    )
    torch.testing.assert_close(alone, adv[:1])
    assert "termination" in ADVANTAGES
