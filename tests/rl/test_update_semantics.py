"""What the update optimises (issue 15, items 6 and 8): alpha keeps its meaning under
whitening, and the update's forward pass is the function that sampled the tokens."""

from __future__ import annotations

import torch

from metarl_llm.config import AlgoConfig, ModelConfig, TinyModelConfig
from metarl_llm.core.batch import collate
from metarl_llm.core.trial import Trial
from metarl_llm.models import build_actor_critic, build_char_tokenizer, build_tiny_model
from metarl_llm.rl.advantages import combine_advantages, episode_credit, grpo
from metarl_llm.rl.update import ppo_update


def _trial(tok, group: int, ep0: str, ep1: str) -> Trial:
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    t = Trial(problem_id=f"p{group}", group=group)
    t.append([tok.bos_token_id] + enc("Q:"), False, -1)
    t.append(enc(ep0), True, 0)
    t.append(enc("|"), False, -1)
    t.append(enc(ep1), True, 1)
    return t


def _setup(attention_dropout: float = 0.0):
    tok = build_char_tokenizer()
    policy = build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), len(tok), tok.pad_token_id, 0
    )
    policy.config.attention_dropout = attention_dropout
    for layer in policy.model.layers:
        layer.self_attn.attention_dropout = attention_dropout
    ac = build_actor_critic(policy, ModelConfig(), 0)
    trials = [_trial(tok, 0, "ab", "cd"), _trial(tok, 0, "xy", "z"), _trial(tok, 1, "efg", "h"), _trial(tok, 1, "i", "jk")]
    batch = collate(trials, tok.pad_token_id)
    ac.eval()  # the trainer scores the old log-probs in eval mode, as the rollout sampled them
    with torch.no_grad():
        s = ac.score(batch.input_ids, batch.attention_mask, with_values=True)
    mask = batch.action_mask
    batch = batch._replace(logprobs=s.logprobs * mask, ref_logprobs=s.logprobs * mask, values=s.values * mask)
    return ac, batch


def test_bonus_keeps_its_scale_when_the_outcome_advantages_vanish():
    """Every trial of every group failed: GRPO's outcome advantages are 0 and only the
    bonus remains. Whitening the sum made alpha 0.05 and alpha 1.0 the same update; the
    bonus added after the whitening of the outcome advantages scales with alpha."""
    ac, batch = _setup()
    outcome_adv, _ = grpo(batch.token_rewards, batch.values, batch.action_mask, group=batch.group)
    assert torch.count_nonzero(outcome_adv) == 0
    progress = [[0.4, 0.2], [0.1, 0.3], [0.5, 0.0], [0.2, 0.6]]
    stats = {}
    for alpha in (0.05, 1.0):
        credit = episode_credit(batch.episode_index, batch.action_mask, [[alpha * p for p in ps] for ps in progress])
        adv = combine_advantages(outcome_adv, batch.action_mask, credit, whiten_outcome=True)
        torch.testing.assert_close(adv, credit)
        model, _ = _setup()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        cfg = AlgoConfig(ppo_epochs=1, minibatch_size=4, kl_coef=0.0, max_grad_norm=1e9)
        model.train()
        stats[alpha] = ppo_update(model, opt, batch._replace(advantages=adv), cfg, torch.Generator().manual_seed(0), False)
    assert abs(stats[1.0]["loss/policy"] / stats[0.05]["loss/policy"] - 20.0) < 1e-4
    assert abs(stats[1.0]["grad_norm"] / stats[0.05]["grad_norm"] - 20.0) < 1e-3


def test_outcome_advantages_are_whitened_and_the_bonus_is_not():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    outcome = torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]])
    credit = torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.2, 0.3]])
    adv = combine_advantages(outcome, mask, credit, whiten_outcome=True)
    n = mask.sum()
    mean = (outcome * mask).sum() / n
    std = (((outcome - mean) * mask) ** 2).sum().div(n).sqrt()
    torch.testing.assert_close(adv, ((outcome - mean) / std + credit) * mask, rtol=0, atol=1e-6)
    torch.testing.assert_close(combine_advantages(outcome, mask, credit, whiten_outcome=False), (outcome + credit) * mask)


def test_first_ratio_is_one_with_a_dropout_model():
    """A policy whose config has attention dropout 0.5: the trainer scores the old
    log-probs in eval mode and runs the update in train mode; with dropout active there
    the first ratio was not 1. The actor-critic switches dropout off, so it is."""
    ac, batch = _setup(attention_dropout=0.5)
    assert ac.policy.config.attention_dropout == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in ac.policy.model.layers)
    batch = batch._replace(advantages=batch.action_mask.clone())
    ac.train()  # as the trainer calls the update
    opt = torch.optim.SGD(ac.parameters(), lr=0.0)
    stats = ppo_update(ac, opt, batch, AlgoConfig(ppo_epochs=1, minibatch_size=4), torch.Generator().manual_seed(0), True)
    assert stats["approx_kl"] == 0.0 and stats["clipfrac"] == 0.0
