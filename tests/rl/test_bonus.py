"""J estimators of the progress bonus: likelihood against an explicit per-boundary
product, telescoping of bonuses, the verifier interface, the sample estimator."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401
from metarl_llm.config import BonusConfig, BudgetConfig
from metarl_llm.rl.bonus import (
    ESTIMATORS,
    VERIFIERS,
    VerifierInput,
    block_attention_mask,
    episode_bonuses,
    get_estimator,
    register_verifier,
)
from metarl_llm.rollout.engine import run_trials
from metarl_llm.rollout.meta_prover import JOptions, boundary_prefixes, meta_prover_context

BUDGET = BudgetConfig(max_episodes=3, max_episode_tokens=8, max_total_tokens=20, answer_max_tokens=6)


@pytest.fixture(scope="module")
def setup(char_policy):
    return char_policy  # tests/rl/conftest.py


def play(model, codec, env_id, n=10, seed=0):
    env_list = [gym.make(env_id, max_episodes=BUDGET.max_episodes) for _ in range(n)]
    resets = [{"seed": i} for i in range(n)]
    return run_trials(model, codec, env_list, resets, list(range(n)), BUDGET, torch.Generator().manual_seed(seed))


@torch.no_grad()
def explicit_j(model, codec, trial, end):
    """P(target [+ stop] | prefix + forced), one boundary at a time, one plain forward pass."""
    text, must_stop = trial.grader.answer_target()
    target = codec.encode(text)
    ctx = meta_prover_context(codec, trial, end)
    full = torch.tensor([ctx + target])
    logp = torch.log_softmax(model(input_ids=full).logits[0].double(), -1)
    total = 0.0
    for r, tok in enumerate(target):
        total += float(logp[len(ctx) + r - 1, tok])
    if must_stop:
        total += float(torch.logsumexp(logp[len(ctx) + len(target) - 1, codec.stop_ids], -1))
    return np.exp(total)


@pytest.mark.parametrize("env_id", ["metarl/PlantedSubseq-v0", "metarl/Math-v0"])
def test_likelihood_equals_explicit_product_per_boundary(setup, env_id):
    model, codec = setup
    trials = play(model, codec, env_id)
    assert any(len(boundary_prefixes(t)) > 2 for t in trials)  # several boundaries per trial
    assert len({len(t.ids) for t in trials}) > 1  # rows of different lengths share a padded pass
    curves = get_estimator("likelihood")(model, codec, trials, JOptions(rows=4))
    for t, c in zip(trials, curves):
        ends = boundary_prefixes(t)
        assert c.shape == (len(ends),)
        p = np.array([explicit_j(model, codec, t, e) for e in ends])
        # J is the trial's success if forced to answer there: what the episodes so far already
        # secure, plus P(canonical answer) times what it adds (planted_subseq counts earlier episodes)
        target, _ = t.grader.answer_target()
        before = [[x for x, last in zip(t.episode_texts, t.episode_ends) if last < e] for e in ends]
        o_none = np.array([t.grader.outcome(eps, None) for eps in before])
        o_target = np.array([t.grader.outcome(eps, target.strip()) for eps in before])
        want = o_none + p * (o_target - o_none)
        np.testing.assert_allclose(np.log(c), np.log(want), rtol=0, atol=1e-4)


def test_block_mask_by_hand():
    # stream of 3 tokens, block 0 (boundary 2) of 2 tokens, block 1 (boundary 3) of 1 token, 1 pad
    seg = torch.tensor([[-1, -1, -1, 0, 0, 1, -2]])
    limit = torch.tensor([[1, 2, 3, 2, 2, 3, 0]])
    allowed = block_attention_mask(seg, limit, torch.float32)[0, 0] == 0
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 0, 1, 0, 0, 0],  # block 0 sees the stream before its boundary, then itself
            [1, 1, 0, 1, 1, 0, 0],
            [1, 1, 1, 0, 0, 1, 0],  # block 1 never sees block 0
            [0, 0, 0, 0, 0, 0, 1],  # padding attends itself only
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, want)


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_bonuses_telescope(setup, estimator):
    """Default (bonus.final_episode=true): to alpha * (outcome - J_empty), one bonus per
    episode; final_episode=false: to alpha * (J_last - J_empty), none for the answer episode."""
    model, codec = setup
    trials = play(model, codec, "metarl/PlantedSubseq-v0")
    cfg = BonusConfig(name="info_gain", estimator=estimator, alpha=0.7, num_samples=3)
    bonuses, curves = episode_bonuses(cfg, model, codec, trials, BUDGET.answer_max_tokens, torch.Generator().manual_seed(1))
    for t, b, c in zip(trials, bonuses, curves):
        assert len(b) == len(boundary_prefixes(t)) == len(c) == len(t.episode_texts)
        assert np.isclose(sum(b), 0.7 * (t.outcome - c[0]))
        assert ((c >= 0) & (c <= 1)).all()
    cfg = BonusConfig(name="info_gain", estimator=estimator, alpha=0.7, num_samples=3, final_episode=False)
    bonuses, curves = episode_bonuses(cfg, model, codec, trials, BUDGET.answer_max_tokens, torch.Generator().manual_seed(1))
    for t, b, c in zip(trials, bonuses, curves):
        assert len(b) == len(boundary_prefixes(t)) - 1 == len(c) - 1
        assert np.isclose(sum(b), 0.7 * (c[-1] - c[0]))


def test_sample_estimator_values_are_sample_means(setup):
    model, codec = setup
    trials = play(model, codec, "metarl/Math-v0")
    curves = get_estimator("sample")(
        model, codec, trials, JOptions(num_samples=3, answer_max_tokens=4, generator=torch.Generator().manual_seed(0))
    )
    for c in curves:
        assert np.allclose(c * 3, np.round(c * 3))  # means of three 0/1 scores


def test_verifier_estimator_passes_prompt_and_episodes_so_far(setup):
    model, codec = setup
    trials = play(model, codec, "metarl/PlantedSubseq-v0")
    seen = []

    @register_verifier("test_count")
    def factory():
        def verify(items):
            seen.extend(items)
            return np.array([len(it.episodes) / 10 for it in items])

        return verify

    try:
        curves = get_estimator("verifier")(model, codec, trials, JOptions(verifier="test_count"))
    finally:
        VERIFIERS.pop("test_count")
    for t, c in zip(trials, curves):
        np.testing.assert_allclose(c, np.arange(len(boundary_prefixes(t))) / 10)
    assert all(isinstance(it, VerifierInput) and it.prompt == it.grader.problem.prompt for it in seen)


def test_episode_score_verifier_on_a_hand_built_prefix():
    env = gym.make("metarl/PlantedSubseq-v0").unwrapped
    env.reset(seed=3)
    gold = env.reference_answer
    verify = VERIFIERS["episode_score"]()
    items = [
        VerifierInput(env.problem.prompt, [], env),
        VerifierInput(env.problem.prompt, ["x"], env),
        VerifierInput(env.problem.prompt, ["x", f"9{gold}9"], env),
    ]
    np.testing.assert_array_equal(verify(items), [0.0, 0.0, 1.0])


def test_bad_estimator_and_verifier_output_fail_loudly(setup):
    model, codec = setup
    with pytest.raises(ValueError, match="bonus.estimator='nope'"):
        get_estimator("nope")
    trials = play(model, codec, "metarl/PlantedSubseq-v0", n=2)
    with pytest.raises(ValueError, match="bonus.verifier='missing'"):
        get_estimator("verifier")(model, codec, trials, JOptions(verifier="missing"))

    @register_verifier("test_bad")
    def factory():
        return lambda items: np.full(len(items), 1.5)

    try:
        with pytest.raises(ValueError, match="outside"):
            get_estimator("verifier")(model, codec, trials, JOptions(verifier="test_bad"))
    finally:
        VERIFIERS.pop("test_bad")


def test_final_episode_bonuses_telescope_to_outcome_minus_j_empty(setup):
    model, codec = setup
    trials = play(model, codec, "metarl/Math-v0")
    cfg = BonusConfig(name="info_gain", estimator="likelihood", alpha=0.5, final_episode=True)
    bonuses, curves = episode_bonuses(cfg, model, codec, trials, BUDGET.answer_max_tokens)
    for t, b, c in zip(trials, bonuses, curves):
        assert len(b) == t.answer_episode + 1 == len(t.episode_texts)  # one per episode, answer included
        assert np.isclose(sum(b), 0.5 * (t.outcome - c[0]))
