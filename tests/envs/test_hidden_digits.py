"""planted_subseq's ``hidden_digits``: gold digits no rule determines, which only the digits replies
reveal (issue 19's feedback setting, where in-context adaptation is needed)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.envs.test_retry import digits_after_marker, make, search_traces

FEEDBACK = dict(feedback=True, feedback_detail="digits", retry_wrong_answers=True)


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_rule_digits_are_kept_and_the_hidden_ones_do_not_follow_the_input(split):
    plain = make("planted_subseq", split=split, **FEEDBACK)
    hidden = make("planted_subseq", split=split, hidden_digits=1, **FEEDBACK)
    last_digits, pairs = [], set()
    for index in range(256):
        plain.reset(options={"index": index})
        hidden.reset(options={"index": index})
        assert plain.problem.prompt == hidden.problem.prompt  # same input digits
        gold, rule_gold = hidden.reference_answer, plain.reference_answer
        assert gold[:2] == rule_gold[:2]
        assert hidden.problem.problem_id == f"{plain.problem.problem_id}/{index}"
        last_digits.append(gold[2])
        pairs.add((rule_gold[2], gold[2]))
    counts = np.bincount([int(d) for d in last_digits], minlength=10)
    # 256 uniform draws: each digit's count is 25.6 +- 4.8; [10, 45] is beyond 3 sigma either way
    assert counts.min() >= 10 and counts.max() <= 45, counts
    # the rule's own last digit does not predict the hidden one: most of its 100 pairings occur
    assert len(pairs) > 80
    hidden.reset(options={"index": 3})
    again = make("planted_subseq", split=split, hidden_digits=1, **FEEDBACK)
    again.reset(options={"index": 3})
    assert again.reference_answer == hidden.reference_answer  # deterministic per index


def test_train_and_test_hidden_digits_come_from_different_seeds():
    train = make("planted_subseq", split="train", hidden_digits=3, **FEEDBACK)
    test = make("planted_subseq", split="test", hidden_digits=3, **FEEDBACK)
    golds = [[], []]
    for env, out in zip((train, test), golds):
        for i in range(50):
            env.reset(options={"index": i})
            out.append(env.reference_answer)
    assert golds[0] != golds[1]
    assert sum(a == b for a, b in zip(*golds)) < 5  # 1/1000 chance each if independent


def test_a_sweep_by_reply_reaches_k_over_10_and_a_fixed_guess_one_in_10():
    """The bound the docstring states, on the 256 test problems: a policy that knows the rule and
    sweeps the hidden digit 0, 1, 2, ... by reply succeeds within k episodes iff the hidden digit is
    below k; one that writes the same digit every time gets only the problems whose digit it is."""
    env = make("planted_subseq", split="test", hidden_digits=1, max_episodes=10, **FEEDBACK)
    found_at, fixed = [], 0
    for index in range(256):
        env.reset(options={"index": index})
        known = env.reference_answer[:2]
        for k in range(10):
            obs, reward, done, _, info = env.step(f"Answer: {known}{k}0")
            if done:
                break
            assert obs == f"[wrong: {known}_]\n"  # the reply confirms the rule's digits, rejects the guess
        assert reward == 1.0 and info["episode_index"] == int(env.reference_answer[2])
        found_at.append(info["episode_index"] + 1)
        env.reset(options={"index": index})
        _, reward, done, _, _ = env.step(f"Answer: {known}40")  # the same digit on every problem
        assert done == (reward == 1.0) and reward == float(env.reference_answer[2] == "4")
        fixed += reward
    found_at = np.array(found_at)
    for k in (1, 2, 4, 8):
        assert abs((found_at <= k).mean() - k / 10) < 0.1
    assert fixed / 256 < 0.2


@pytest.mark.parametrize("retry", [True, False])
def test_the_search_expert_knows_the_rule_and_searches_only_the_hidden_digits(retry):
    searched = 0
    shape = {"hidden_digits": 1}
    for env, trace, replies in search_traces(shape, retry, num=200, seed=5):
        gold = env.reference_answer
        guesses = [digits_after_marker(env, e) for e in trace]
        assert all(g[:2] == gold[:2] for g in guesses)  # the rule's digits from chunk 0 on
        assert all(r == f"[wrong: {gold[:2]}_]\n" for r in replies)
        tried = [g[2] for g in guesses[:-1]]
        assert len(set(tried)) == len(tried) and gold[2] not in tried  # never a rejected digit again
        searched += len(tried)
    assert searched > 150  # the search was exercised


def test_hidden_digits_without_the_replies_that_reveal_them_is_refused():
    with pytest.raises(ValueError, match="feedback=True and feedback_detail='digits'"):
        make("planted_subseq", hidden_digits=1, feedback=True)
    with pytest.raises(ValueError, match="feedback=True and feedback_detail='digits'"):
        make("planted_subseq", hidden_digits=1, feedback_detail="digits")
    with pytest.raises(ValueError, match=r"hidden_digits must be in \[0, gold_length=3\]"):
        make("planted_subseq", hidden_digits=4, **FEEDBACK)
    from metarl_llm.runtime.setup import compose_config

    with pytest.raises(ValueError, match="env.feedback=true env.feedback_detail=digits"):
        compose_config(["env=planted_subseq", "env.hidden_digits=1"]).validate()
    with pytest.raises(ValueError, match=r"env.hidden_digits must be in \[0, env.gold_length=3\]"):
        compose_config(["env=planted_subseq", "env.hidden_digits=5"]).validate()
    compose_config(["env=planted_subseq", "env.hidden_digits=1", "env.feedback=true", "env.feedback_detail=digits"]).validate()


def test_the_default_leaves_the_warm_start_cache_key_alone():
    from metarl_llm.runtime.setup import compose_config
    from metarl_llm.sft.warm_start import LATER_ENV_OPTIONS, cache_key

    assert LATER_ENV_OPTIONS["hidden_digits"] == 0
    c = compose_config(["env=planted_subseq", "env.feedback=true", "env.feedback_detail=digits"])
    fields = [(f.name, f.type, dataclasses.field(default=getattr(c.env, f.name))) for f in dataclasses.fields(c.env)]
    Before = dataclasses.make_dataclass("Before", [f for f in fields if f[0] != "hidden_digits"])
    before = Before(**{k: v for k, v in dataclasses.asdict(c.env).items() if k != "hidden_digits"})
    key = cache_key(c.model, c.env, c.budget, c.warm_start, 0, {"a": 0})
    assert cache_key(c.model, before, c.budget, c.warm_start, 0, {"a": 0}) == key
    moved = cache_key(c.model, dataclasses.replace(c.env, hidden_digits=1), c.budget, c.warm_start, 0, {"a": 0})
    assert moved != key
