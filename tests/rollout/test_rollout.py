"""Rollouts: token in/token out, sampling log-probs equal the policy's, budgets, forced answers."""

import gymnasium as gym
import pytest
import torch

import envs  # noqa: F401
from metarl_llm.config import BudgetConfig, TinyModelConfig
from metarl_llm.core.trial import StreamCodec
from metarl_llm.models import ActorCritic, build_char_tokenizer, build_tiny_model
from metarl_llm.rollout.engine import run_trials
from metarl_llm.rollout.sampling import sample

BUDGET = BudgetConfig(max_episodes=3, max_episode_tokens=10, max_total_tokens=24, answer_max_tokens=6)


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    model = build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), len(tok), tok.pad_token_id, 0
    ).eval()
    codec = StreamCodec(tok, "\n", "Answer:")
    return tok, model, codec


def play(model, codec, n=12, seed=0, budget=BUDGET):
    env_list = [gym.make("metarl/PlantedSubseq-v0", max_episodes=budget.max_episodes) for _ in range(n)]
    resets = [{"seed": i // 3} for i in range(n)]
    return run_trials(model, codec, env_list, resets, [i // 3 for i in range(n)], budget, torch.Generator().manual_seed(seed))


def test_sampling_logprobs_equal_the_policy_forward_pass(setup):
    tok, model, codec = setup
    trials = play(model, codec)
    ac = ActorCritic(model)
    for t in trials:
        ids = torch.tensor([t.ids])
        lp = ac.score(ids, torch.ones_like(ids), with_values=False).logprobs[0]
        act = torch.tensor(t.action, dtype=torch.bool)
        assert torch.allclose(lp[act], torch.tensor(t.sample_logprobs)[act], atol=1e-4)
        assert all(x == 0.0 for x, a in zip(t.sample_logprobs, t.action) if not a)


def test_budgets_and_structure(setup):
    tok, model, codec = setup
    for t in play(model, codec, n=24):
        n_eps = len(t.episode_texts)
        assert 1 <= n_eps <= BUDGET.max_episodes + 1
        per_episode = [sum(1 for e, a in zip(t.episode, t.action) if a and e == j) for j in range(n_eps)]
        assert all(1 <= c <= BUDGET.max_episode_tokens for c in per_episode)
        assert sum(per_episode[: t.answer_episode]) <= BUDGET.max_total_tokens
        if t.forced:  # the forced answer is short and the forced text is an observation
            assert per_episode[t.answer_episode] <= BUDGET.answer_max_tokens
            start = t.episode.index(t.answer_episode)
            forced = codec.forced_ids
            assert t.ids[start - len(forced) : start] == forced
            assert t.action[start - len(forced) : start] == [0] * len(forced)
        assert t.answer_episode == n_eps - 1 and t.policy_tokens == sum(per_episode)


def test_token_in_token_out(setup):
    """The env saw the decoding of exactly the tokens kept in the stream; nothing was re-encoded."""
    tok, model, codec = setup
    for t in play(model, codec):
        for j, text in enumerate(t.episode_texts):
            toks = [i for i, e in zip(t.ids, t.episode) if e == j]
            assert codec.episode_text(toks) == text
        prompt_len = t.action.index(1)
        assert t.ids[:prompt_len] == codec.encode(tok.decode(t.ids[:prompt_len]))


def test_same_seed_same_trials(setup):
    tok, model, codec = setup
    a, b = play(model, codec, seed=3), play(model, codec, seed=3)
    assert [t.ids for t in a] == [t.ids for t in b]
    c = play(model, codec, seed=4)
    assert [t.ids for t in a] != [t.ids for t in c]


def test_eos_without_answer_forces_the_meta_prover(setup):
    """A policy that always ends episodes with EOS gets the forced answer at once."""
    tok, model, codec = setup
    m = build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), len(tok), tok.pad_token_id, 1
    ).eval()
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.model.embed_tokens.weight.zero_()  # tied: every logit 0 ...
        m.lm_head.bias = torch.nn.Parameter(torch.full((len(tok),), -30.0))
        m.lm_head.bias[tok.eos_token_id] = 30.0  # ... but EOS
    for t in play(m, codec, n=3):
        assert t.forced and len(t.episode_texts) == 2 and t.episode_texts[0] == ""
        assert t.outcome == 0.0


def test_sample_respects_per_row_limits_and_stops(setup):
    tok, model, codec = setup
    ctx = [codec.encode("123456\n")] * 4 + [codec.encode("9\n")] * 4
    out = sample(model, ctx, [1, 2, 3, 4, 5, 6, 7, 8], codec.stop_ids, codec.pad_id, torch.Generator().manual_seed(0))
    for i in range(8):
        n = int(out.lengths[i])
        assert 1 <= n <= i + 1
        row = out.tokens[i, :n].tolist()
        assert not any(x in codec.stop_ids.tolist() for x in row[:-1])  # stops at the first stop id
        assert bool(out.stopped[i]) == (row[-1] in codec.stop_ids.tolist())
        assert (out.tokens[i, n:] == codec.pad_id).all()


def test_long_prompt_is_an_error_not_a_silent_cut(setup):
    tok, model, codec = setup
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        play(model, codec, n=1, budget=BudgetConfig(max_prompt_tokens=3))


def test_multinomial_on_one_device_is_torch_multinomial():
    from metarl_llm.rollout.sampling import multinomial

    probs = torch.softmax(torch.randn(50, 7, generator=torch.Generator().manual_seed(1)), -1)
    ours = multinomial(probs, torch.Generator().manual_seed(3))
    ref = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).squeeze(-1)
    assert torch.equal(ours, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_multinomial_with_a_cpu_generator_and_cuda_probabilities():
    """The trainer's generator lives on the CPU; a CUDA policy's probabilities do not
    (torch.multinomial refuses the pair): the draw inverts the CDF of CPU uniforms, with
    the right frequencies (chi-square over 20k draws) and reproducibly."""
    from metarl_llm.rollout.sampling import multinomial

    p = torch.tensor([0.1, 0.0, 0.6, 0.3])
    probs = p.repeat(20_000, 1).cuda()
    draws = multinomial(probs, torch.Generator().manual_seed(0))
    assert draws.device.type == "cuda"
    assert torch.equal(draws, multinomial(probs, torch.Generator().manual_seed(0)))
    counts = torch.bincount(draws.cpu(), minlength=4).double()
    assert counts[1] == 0  # a zero-probability token is never drawn
    expected = p.double() * 20_000
    keep = expected > 0
    chi2 = float((((counts - expected)[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < 16.3  # 3 degrees of freedom, p = 0.001
