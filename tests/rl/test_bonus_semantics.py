"""What the progress bonus rewards, on hand-built trials (issue 15, items 1-4).

Trials are scripted: each episode's text is tokenised and played through the real
environment by the engines' own bookkeeping (``engine.finish_episode``), so the token
stream, the inserted observations and the boundaries are those of a rollout.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401
from metarl_llm.config import BonusConfig, BudgetConfig
from metarl_llm.rl.bonus import ESTIMATORS, episode_bonuses, estimate_likelihood, register_estimator
from metarl_llm.rollout.base import finish_episode, start_trials
from metarl_llm.rollout.meta_prover import JOptions, boundary_prefixes, meta_prover_context, meta_prover_success

BUDGET = BudgetConfig(max_episodes=3, max_episode_tokens=24, max_total_tokens=72, answer_max_tokens=6)


@pytest.fixture(scope="module")
def setup(char_policy):
    return char_policy  # tests/rl/conftest.py


def scripted(codec, env, texts, index=0, budget=BUDGET):
    """The trial a policy writing ``texts`` (one per episode, delimiter appended) would give."""
    [t] = start_trials(codec, [env], [{"options": {"index": index}}], [0], budget)
    forced = False
    for text in texts:
        toks = codec.encode(text) + codec.delimiter_token
        done, forced, obs = finish_episode(t, env, codec, toks, [0.0] * len(toks), forced, budget)
        if done:
            return t
        if obs:
            t.append(obs, False, -1)
    raise AssertionError(f"the scripted trial {texts!r} did not end")


def math_env(**kw):
    return gym.make("metarl/Math-v0", split="test", max_episodes=BUDGET.max_episodes, **kw)


@pytest.fixture
def fixed_curves():
    """A registered estimator returning J curves set by the test (a stand-in for J)."""
    table: dict[int, list[float]] = {}

    @register_estimator("test_fixed")
    def fixed(model, codec, trials, opts):
        return [np.asarray(table[len(t.episode_texts)], dtype=np.float64) for t in trials]

    yield table
    ESTIMATORS.pop("test_fixed")


# ---------------------------------------------------------------- item 1: the answer-episode incentive


def test_a_restating_episode_earns_nothing_by_default(setup, fixed_curves):
    """Answering at once against writing the answer uncommitted and committing it one
    episode later: with the default bonus both trials earn the same total reward. Here
    J_empty = 0.3 and J after the restating episode 0.95, alpha 0.5: both earn
    1 + 0.5 * (1 - 0.3) = 1.35. (With final_episode=false the restating trial earned
    1 + 0.5 * (0.95 - 0.3) = 1.325 against 1.0.)"""
    model, codec = setup
    env = math_env()
    at_once = scripted(codec, env, ["Answer: {}".format(_reference(env, 0))])
    restated = scripted(codec, env, [_reference(env, 0), "Answer: {}".format(_reference(env, 0))])
    assert at_once.outcome == restated.outcome == 1.0 and len(restated.episode_texts) == 2
    fixed_curves[1] = [0.3]
    fixed_curves[2] = [0.3, 0.95]
    cfg = BonusConfig(name="info_gain", estimator="test_fixed", alpha=0.5)
    assert cfg.final_episode  # the default
    bonuses, _ = episode_bonuses(cfg, model, codec, [at_once, restated], BUDGET.answer_max_tokens)
    totals = [t.outcome + sum(b) for t, b in zip([at_once, restated], bonuses)]
    np.testing.assert_allclose(totals, [1.35, 1.35])
    old = BonusConfig(name="info_gain", estimator="test_fixed", alpha=0.5, final_episode=False)
    bonuses, _ = episode_bonuses(old, model, codec, [at_once, restated], BUDGET.answer_max_tokens)
    np.testing.assert_allclose([t.outcome + sum(b) for t, b in zip([at_once, restated], bonuses)], [1.0, 1.325])


def _reference(env, index):
    env.reset(options={"index": index})
    return env.unwrapped.reference_answer


# ---------------------------------------------------------------- item 4: the rewarded outcome


def test_final_progress_uses_the_rewarded_outcome(setup, fixed_curves):
    """reward=verifier: J after the answer episode is the verifier's reward, not the
    environment's reference-based outcome."""
    model, codec = setup
    env = math_env()
    trial = scripted(codec, env, ["7", "Answer: {}".format(_reference(env, 1))], index=1)
    assert trial.outcome == 1.0
    fixed_curves[2] = [0.2, 0.4]
    cfg = BonusConfig(name="info_gain", estimator="test_fixed", alpha=1.0)
    bonuses, _ = episode_bonuses(cfg, model, codec, [trial], BUDGET.answer_max_tokens, outcomes=[0.25])
    np.testing.assert_allclose(bonuses[0], [0.2, 0.25 - 0.4])
    with pytest.raises(ValueError, match="outcomes"):
        episode_bonuses(cfg, model, codec, [trial], BUDGET.answer_max_tokens, outcomes=[0.1, 0.2])


# ---------------------------------------------------------------- item 2: J is the trial's forced outcome


def _planted_with_gold_first(codec):
    env = gym.make("metarl/PlantedSubseq-v0", split="test", max_episodes=BUDGET.max_episodes)
    env.reset(options={"index": 3})
    gold = env.unwrapped.reference_answer
    trial = scripted(codec, env, [f"foo {gold}", "Answer: 9"], index=3)
    assert trial.outcome == 1.0 and env.unwrapped.score("9") == 0.0  # the stream holds the gold; the answer does not
    return trial


def test_sampled_j_scores_the_forced_trial_not_the_answer_alone(setup):
    """planted_subseq succeeds once any episode holds the gold: J after such an episode is
    1 whatever the meta-prover answers (the old env.score(answer) gave about 0)."""
    model, codec = setup
    trial = _planted_with_gold_first(codec)
    ends = boundary_prefixes(trial)
    assert len(ends) == 2
    [j] = meta_prover_success(model, codec, [trial], [ends], 16, BUDGET.answer_max_tokens, torch.Generator().manual_seed(0))
    assert j[1] == 1.0
    assert j[0] < 0.5  # the untrained model rarely writes the gold after the prompt alone


def test_likelihood_j_counts_the_episodes_so_far(setup):
    model, codec = setup
    trial = _planted_with_gold_first(codec)
    [j] = estimate_likelihood(model, codec, [trial], JOptions())
    assert j[1] == 1.0 and 0.0 <= j[0] < 0.5


def test_forced_outcome_parses_like_a_forced_step():
    env = math_env()
    env.reset(options={"index": 0})
    ref = env.unwrapped.reference_answer
    base = env.unwrapped
    assert base.forced_outcome([], f" {ref}") == 1.0
    assert base.forced_outcome(["x"], f" 1 then Answer: {ref}") == 1.0  # the text after the last marker
    assert base.forced_outcome([], "   ") == 0.0  # no answer
    assert base.forced_outcome([f"Answer {ref}"], "nope") == 0.0  # math: the answer alone counts


# ---------------------------------------------------------------- item 3: feedback credited to its episode


def test_j_after_an_episode_is_measured_after_the_feedback_to_it(setup):
    model, codec = setup
    env = math_env(feedback=True)
    ref = _reference(env, 2)
    wrong = str(int(ref) + 1) if ref.lstrip("-").isdigit() else "nope"
    trial = scripted(codec, env, [wrong, f"Answer: {ref}"], index=2)
    ends = boundary_prefixes(trial)
    first_of_episode_1 = trial.episode.index(1)
    feedback = trial.ids[trial.episode_ends[0] + 1 : first_of_episode_1]
    assert codec.tokenizer.decode(feedback) == "[wrong]\n"
    assert ends == [trial.action.index(1), first_of_episode_1]  # after the prompt; after episode 0 *and* its reply
    context = codec.tokenizer.decode(meta_prover_context(codec, trial, ends[1]))
    assert context.endswith("[wrong]\nAnswer:")


def test_a_forced_answer_text_is_not_inside_the_prefix(setup):
    """When the environment forces the answer, the observation is the forced-answer text,
    which the meta-prover appends itself: the boundary stays before it."""
    model, codec = setup
    env = math_env(feedback=True)
    ref = _reference(env, 4)
    trial = scripted(codec, env, ["1", "2", "3", f" {ref}"], index=4)
    assert trial.forced and trial.answer_episode == 3
    ends = boundary_prefixes(trial)
    assert len(ends) == 4
    assert ends[1] == trial.episode.index(1) and ends[2] == trial.episode.index(2)  # after the feedback
    assert ends[3] == trial.episode_ends[2] + 1  # before the inserted "Answer:"
    forced_text = codec.tokenizer.decode(trial.ids[ends[3] : trial.episode.index(3)])
    assert forced_text == "Answer:"
