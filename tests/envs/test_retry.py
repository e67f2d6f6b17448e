"""Several attempts at one problem: ``retry_wrong_answers`` (envs/base.py) and planted_subseq's
``feedback_detail="digits"`` replies and its search-by-reply expert traces."""

from __future__ import annotations

import hashlib
import json

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


# ------------------------------------------------- planted_subseq: the search-by-reply expert
# (These replace two tests of the earlier expert, whose failed chunks were the gold with its first
# digits kept: they pinned replies "___", "<g0>__", "<g0g1>_" that a search by reply does not give.)

SHAPES = [{}, {"gold_length": 2, "chunk_length": 2}, {"input_length": 8, "gold_length": 4, "chunk_length": 6}]


def digits_after_marker(env, episode: str) -> str:
    pos = episode.rfind(env.answer_marker)
    return "".join(c for c in (episode[pos + len(env.answer_marker) :] if pos >= 0 else episode) if c.isdigit())


def search_traces(shape: dict, retry: bool, num: int, seed: int):
    """``num`` digits-feedback expert traces over max_episodes 2..6, n_failed 0..max_episodes - 1 and
    variety 0, 0.5, 1, each replayed through the env: (env reset to the problem, trace, the replies
    the env gave to its failed attempts)."""
    rng = np.random.default_rng(seed)
    kwargs = dict(feedback=True, feedback_detail="digits", retry_wrong_answers=retry, **shape)
    by_k = {k: make("planted_subseq", max_episodes=k, **kwargs) for k in (2, 3, 4, 6)}
    for t in range(num):
        k = (2, 3, 4, 6)[t % 4]
        env = by_k[k]
        index, n_failed, variety = int(rng.integers(0, 10_000)), int(rng.integers(0, k)), (0.0, 0.5, 1.0)[t % 3]
        env.reset(options={"index": index})
        trace = env.expert_trace(rng, n_failed=n_failed, variety=variety)
        assert len(trace) == n_failed + 1
        env.reset(options={"index": index})
        replies = []
        for e in trace[:-1]:
            obs, reward, done, _, info = env.step(e)
            assert not done and reward == 0.0 and not info["correct"]
            assert (info.get("attempt") is not None) == retry
            replies.append(obs)
        _, reward, done, _, info = env.step(trace[-1])
        assert done and reward == 1.0 and info["correct"] and info["episode_index"] == n_failed
        yield env, trace, replies


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("retry", [True, False])
def test_search_traces_replay_through_the_env_and_follow_the_replies(shape, retry):
    kept = avoided = 0
    for env, trace, replies in search_traces(shape, retry, num=200, seed=11):
        gold, n = env.reference_answer, env.gold_length
        assert all(e.startswith(f"{env.answer_marker} ") == retry for e in trace[:-1])
        assert trace[-1].startswith(f"{env.answer_marker} {gold}")  # the gold first, then filler
        guesses = [digits_after_marker(env, e) for e in trace]
        assert all(len(g) == env.chunk_length and gold not in g for g in guesses[:-1])
        # the reply the env gave is the positional one, computed here by hand
        marks = []
        for g, reply in zip(guesses, replies):
            mark = "".join(d if d == c else "_" for d, c in zip(gold, g))
            assert reply == f"[wrong: {mark}]\n"
            marks.append(mark)
        # the rule, against the replies the env gave: confirmed digits kept, rejected ones not retried
        for j in range(1, len(trace)):
            for i in range(n):
                confirmed = {m[i] for m in marks[:j] if m[i] != "_"}
                rejected = {g[i] for g, m in zip(guesses[:j], marks[:j]) if m[i] == "_"}
                if confirmed:
                    assert {guesses[j][i]} == confirmed, (trace, replies)
                    kept += 1
                else:
                    assert guesses[j][i] not in rejected, (trace, replies)
                    avoided += bool(rejected)
    assert kept >= 20 and avoided >= 200  # the rule was exercised, not vacuously true


def test_the_first_guess_ignores_the_gold_except_to_avoid_it():
    env = make("planted_subseq", max_episodes=3, feedback=True, feedback_detail="digits", retry_wrong_answers=True)
    matches = positions = 0
    for seed in range(20):
        firsts = {}
        for index in range(50):
            env.reset(options={"index": index})
            trace = env.expert_trace(np.random.default_rng(seed), n_failed=2, variety=(0.0, 0.5, 1.0)[seed % 3])
            firsts[env.reference_answer] = guess = digits_after_marker(env, trace[0])[: env.gold_length]
            matches += sum(a == b for a, b in zip(guess, env.reference_answer))
            positions += env.gold_length
        # the same draws give the same guess on every problem, but where that guess is the problem's gold
        common = max(set(firsts.values()), key=list(firsts.values()).count)
        assert all(guess == common or gold == common for gold, guess in firsts.items())
    assert 0.06 < matches / positions < 0.14  # 3000 positions: chance agreement (1/10)


def test_a_search_that_the_replies_end_cannot_fail_again():
    env = make("planted_subseq", gold_length=1, chunk_length=1, max_episodes=11, feedback=True, feedback_detail="digits")
    env.reset(options={"index": 0})
    trace = env.expert_trace(np.random.default_rng(0), n_failed=9, variety=0.0)  # every other digit, then the gold
    assert sorted(trace[:-1]) == sorted(set("0123456789") - {env.reference_answer})
    with pytest.raises(ValueError, match="found the gold"):
        env.expert_trace(np.random.default_rng(0), n_failed=10, variety=0.0)


# Verdict traces, as the expert wrote them before the search-by-reply expert (captured from that
# implementation): 4 retry modes x feedback, 25 problems, n_failed 0..3, variety 0 / 0.5 / 1.
VERDICT_SHA256 = "f5955c51bd75b02249f4c38367cba640c2e2589f17a2911a6f133013b49e65ed"


def test_verdict_traces_are_unchanged():
    traces = []
    for retry in (False, True):
        for feedback in (False, True):
            env = make("planted_subseq", max_episodes=4, feedback=feedback, retry_wrong_answers=retry)
            rng = np.random.default_rng(7)
            for index in range(25):
                env.reset(options={"index": index})
                for n_failed in range(4):
                    for variety in (0.0, 0.5, 1.0):
                        traces.append(env.expert_trace(rng, n_failed=n_failed, variety=variety))
    assert len(traces) == 1200
    assert hashlib.sha256(json.dumps(traces).encode()).hexdigest() == VERDICT_SHA256
    env = make("planted_subseq", max_episodes=3, feedback=True, retry_wrong_answers=True)
    pinned = [
        ((0, 2, 0.0, 0), ["Answer: 3920", "Answer: 4030", "Answer: 2810"]),
        ((1, 2, 1.0, 1), ["Answer: 7901", "Answer: 2384", "Answer: 1452"]),
        ((2, 1, 0.5, 2), ["Answer: 1248", "Answer: 3501"]),
        ((3, 0, 1.0, 3), ["Answer: 0141"]),
    ]
    for (index, n_failed, variety, seed), trace in pinned:
        env.reset(options={"index": index})
        assert env.expert_trace(np.random.default_rng(seed), n_failed, variety) == trace
    env = make("planted_subseq", max_episodes=3)
    for (index, n_failed, variety, seed), trace in [
        ((4, 2, 0.0, 4), ["4680", "5790", "Answer: 3570"]),
        ((5, 2, 1.0, 5), ["0845", "9023", "Answer: 6671"]),
    ]:
        env.reset(options={"index": index})
        assert env.expert_trace(np.random.default_rng(seed), n_failed, variety) == trace
