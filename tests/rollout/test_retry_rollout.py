"""Several attempts in one trial (env.retry_wrong_answers): the rollout's bookkeeping when a policy
commits a wrong answer and ends its episode with EOS (the warm start's retry traces end every
attempt with the delimiter, but a policy may still sample EOS). The EOS ends the attempt, not the
trial: the environment's reply follows and the next episode is the next attempt. Without retries
(or without a committed answer) an EOS still forces the answer."""

from __future__ import annotations

import gymnasium as gym

import envs  # noqa: F401  (registers the environments)
from metarl_llm.config import BudgetConfig
from metarl_llm.rollout.base import finish_episode, start_trials

BUDGET = BudgetConfig(max_episodes=3, max_episode_tokens=24, max_total_tokens=72, answer_max_tokens=6)


def episode(t, env, codec, text, forced=False, eos=True):
    toks = codec.encode(text) + ([codec.eos_id] if eos else codec.delimiter_token)
    return finish_episode(t, env, codec, toks, [0.0] * len(toks), forced, BUDGET)


def test_an_eos_after_a_wrong_attempt_ends_the_attempt_not_the_trial(char_policy):
    _, codec = char_policy
    env = gym.make("metarl/PlantedSubseq-v0", split="test", max_episodes=3, feedback=True, feedback_detail="digits",
                   retry_wrong_answers=True)  # fmt: skip
    [t] = start_trials(codec, [env], [{"options": {"index": 0}}], [0], BUDGET)
    gold = env.unwrapped.reference_answer
    miss = "".join(str((int(g) + 1) % 10) for g in gold) + "0"
    done, forced, obs = episode(t, env, codec, f"Answer: {miss}")
    assert not done and not forced
    assert obs == codec.delimiter_token + codec.encode("[wrong: ___]\n")  # the reply, after a delimiter
    t.append(obs, False, -1)
    done, forced, obs = episode(t, env, codec, f"Answer: {gold}0")
    assert done and t.outcome == 1.0 and t.answer_episode == 1 and not t.forced
    assert t.ids.count(codec.eos_id) == 2 and t.episode_texts[0] == f"Answer: {miss}"


def test_without_retries_or_without_an_answer_an_eos_forces_the_answer(char_policy):
    _, codec = char_policy
    env = gym.make("metarl/PlantedSubseq-v0", split="test", max_episodes=3, retry_wrong_answers=True)
    [t] = start_trials(codec, [env], [{"options": {"index": 0}}], [0], BUDGET)
    done, forced, obs = episode(t, env, codec, "1234")  # no answer: the EOS is the policy stopping
    assert not done and forced and codec.tokenizer.decode(obs).strip() == "Answer:"
    env = gym.make("metarl/PlantedSubseq-v0", split="test", max_episodes=3)
    [t] = start_trials(codec, [env], [{"options": {"index": 0}}], [0], BUDGET)
    done, *_ = episode(t, env, codec, "Answer: 0000")
    assert done and t.answer_episode == 0  # without retries the first answer ends the trial
