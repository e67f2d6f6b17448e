"""The PPO job's pieces that are not the RL maths: the per-iteration metrics (a pure function of
the batch and per-trial figures, checked against hand-computed values) and the failure records."""

import json
import math

import pytest
import torch

from envs.base import EnvironmentFailure
from metarl_llm.core.batch import RolloutBatch
from metarl_llm.jobs.ppo import PPOJob, iteration_metrics
from metarl_llm.runtime.failures import failure_record


def batch_of(outcome, logprobs, ref_logprobs, mask, values=None, returns=None) -> RolloutBatch:
    zeros = torch.zeros_like(torch.as_tensor(logprobs, dtype=torch.float32))
    t = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
    return RolloutBatch(
        input_ids=zeros.long(),
        attention_mask=torch.ones_like(zeros).long(),
        action_mask=t(mask),
        episode_index=zeros.long(),
        outcome=t(outcome),
        group=torch.arange(len(outcome)),
        logprobs=t(logprobs),
        ref_logprobs=t(ref_logprobs),
        values=zeros if values is None else t(values),
        token_rewards=zeros,
        advantages=zeros,
        returns=zeros if returns is None else t(returns),
    )


def test_iteration_metrics_against_hand_computed_values():
    # two trials: the first answered correctly in episode 1 after 6 policy tokens, the second
    # was forced to answer after 2 episodes and failed
    per_trial = {
        "policy_tokens": [6, 10],
        "episodes": [2, 3],
        "forced": [False, True],
        "outcome": [1.0, 0.0],
        "answer_episode": [1, 2],
        "bonus": [0.25, -0.05],
    }
    batch = batch_of(
        outcome=[0.9, 0.2],
        logprobs=[[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]],
        ref_logprobs=[[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]],
        mask=[[1, 1, 0], [1, 0, 0]],
    )
    stats = {"update_tokens": 3, "nonfinite_skipped": 0, "policy_loss": 0.125}
    m = iteration_metrics(
        per_trial,
        batch,
        torch.tensor([1.0, 0.0]),
        stats,
        n_trials=2,
        max_episodes=3,
        use_critic=False,
        with_bonus=True,
        mismatch=0.0,
        env_failures=1.0,
        curves=[[0.1, 0.6], [0.1, 0.2, 0.3]],
        verifier_reward=True,
    )
    assert m["train/outcome"] == 0.5
    assert m["train/reward"] == pytest.approx(0.55)
    assert m["train/bonus_return"] == pytest.approx(0.1)
    assert m["train/tokens_per_trial"] == 8.0
    assert m["train/episodes_per_trial"] == 2.5
    assert m["train/forced_answer_rate"] == 0.5
    # KL over the three action tokens: (0.5 + -1.0 + 0.0) / 3
    assert m["train/kl_ref"] == pytest.approx(-0.5 / 3)
    assert math.isnan(m["train/explained_variance"])
    assert m["train/env_failures"] == 1.0 and m["train/policy_loss"] == 0.125 and "train/update_tokens" not in m
    # the verifier's reward (>= 0.5) against the environment's success: [0.9 vs 1] right, [0.2 vs 0] right
    assert m["train/reward_verifier_accuracy"] == 1.0
    # J at each boundary over the trials that have it: b0 (0.1 + 0.1) / 2, b1 (0.6 + 0.2) / 2, b2 0.3
    assert [m[f"train/J/boundary_{b}"] for b in range(3)] == pytest.approx([0.1, 0.4, 0.3])
    # success by the answer's episode: trial 0 correct at episode 1
    assert [m[f"train/success_by_episode_{j}"] for j in range(4)] == [0.0, 0.5, 0.5, 0.5]
    assert not any(k.startswith("perf/") for k in m)  # timings are the job's, not this function's


def test_iteration_metrics_without_bonus_or_verifier():
    per_trial = {
        "policy_tokens": [4],
        "episodes": [1],
        "forced": [False],
        "outcome": [0.0],
        "answer_episode": [0],
        "bonus": [0.0],
    }
    batch = batch_of(
        outcome=[0.0],
        logprobs=[[-1.0, -1.0]],
        ref_logprobs=[[-1.0, -1.0]],
        mask=[[1, 1]],
        values=[[0.0, 1.0]],
        returns=[[0.0, 1.0]],
    )
    m = iteration_metrics(
        per_trial,
        batch,
        torch.tensor([0.0]),
        {"update_tokens": 2, "nonfinite_skipped": 0},
        n_trials=1,
        max_episodes=1,
        use_critic=True,
        with_bonus=False,
        mismatch=float("nan"),
        env_failures=0.0,
        curves=None,
        verifier_reward=False,
    )
    assert m["train/bonus_return"] == 0.0 and m["train/kl_ref"] == 0.0
    assert m["train/explained_variance"] == pytest.approx(1.0)  # values equal the returns
    assert not any(k.startswith("train/J/boundary") for k in m) and "train/reward_verifier_accuracy" not in m


def test_iteration_reads_as_the_stages_in_order():
    """iteration() calls the seven stages in order; a stage is a method a test or benchmark can wrap."""
    calls = []

    class Recording(PPOJob):
        def __init__(self):  # no set-up: only the order of the stages is under test
            pass

        def rollout(self, it):
            calls.append("rollout")
            return "roll"

        def score(self, roll):
            calls.append("score")
            return type("S", (), {"batch": "batch"})()

        def bonus(self, it, roll, scored):
            calls.append("bonus")

        def rewards_and_advantages(self, roll, scored):
            calls.append("rewards_and_advantages")

        def update(self, it, batch):
            calls.append("update")
            return {}, 1.0

        def log(self, it, roll, scored, stats, t_update, t0):
            calls.append("log")
            return {"it": it}

    assert Recording().iteration(3) == {"it": 3}
    assert calls == ["rollout", "score", "bonus", "rewards_and_advantages", "update", "log"]


def test_failure_record_saves_environment_failures_and_nonfinite_batches(tmp_path):
    with pytest.raises(EnvironmentFailure, match="saved in .*iter_000004_EnvironmentFailure.json"):
        with failure_record(tmp_path, 4):
            raise EnvironmentFailure("p7", "\\boxed{x}", 1, ZeroDivisionError("grader broke"))
    record = json.loads((tmp_path / "failures" / "iter_000004_EnvironmentFailure.json").read_text())
    assert record["problem_id"] == "p7" and record["text"] == "\\boxed{x}" and record["iteration"] == 4

    batch = batch_of(outcome=[float("nan")], logprobs=[[0.0]], ref_logprobs=[[0.0]], mask=[[1]])
    with pytest.raises(FloatingPointError, match="iteration 5: .*the batch is saved in"):
        with failure_record(tmp_path, 5, batch):
            raise FloatingPointError("non-finite reward")
    assert (tmp_path / "failures" / "iter_000005_FloatingPointError_batch.pt").exists()
    # without a batch a FloatingPointError passes through unrecorded; other errors always do
    with pytest.raises(FloatingPointError), failure_record(tmp_path, 6):
        raise FloatingPointError("x")
    with pytest.raises(KeyError), failure_record(tmp_path, 7):
        raise KeyError("y")
    assert not list((tmp_path / "failures").glob("iter_00000[67]*"))
