"""PPO losses and the update (metarl_llm/ppo.py) on hand-computed examples.

Every loss is a token mean over the action tokens; masked (prompt, observation, pad)
entries carry huge numbers in these tests and must not change any result.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from metarl_llm.config import AlgoConfig, TinyModelConfig
from metarl_llm.core.batch import RolloutBatch, collate
from metarl_llm.core.trial import Trial
from metarl_llm.models import ActorCritic, Scores, build_char_tokenizer, build_tiny_model
from metarl_llm.rl.losses import clipped_value_loss, explained_variance, get_policy_loss, kl_k3, masked_mean, ppo_clip, reinforce
from metarl_llm.rl.update import ppo_update

HUGE = 1e6

# ----------------------------------------------------------------------------- ppo_clip


def _clip_example():
    """Five action tokens and one masked token (huge numbers), clip_eps = 0.2.

    token  ratio  A     unclipped rho*A   clipped clip(rho)*A   min      clipped term taken?
      0    1.5    2     3.0               1.2*2  = 2.4          2.4      yes
      1    0.5    1     0.5               0.8*1  = 0.8          0.5      no
      2    1.5   -1    -1.5               1.2*-1 = -1.2        -1.5      no
      3    0.5   -3    -1.5               0.8*-3 = -2.4        -2.4      yes
      4    1.1    1     1.1               1.1                   1.1      no (inside the range)
      5   (masked: log ratio +30, A = 1e6)
    """
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1, math.exp(30.0)])
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -40.0])
    logprobs = old + ratios.log()
    advantages = torch.tensor([2.0, 1.0, -1.0, -3.0, 1.0, HUGE])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    return logprobs[None], old[None], advantages[None], mask[None]


def test_ppo_clip_hand_computed():
    logprobs, old, adv, mask = _clip_example()
    loss, stats = ppo_clip(logprobs, old, adv, mask, clip_eps=0.2)
    # loss = -(2.4 + 0.5 - 1.5 - 2.4 + 1.1) / 5 = -(0.1) / 5 = -0.02
    assert abs(float(loss) - (-0.02)) < 1e-5
    # clipfrac: tokens 0 and 3 of 5
    assert abs(float(stats["clipfrac"]) - 0.4) < 1e-6
    # approx_kl = mean((rho - 1) - log rho):
    #   rho 1.5: 0.5 - 0.405465 = 0.094535 (twice)
    #   rho 0.5: -0.5 + 0.693147 = 0.193147 (twice)
    #   rho 1.1: 0.1 - 0.095310 = 0.004690
    expected_kl = (2 * 0.094535 + 2 * 0.193147 + 0.004690) / 5
    assert abs(float(stats["approx_kl"]) - expected_kl) < 1e-5


def test_ppo_clip_gradient():
    logprobs, old, adv, mask = _clip_example()
    lp = logprobs.clone().requires_grad_(True)
    loss, _ = ppo_clip(lp, old, adv, mask, clip_eps=0.2)
    loss.backward()
    # d/dlp of -rho*A/N is -A*rho/N on tokens where the unclipped term is taken, 0 where
    # the clipped one is (clip() is flat there), 0 on masked tokens. N = 5.
    #   token 1: -1 * 0.5 / 5 = -0.1     token 2: -(-1) * 1.5 / 5 = 0.3
    #   token 4: -1 * 1.1 / 5 = -0.22    tokens 0, 3, 5: 0
    expected = torch.tensor([[0.0, -0.1, 0.3, 0.0, -0.22, 0.0]])
    torch.testing.assert_close(lp.grad, expected, rtol=1e-5, atol=1e-6)


def test_ppo_clip_ignores_masked_entries():
    logprobs, old, adv, mask = _clip_example()
    keep = mask[0] > 0
    loss_full, stats_full = ppo_clip(logprobs, old, adv, mask, clip_eps=0.2)
    loss_kept, stats_kept = ppo_clip(logprobs[:, keep], old[:, keep], adv[:, keep], torch.ones(1, int(keep.sum())), clip_eps=0.2)
    torch.testing.assert_close(loss_full, loss_kept)
    for k in ("clipfrac", "approx_kl"):
        torch.testing.assert_close(stats_full[k], stats_kept[k])


def test_reinforce_hand_computed():
    lp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0, -0.5 - math.log(2.0), -3.0]])  # token 2: ratio 2
    adv = torch.tensor([[1.0, -2.0, 0.5, HUGE]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = reinforce(lp, old, adv, mask)
    # loss = mean(-A * lp) = -(1*-1 + -2*-2 + 0.5*-0.5) / 3 = -(-1 + 4 - 0.25) / 3 = -2.75 / 3
    assert abs(float(loss.detach()) - (-2.75 / 3)) < 1e-6
    assert float(stats["clipfrac"]) == 0.0
    # approx_kl: only token 2 differs, rho = 2: (2 - 1) - ln 2 = 0.306853; / 3 tokens
    assert abs(float(stats["approx_kl"]) - (1 - math.log(2.0)) / 3) < 1e-6
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1 / 3, 2 / 3, -0.5 / 3, 0.0]]))


def test_get_policy_loss_registry():
    assert get_policy_loss("ppo_clip") is ppo_clip
    assert get_policy_loss("reinforce") is reinforce
    with pytest.raises(ValueError, match="ppo_clip"):
        get_policy_loss("nope")


# ----------------------------------------------------------------------------- value loss, k3, EV


def test_clipped_value_loss_takes_the_max():
    # clip c = 0.2
    # token  V_old  V    R     (V-R)^2        V_clip = V_old + clip(V - V_old)   (V_clip-R)^2   max
    #   0    0      1    2     1              0.2                                3.24           3.24
    #   1    0      1    0.1   0.81           0.2                                0.01           0.81
    #   2    0      0.1  1     0.81           0.1 (inside the clip)              0.81           0.81
    #   3    0     -1   -2     1             -0.2                                3.24           3.24
    #   4    masked: huge numbers
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0, -HUGE]])
    values = torch.tensor([[1.0, 1.0, 0.1, -1.0, HUGE]])
    returns = torch.tensor([[2.0, 0.1, 1.0, -2.0, HUGE]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss = clipped_value_loss(values, old, returns, mask, clip=0.2)
    expected = 0.5 * (3.24 + 0.81 + 0.81 + 3.24) / 4  # = 1.0125
    assert abs(float(loss) - expected) < 1e-5


def test_kl_k3():
    gen = torch.Generator().manual_seed(0)
    lp = -torch.rand(50, generator=gen) * 5
    torch.testing.assert_close(kl_k3(lp, lp), torch.zeros(50))
    ref = lp + torch.randn(50, generator=gen)
    k3 = kl_k3(lp, ref)
    assert torch.all(k3 > 0)
    # hand value: logprob 0, ref = ln 0.5: d = -0.693147, exp(d) - d - 1 = 0.5 + 0.693147 - 1
    assert abs(float(kl_k3(torch.tensor(0.0), torch.tensor(math.log(0.5)))) - 0.193147) < 1e-5
    # unbiased for KL(pi || ref): with x ~ pi, E[k3] equals the exact KL (3-way categorical)
    pi = torch.tensor([0.5, 0.3, 0.2])
    pr = torch.tensor([0.2, 0.2, 0.6])
    exact = float((pi * (pi / pr).log()).sum())
    expectation = float((pi * kl_k3(pi.log(), pr.log())).sum())
    assert abs(expectation - exact) < 1e-6


def test_explained_variance():
    gen = torch.Generator().manual_seed(1)
    returns = torch.randn(3, 8, generator=gen)
    mask = (torch.rand(3, 8, generator=gen) < 0.7).float()
    mask[0, 0] = mask[0, 1] = 1.0
    garbage = torch.where(mask > 0, torch.zeros(()), torch.full((), HUGE))
    r = returns + garbage
    # perfect critic -> 1 (even with huge garbage off the mask)
    assert abs(explained_variance(returns - garbage, r, mask) - 1.0) < 1e-6
    # a constant equal to the masked mean of the returns -> 0
    mean = float((returns * mask).sum() / mask.sum())
    assert abs(explained_variance(torch.full_like(r, mean) - garbage, r, mask)) < 1e-5
    # constant returns -> undefined
    assert math.isnan(explained_variance(torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3)))


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, HUGE], [3.0, -HUGE, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert float(masked_mean(x, mask)) == 3.0  # (1 + 2 + 3 + 6) / 4
    assert float(masked_mean(x, torch.zeros_like(mask))) == 0.0


# ----------------------------------------------------------------------------- ppo_update


def _tiny_setup(seed: int = 0):
    tok = build_char_tokenizer()
    cfg = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model = build_tiny_model(cfg, len(tok), tok.pad_token_id, seed)
    return tok, ActorCritic(model)


def _trial(tok, group: int, ep0: str, obs: str, ep1: str) -> Trial:
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    t = Trial(problem_id=f"p{group}", group=group)
    t.append([tok.bos_token_id] + enc("Q:"), False, -1)
    t.append(enc(ep0), True, 0)
    t.append(enc(obs), False, -1)
    t.append(enc(ep1), True, 1)
    return t


def _scored_batch(tok, ac: ActorCritic) -> RolloutBatch:
    trials = [
        _trial(tok, 0, "ab", "|", "ab"),  # advantage +1
        _trial(tok, 0, "xy", "|", "xy"),  # advantage -1
        _trial(tok, 1, "cd", "||", "c"),  # advantage 0 (shorter/longer rows: padding)
        _trial(tok, 1, "e", "|", "e"),  # advantage 0
    ]
    batch = collate(trials, tok.pad_token_id)
    mask = batch.action_mask
    with torch.no_grad():
        s = ac.score(batch.input_ids, batch.attention_mask, with_values=True)
    lp, v = s.logprobs * mask, s.values * mask
    adv = torch.zeros_like(mask)
    adv[0] = mask[0]
    adv[1] = -mask[1]
    return batch._replace(logprobs=lp, ref_logprobs=lp.clone(), values=v, advantages=adv, returns=v.clone())


def _trial_logprob(ac: ActorCritic, batch: RolloutBatch, row: int) -> float:
    with torch.no_grad():
        s = ac.score(batch.input_ids, batch.attention_mask, with_values=False)
    return float((s.logprobs[row] * batch.action_mask[row]).sum())


@pytest.mark.parametrize("minibatch_size", [4, 2])
def test_ppo_update_moves_logprobs_with_advantages(minibatch_size):
    torch.manual_seed(0)
    tok, ac = _tiny_setup()
    batch = _scored_batch(tok, ac)
    before = [_trial_logprob(ac, batch, i) for i in range(4)]
    # the stored old log-probs are the model's own
    assert abs(before[0] - float(batch.logprobs[0].sum())) < 1e-5

    cfg = AlgoConfig(ppo_epochs=4, minibatch_size=minibatch_size, lr=1e-2, kl_coef=0.0, whiten_advantages=False)
    opt = torch.optim.Adam(ac.parameters(), lr=cfg.lr)
    stats = ppo_update(ac, opt, batch, cfg, torch.Generator().manual_seed(0), use_critic=True)
    after = [_trial_logprob(ac, batch, i) for i in range(4)]

    assert after[0] > before[0] + 0.1, (before, after)  # positive advantage: more likely
    assert after[1] < before[1] - 0.1, (before, after)  # negative advantage: less likely
    for k in ("loss/policy", "loss/value", "loss/kl", "entropy", "clipfrac", "approx_kl", "grad_norm"):
        assert math.isfinite(stats[k]), k
    assert 0.0 <= stats["clipfrac"] <= 1.0
    assert stats["approx_kl"] >= 0.0
    assert stats["entropy"] > 0.0
    # every epoch forwards every trial once: 4 epochs x the batch's real tokens
    assert stats["update_tokens"] == 4 * int(batch.attention_mask.sum()) > 0


def test_ppo_update_rejects_nan_advantage():
    tok, ac = _tiny_setup()
    batch = _scored_batch(tok, ac)
    adv = batch.advantages.clone()
    first_action = int(batch.action_mask[2].nonzero()[0, 0])
    adv[2, first_action] = float("nan")
    cfg = AlgoConfig(ppo_epochs=1, minibatch_size=4, lr=1e-2, kl_coef=0.0, whiten_advantages=False)
    opt = torch.optim.Adam(ac.parameters(), lr=cfg.lr)
    with pytest.raises(FloatingPointError):
        ppo_update(ac, opt, batch._replace(advantages=adv), cfg, torch.Generator().manual_seed(0), use_critic=True)


class _FixedScorer(nn.Module):
    """A stand-in actor-critic whose per-token log-probs are parameters: row r of the
    batch carries r in input_ids[:, 0] (minibatches are shuffled and trimmed)."""

    def __init__(self, logprobs: torch.Tensor):
        super().__init__()
        self.lp = nn.Parameter(logprobs.clone())

    def score(self, input_ids, attention_mask, with_values=True, with_entropy=False, positions=None):
        # ignores `positions`: it returns log-probs at masked tokens too, which the loss must not use
        lp = self.lp[input_ids[:, 0]][:, : input_ids.shape[1]]
        zeros = torch.zeros_like(lp)
        return Scores(lp, zeros, zeros if with_entropy else None)

    forward = score  # ppo_update calls the module (as a data-parallel wrapper needs)


def test_ppo_update_masked_tokens_never_enter_the_loss():
    """docs/design.md section 5 / ppo.py: prompt and observation tokens never enter a loss.

    The trainer stores old and reference log-probs as 0 off action tokens; here a prompt
    token is very unlikely under the current policy (log-prob -100). With the default KL
    loss (kl_coef 0.02, kl_in_reward False) that masked token must not matter.
    """
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0, 1.0, 1.0]])
    current = torch.tensor([[0.0, -100.0, -1.0, -2.0, -3.0, -1.5], [0.0, -0.5, -2.0, -1.0, -1.0, -0.7]])
    old = current * mask  # what trainer.score_batch stores
    batch = RolloutBatch(
        input_ids=torch.tensor([[0, 5, 6, 7, 8, 9], [1, 5, 6, 7, 8, 9]]),
        attention_mask=torch.ones(2, 6, dtype=torch.long),
        action_mask=mask,
        episode_index=torch.where(mask > 0, 0, -1),
        logprobs=old,
        ref_logprobs=old.clone(),
        values=torch.zeros(2, 6),
        token_rewards=torch.zeros(2, 6),
        advantages=mask * torch.tensor([[1.0], [-1.0]]),
        returns=torch.zeros(2, 6),
        outcome=torch.zeros(2),
        group=torch.zeros(2, dtype=torch.long),
    )
    scorer = _FixedScorer(current)
    cfg = AlgoConfig(ppo_epochs=1, minibatch_size=2, lr=1e-2, whiten_advantages=False)  # default kl_coef
    opt = torch.optim.SGD(scorer.parameters(), lr=cfg.lr)
    stats = ppo_update(scorer, opt, batch, cfg, torch.Generator().manual_seed(0), use_critic=False)
    assert math.isfinite(stats["loss/kl"]) and stats["loss/kl"] == 0.0
    assert torch.all(torch.isfinite(scorer.lp))
