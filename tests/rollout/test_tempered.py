"""Tempered sampling: at temperature T the rollout samples softmax(logits / T), and the scoring
pass (the PPO ratio's old log-probs), the reference and the meta-prover use that same distribution:
the sampling log-probs equal the scoring log-probs and both equal an independent computation."""

import gymnasium as gym
import pytest
import torch
import torch.nn.functional as F

import envs  # noqa: F401
from metarl_llm.config import BudgetConfig, TinyModelConfig
from metarl_llm.core.batch import collate
from metarl_llm.core.trial import StreamCodec
from metarl_llm.models import ActorCritic, build_char_tokenizer, build_tiny_model, set_temperature, temperature_of, tempered
from metarl_llm.rollout.engine import run_trials

BUDGET = BudgetConfig(max_episodes=3, max_episode_tokens=8, max_total_tokens=20, answer_max_tokens=6)


@pytest.fixture
def setup():
    tok = build_char_tokenizer()
    model = build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), len(tok), tok.pad_token_id, 0
    ).eval()
    return model, StreamCodec(tok, "\n", "Answer:")


def play(model, codec, engine="cached", seed=0):
    envs_ = [gym.make("metarl/PlantedSubseq-v0", max_episodes=BUDGET.max_episodes) for _ in range(6)]
    return run_trials(
        model,
        codec,
        envs_,
        [{"seed": i} for i in range(6)],
        list(range(6)),
        BUDGET,
        torch.Generator().manual_seed(seed),
        engine=engine,
    )


@pytest.mark.parametrize("engine", ["cached", "reencode", "hf_generate"])
def test_tempered_sampling_logprobs_equal_scoring_logprobs(setup, engine, one_thread):
    model, codec = setup
    set_temperature(model, 0.6)
    trials = play(model, codec, engine)
    batch = collate(trials, codec.pad_id)
    with torch.no_grad():
        scored = ActorCritic(model).eval().score(batch.input_ids, batch.attention_mask)
        set_temperature(model, 1.0)  # the raw logits, tempered by hand: an independent reference
        raw = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    by_hand = F.log_softmax(raw / 0.6, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    act = batch.action_mask[:, 1:].bool()
    sampled = torch.zeros_like(by_hand)
    for r, t in enumerate(trials):
        sampled[r, : len(t.ids) - 1] = torch.tensor(t.sample_logprobs[1:])
    assert act.sum() > 50
    assert torch.allclose(sampled[act], scored.logprobs[:, 1:][act], atol=1e-5)
    assert torch.allclose(scored.logprobs[:, 1:][act], by_hand[act], atol=1e-5)
    untempered = F.log_softmax(raw, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    assert (untempered[act] - by_hand[act]).abs().max() > 0.05  # the temperature is not a no-op


def test_temperature_changes_the_trials_and_is_restored(setup, one_thread):
    model, codec = setup
    base = [t.ids for t in play(model, codec)]
    with tempered(model, 0.3):
        assert temperature_of(model) == 0.3
        cold = [t.ids for t in play(model, codec)]
    assert temperature_of(model) == 1.0 and [t.ids for t in play(model, codec)] == base
    assert cold != base
    with pytest.raises(ValueError, match="temperature must be > 0"):
        set_temperature(model, 0.0)
