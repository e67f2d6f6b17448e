"""Base-policy diagnostics: heterogeneity against known variances of synthetic value
distributions and a hand-computed example; anti-concentration against its closed form
for 0/1 rewards and a hand-computed example; the sampling driver end to end on a tiny model."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401
from envs.planted_subseq import PlantedSubseqEnv
from metarl_llm.config import BudgetConfig, TinyModelConfig
from metarl_llm.core.trial import StreamCodec
from metarl_llm.evaluation.diagnostics import anti_concentration, heterogeneity, policy_diagnostics
from metarl_llm.models import build_char_tokenizer, build_tiny_model
from metarl_llm.rollout.cached import CachedEngine
from metarl_llm.rollout.decode import Sampled
from metarl_llm.rollout.meta_prover import meta_prover_context

torch.set_num_threads(1)

# ------------------------------------------------------------ heterogeneity

# name -> (draw V [P, N] from a generator, Var[V], E[V(1-V)])
VALUE_DISTRIBUTIONS = {
    # Beta(2, 3): mean 2/5, Var = ab/((a+b)^2 (a+b+1)) = 6/150 = 0.04, E[V^2] = 0.2, E[V(1-V)] = 0.4 - 0.2
    "beta_2_3": (lambda rng, shape: rng.beta(2.0, 3.0, shape), 0.04, 0.2),
    # V = 0.2 or 0.8 with probability 1/2: Var = 0.3^2 = 0.09, V(1-V) = 0.16 at both points
    "two_point": (lambda rng, shape: rng.choice([0.2, 0.8], shape), 0.09, 0.16),
}


@pytest.mark.parametrize("name", sorted(VALUE_DISTRIBUTIONS))
def test_heterogeneity_is_unbiased_and_the_uncorrected_variance_is_inflated_by_mc_noise(name):
    """R seeded draws of P prefixes x N continuations; each continuation value V is
    estimated from m Bernoulli(V) outcomes. The R estimates are i.i.d., so their mean is
    within 4 standard errors (estimated from the R draws) of its expectation but for a
    6e-5 chance: Var[V] for the corrected estimator, Var[V] + E[V(1-V)]/m for the
    uncorrected one. The test has power: 4 standard errors are under half the bias."""
    draw, var_v, noise_v = VALUE_DISTRIBUTIONS[name]
    draws, prefixes, continuations, m = 200, 50, 8, 4
    corrected, uncorrected = [], []
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        v_true = draw(rng, (prefixes, continuations))
        values = rng.binomial(m, v_true) / m
        het = heterogeneity(values, m)
        corrected.append(het.value)
        uncorrected.append(het.uncorrected)
    se = lambda x: np.std(x, ddof=1) / np.sqrt(draws)  # noqa: E731
    bias = noise_v / m
    assert 4 * se(corrected) < bias / 2 and 4 * se(uncorrected) < bias / 2
    assert abs(np.mean(corrected) - var_v) < 4 * se(corrected)
    assert abs(np.mean(uncorrected) - (var_v + bias)) < 4 * se(uncorrected)


def test_heterogeneity_hand_computed():
    # m = 2. Prefix 0: values 0, 1/2, 1: sample variance (1/4 + 0 + 1/4)/2 = 1/4;
    # noise (0 + 1/4 + 0)/3 / (m-1) = 1/12; het = 1/4 - 1/12 = 1/6.
    # Prefix 1: values 1/2, 1/2, 1: mean 2/3, sample variance (1/36 + 1/36 + 4/36)/2 = 1/12;
    # noise (1/4 + 1/4 + 0)/3 = 1/6; het = 1/12 - 1/6 = -1/12 (not clipped).
    het = heterogeneity([[0.0, 0.5, 1.0], [0.5, 0.5, 1.0]], num_rollouts=2)
    np.testing.assert_allclose(het.per_prefix, [1 / 6, -1 / 12], rtol=0, atol=1e-15)
    assert het.value == pytest.approx(1 / 24, abs=1e-15)
    assert het.uncorrected == pytest.approx((1 / 4 + 1 / 12) / 2, abs=1e-15)


def test_heterogeneity_rejects_one_rollout_and_bad_input():
    good = np.full((2, 3), 0.5)
    for m in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="num_rollouts"):
            heterogeneity(good, m)
    for bad in (np.full(3, 0.5), np.full((2, 1), 0.5), np.full((2, 3, 1), 0.5), [[0.5, 1.5]], [[0.5, -0.1]], [[0.5, np.nan]]):
        with pytest.raises(ValueError, match="values"):
            heterogeneity(bad, 2)


# ------------------------------------------------------- anti-concentration


def closed_form(p, margin):
    """Anti-concentration of 0/1 rewards with success share p in (0, 1)."""
    return p * (1.0 >= p + margin * np.sqrt(p * (1 - p)))


@pytest.mark.parametrize("margin", [0.5, 1.0, 1.5])
def test_anti_concentration_of_bernoulli_rewards_matches_the_closed_form(margin):
    """Successes count iff p <= 1/(1 + margin^2) (0.8, 0.5, 0.31 here); every p below is
    at least 0.09 from that threshold, over 25 standard errors of the empirical share at
    N = 20000, so the empirical share falls on the same side as p."""
    p = np.array([0.05, 0.2, 0.4, 0.7, 0.95])
    n = 20_000
    rewards = (np.random.default_rng(7).random((len(p), n)) < p[:, None]).astype(float)
    ac = anti_concentration(rewards, margin)
    p_hat = rewards.mean(1)
    np.testing.assert_allclose(ac.per_problem, closed_form(p_hat, margin), rtol=1e-12, atol=0)  # plug-in: exact
    np.testing.assert_array_less(np.abs(ac.per_problem - closed_form(p, margin)), 5 * np.sqrt(p * (1 - p) / n))
    assert ac.value == pytest.approx(ac.per_problem.mean())


def test_anti_concentration_hand_computed():
    rewards = [
        [0, 0, 0, 1],  # mu 1/4, population sigma sqrt(3)/4 = 0.433 (sample sigma 0.5)
        [0, 1, 1, 1],  # mu 3/4, sigma 0.433
        [0.2, 0.2, 0.2, 0.2],  # sigma 0: contributes 0
        [0, 0.6, 0.7, 1],  # mu 0.575, sigma sqrt(0.131875) = 0.3631
        [0, 0.5, 0.5, 1],  # mu 0.5, sigma sqrt(1/8) = 0.3536; the two 0.5s equal the mean
    ]
    cases = [
        (0.0, [0.25, 0.75, 0, 0.75, 0.25]),  # rewards strictly above mu (0.5 = mu does not count)
        (0.5, [0.25, 0.75, 0, 0.25, 0.25]),  # thresholds 0.4665, 0.9665, -, 0.7566, 0.6768
        (1.0, [0.25, 0, 0, 0.25, 0.25]),  # thresholds 0.683, 1.183, -, 0.938, 0.854
        (1.6, [0.25, 0, 0, 0, 0]),  # thresholds 0.943 (1.05 with the sample sigma), 1.44, -, 1.156, 1.066
        (2.0, [0, 0, 0, 0, 0]),  # thresholds 1.116, 1.616, -, 1.301, 1.207
    ]
    for margin, want in cases:
        ac = anti_concentration(rewards, margin)
        np.testing.assert_array_equal(ac.per_problem, want)
        assert ac.value == pytest.approx(np.mean(want), abs=1e-15)


def test_anti_concentration_is_zero_without_spread():
    rewards = np.array([[x] * 7 for x in (0.0, 0.1, 0.3, 0.7, 1.0)])  # means with float rounding
    ac = anti_concentration(rewards, 0.0)
    assert ac.value == 0.0 and (ac.per_problem == 0).all()


def test_anti_concentration_rejects_bad_input():
    for bad in (np.full(4, 0.5), np.full((3, 1), 0.5), np.full((0, 4), 0.5), [[0.5, 2.0]], [[0.5, -1.0]], [[np.inf, 0.5]]):
        with pytest.raises(ValueError, match="rewards"):
            anti_concentration(bad, 1.0)
    for margin in (-0.1, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="margin"):
            anti_concentration([[0.0, 1.0]], margin)


# ------------------------------------------------------------------ driver

BUDGET = BudgetConfig(max_episodes=2, max_episode_tokens=6, max_total_tokens=12, answer_max_tokens=4)
DIGITS = "0123456789"


def digit_bias(model, tok, digits: float, delimiter: float):
    """An output bias that makes the model write mostly digits: with one gold digit
    (``gold_length=1``) its forced answers succeed often but not always."""
    bias = torch.zeros(len(tok))
    bias[tok.convert_tokens_to_ids(list(DIGITS))] = digits
    bias[tok.convert_tokens_to_ids("\n")] = delimiter
    model.lm_head.bias = torch.nn.Parameter(bias)
    return model


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    cfg = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model = digit_bias(build_tiny_model(cfg, len(tok), tok.pad_token_id, 0), tok, 4.0, 2.0).eval()
    codec = StreamCodec(tok, "\n", "Answer:")
    return tok, model, codec


def heldout_envs(n):
    return [gym.make("metarl/PlantedSubseq-v0", split="test", gold_length=1, max_episodes=BUDGET.max_episodes) for _ in range(n)]


def run(model, codec, problems=3, continuations=4, rollouts=3, margin=0.5, seed=0, make_envs=None, engine=None):
    return policy_diagnostics(
        model,
        codec,
        (make_envs or heldout_envs)(problems * continuations),
        BUDGET,
        problems,
        continuations,
        rollouts,
        margin,
        torch.Generator().manual_seed(seed),
        engine,
    )


def test_driver_shapes_ranges_and_agreement_with_the_estimators(setup):
    tok, model, codec = setup
    model.train()
    d = run(model, codec)
    assert model.training  # restored after sampling in eval mode
    model.eval()
    assert d.rewards.shape == d.values.shape == (3, 4)
    for a in (d.rewards, d.values):
        assert ((a >= 0) & (a <= 1)).all()
    np.testing.assert_allclose(d.values * 3, np.round(d.values * 3), atol=1e-12)  # means of three 0/1 scores
    assert 0 < d.values.mean() < 1  # the digit bias makes the meta-prover's values non-degenerate
    for row in range(12):  # problem-major
        t = d.trials[row]
        assert t.group == row // 4 and d.rewards[row // 4, row % 4] == t.outcome
    het, ac = heterogeneity(d.values, 3), anti_concentration(d.rewards, 0.5)
    assert d.heterogeneity.value == het.value and d.anti_concentration.value == ac.value
    np.testing.assert_array_equal(d.heterogeneity.per_prefix, het.per_prefix)
    assert d.metrics == {
        "heterogeneity": het.value,
        "heterogeneity_uncorrected": het.uncorrected,
        "anti_concentration": ac.value,
        "success": d.rewards.mean(),
        "first_episode_J": d.values.mean(),
        # by hand: a first episode commits iff its text holds the answer marker (a forced answer is an observation)
        "first_episode_commits": np.mean([heldout_envs(1)[0].unwrapped.answer_marker in t.episode_texts[0] for t in d.trials]),
    }
    assert 0 <= d.metrics["anti_concentration"] <= 1


def test_driver_values_are_meta_prover_scores_after_each_first_episode(setup, monkeypatch):
    """Record the meta-prover's sampling call (on the engine it is given): m contexts per trial, in trial order, each
    the prompt and episode 0's sampled tokens then the forced-answer tokens; each value is
    the mean score of that trial's m recorded answers."""
    tok, model, codec = setup
    calls = []

    class Recording(CachedEngine):  # the engine is the seam: it records what the meta-prover asks of it
        def continue_prefixes(self, model, trials, ends, suffixes, copies, *args, **kwargs):
            toks, lengths, owners = super().continue_prefixes(model, trials, ends, suffixes, copies, *args, **kwargs)
            contexts = [trials[i].ids[: ends[i][b]] + suffixes[i][b] for i, b in owners]
            calls.append((contexts, Sampled(toks, toks.float(), lengths, lengths > 0)))
            return toks, lengths, owners

    m = 3
    d = run(model, codec, rollouts=m, engine=Recording())
    assert len(calls) == 1  # one batched call for every trial
    contexts, out = calls[0]
    assert len(contexts) == 12 * m
    for row, ctx in enumerate(contexts):
        t = d.trials[row // m]
        first = [x for x, a, e in zip(t.ids, t.action, t.episode) if a and e == 0]
        prompt = t.ids[: t.action.index(1)]
        assert ctx == prompt + first + codec.forced_prefix(prompt + first)
        assert ctx == meta_prover_context(codec, t, len(prompt) + len(first))
    # each answer scored as the trial would be if forced to answer after episode 0
    scores = [
        d.trials[row // m].grader.forced_outcome(
            d.trials[row // m].episode_texts[:1], codec.episode_text(out.tokens[row, : int(out.lengths[row])].tolist())
        )
        for row in range(len(contexts))
    ]
    np.testing.assert_allclose(d.values.ravel(), np.reshape(scores, (12, m)).mean(1), rtol=0, atol=1e-15)


def test_driver_is_deterministic_under_a_seed(setup):
    tok, model, codec = setup
    a, b, c = run(model, codec, seed=5), run(model, codec, seed=5), run(model, codec, seed=6)
    assert [t.ids for t in a.trials] == [t.ids for t in b.trials]
    np.testing.assert_array_equal(a.rewards, b.rewards)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.metrics == b.metrics
    assert [t.ids for t in a.trials] != [t.ids for t in c.trials]


class AnswerOnlyPlanted(PlantedSubseqEnv):
    """planted_subseq whose outcome is the final answer's score alone (the stock one also
    counts earlier episodes, so a first episode holding the gold is worth 1)."""

    def outcome(self, episodes, answer):
        return 0.0 if answer is None else self.score(answer)


def test_context_free_policy_has_no_heterogeneity(setup):
    """A policy whose logits ignore the context values every first episode alike (its
    forced answers have one distribution) where the outcome is the answer's alone, so
    sigma^2_het = 0: the corrected estimate is within 4 standard errors of 0 (standard
    error from the P per-problem estimates, which are i.i.d.), while the uncorrected one
    is clearly positive (the MC noise V(1-V)/m). (On the stock planted_subseq a first
    episode that holds the gold is worth 1: real heterogeneity, issue 20.)"""
    tok, _, codec = setup
    cfg = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model = build_tiny_model(cfg, len(tok), tok.pad_token_id, 1).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.model.embed_tokens.weight.zero_()  # tied: every logit is the bias alone
    digit_bias(model, tok, 5.0, 3.0)
    problems = 32
    d = run(
        model,
        codec,
        problems=problems,
        continuations=8,
        rollouts=4,
        seed=2,
        make_envs=lambda n: [AnswerOnlyPlanted(split="test", gold_length=1, max_episodes=BUDGET.max_episodes) for _ in range(n)],
    )
    se = np.std(d.heterogeneity.per_prefix, ddof=1) / np.sqrt(problems)
    assert abs(d.heterogeneity.value) < 4 * se
    assert d.heterogeneity.uncorrected > 4 * se + abs(d.heterogeneity.value)


def test_driver_rejects_bad_arguments_before_sampling(setup):
    tok, model, codec = setup
    with pytest.raises(ValueError, match="num_rollouts"):
        run(model, codec, rollouts=1)
    with pytest.raises(ValueError, match="num_continuations"):
        run(model, codec, continuations=1)
    with pytest.raises(ValueError, match="margin"):
        run(model, codec, margin=-1.0)
    with pytest.raises(ValueError, match="environments"):
        policy_diagnostics(model, codec, heldout_envs(2), BUDGET, 2, 2, 2, 0.5)


def test_first_episode_commits_counts_the_policy_s_own_first_answers():
    from metarl_llm.core.trial import Trial
    from metarl_llm.evaluation.diagnostics import first_episode_commits

    trials = [
        Trial("a", 0, answer_episode=0),  # committed in episode 0
        Trial("b", 0, answer_episode=0, forced=True),  # budget of one episode: the environment forced it
        Trial("c", 0, answer_episode=2),  # committed later
        Trial("d", 0, answer_episode=1, forced=True),
    ]
    assert first_episode_commits(trials) == 0.25
    with pytest.raises(ValueError, match="no trials"):
        first_episode_commits([])
