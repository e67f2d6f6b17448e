"""Several attempts at one problem: ``retry_wrong_answers`` (envs/base.py) and planted_subseq's
``feedback_detail="digits"`` replies and expert traces."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest

import envs


def make(name: str, **kwargs):
    extra = {"size": 300} if name == "reasoning_gym" else {}
    return gymnasium.make(envs.ENV_IDS[name], **{**extra, **kwargs}).unwrapped


def wrong(env) -> str:
    return "999999" if env.reference_answer != "999999" else "1"


@pytest.mark.parametrize("name", ["math", "planted_subseq", "reasoning_gym"])
def test_a_wrong_committed_answer_is_an_attempt_until_the_last_episode(name):
    env = make(name, max_episodes=3, feedback=True, retry_wrong_answers=True)
    env.reset(seed=3)
    marker = env.answer_marker
    obs, reward, done, _, info = env.step(f"{marker} {wrong(env)}")
    assert not done and reward == 0.0 and obs == "[wrong]" + env.episode_delimiter
    assert info["attempt"] == wrong(env) and info["answer"] is None and not info["correct"]
    obs, reward, done, _, info = env.step(f"{marker} {wrong(env)}")  # episode 1 of 3: still an attempt
    assert not done and not info["forcing_answer"]
    obs, reward, done, _, info = env.step(f"{marker} {wrong(env)}")  # the last episode: the trial ends, failed
    assert done and reward == 0.0 and info["answer"] == wrong(env)
    env.reset(seed=3)
    env.step(f"{marker} {wrong(env)}")
    _, reward, done, _, info = env.step(f"{marker} {env.reference_answer}")  # the first right answer ends it
    assert done and reward == 1.0 and info["correct"] and info["episode_index"] == 1


def test_without_retry_and_after_a_forced_answer_the_first_answer_is_final():
    env = make("math", max_episodes=3)
    env.reset(seed=0)
    _, reward, done, _, _ = env.step(f"Answer: {wrong(env)}")
    assert done and reward == 0.0
    env = make("math", max_episodes=2, retry_wrong_answers=True)
    env.reset(seed=0)
    obs, _, done, _, info = env.step("thinking")
    obs, _, done, _, info = env.step("still thinking")
    assert not done and info["forcing_answer"] and obs == env.forced_answer_text
    _, reward, done, _, info = env.step(f" {wrong(env)}")  # the forced answer: final even if wrong
    assert done and info["forced"] and reward == 0.0


def test_digits_feedback_shows_which_gold_positions_are_right():
    env = make("planted_subseq", feedback=True, feedback_detail="digits", retry_wrong_answers=True)
    env.reset(options={"index": 0})
    gold = env.reference_answer
    # the middle digit wrong, then a filler digit that cannot complete the gold
    guess = next(g for f in "0123456789" if gold not in (g := gold[0] + str((int(gold[1]) + 1) % 10) + gold[2] + f))
    obs, _, done, _, _ = env.step(f"Answer: {guess}")
    assert not done and obs == f"[wrong: {gold[0]}_{gold[2]}]\n"
    obs, *_ = env.step("7")  # a short uncommitted chunk: missing digits are wrong
    assert obs == ("[wrong: " + ("7" if gold[0] == "7" else "_") + "__]\n")
    with pytest.raises(ValueError, match="feedback_detail='hints'"):
        make("planted_subseq", feedback_detail="hints")


def test_digits_expert_traces_make_the_progress_the_feedback_shows():
    env = make("planted_subseq", max_episodes=4, feedback=True, feedback_detail="digits")
    rng = np.random.default_rng(0)
    for index in range(20):
        env.reset(options={"index": index})
        trace = env.expert_trace(rng, n_failed=3, variety=0.0)
        replies = [env.feedback_text(e) for e in trace[:-1]]
        wrong_digits = [r.count("_") for r in replies]
        assert wrong_digits == [3, 2, 1]  # chunk j of 3 has the first 3 * (j + 1) // 4 gold digits right
        gold = env.reference_answer
        assert [r[len("[wrong: ") : -2] for r in replies] == ["___", gold[0] + "__", gold[:2] + "_"]
        assert all(env.score_episode(e) == 0.0 for e in trace[:-1]) and env.score(trace[-1]) == 1.0


def test_retry_expert_traces_commit_each_failed_attempt_and_revise_after_the_reply():
    env = make("planted_subseq", max_episodes=4, feedback=True, feedback_detail="digits", retry_wrong_answers=True)
    rng = np.random.default_rng(1)
    for index in range(10):
        env.reset(options={"index": index})
        gold = env.reference_answer
        trace = env.expert_trace(rng, n_failed=3, variety=0.0)
        assert all(e.startswith("Answer: ") for e in trace)
        env.reset(options={"index": index})
        replies = []
        for e in trace[:-1]:  # each failed attempt is graded and answered; the trial goes on
            obs, reward, done, _, info = env.step(e)
            assert not done and reward == 0.0 and info["attempt"] is not None
            replies.append(obs)
        assert replies == ["[wrong: ___]\n", f"[wrong: {gold[0]}__]\n", f"[wrong: {gold[:2]}_]\n"]
        _, reward, done, _, _ = env.step(trace[-1])
        assert done and reward == 1.0
