"""Loud failures: a raising grader stops the run with the problem id and text saved; a
non-finite loss stops it with the batch saved; either can instead be mapped (scored or
skipped) and is then counted, never silent."""

import json

import gymnasium as gym
import pytest
import torch

import envs  # noqa: F401
from envs.base import EnvironmentFailure, FailureGuard
from envs.planted_subseq import PlantedSubseqEnv
from metarl_llm.rl.losses import register_policy_loss
from metarl_llm.trainer import train
from tests.support import QUICK_RUN

SMALL = [
    *QUICK_RUN,
    "algo.iterations=2",
    "algo.problems_per_iter=2",
    "algo.group_size=2",
    "algo.minibatch_size=2",
    "eval.num_problems=2",
    "eval.samples_per_problem=1",
]


@register_policy_loss("nan_for_tests")
def nan_loss(logprobs, old_logprobs, advantages, mask, **_):
    """A policy loss that is NaN (the deliberate fault of the tests below)."""
    return (logprobs * mask).sum() * float("nan"), {"clipfrac": torch.zeros(()), "approx_kl": torch.zeros(())}


def raising_outcome(self, episodes, answer):
    raise ZeroDivisionError("grader bug")


def test_the_guard_raises_with_the_problem_and_text_or_scores_and_counts(monkeypatch):
    monkeypatch.setattr(PlantedSubseqEnv, "outcome", raising_outcome)
    env = FailureGuard(gym.make("metarl/PlantedSubseq-v0"))
    _, info = env.reset(seed=3)
    with pytest.raises(EnvironmentFailure, match="grader bug") as caught:
        env.step("Answer: 42")
    assert caught.value.problem_id == info["problem_id"] and caught.value.text == "Answer: 42"
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    scored = FailureGuard(gym.make("metarl/PlantedSubseq-v0"), on_error="score", error_score=-1.0)
    scored.reset(seed=3)
    obs, reward, terminated, truncated, info = scored.step("Answer: 42")
    assert (reward, terminated, scored.failures) == (-1.0, True, 1) and "ZeroDivisionError" in info["error"]
    with pytest.raises(ValueError, match="reward.on_error='ignore'"):
        FailureGuard(gym.make("metarl/PlantedSubseq-v0"), on_error="ignore")


def test_a_raising_reward_stops_the_run_with_its_problem_id_saved(compose_cfg, tmp_path, monkeypatch):
    real = PlantedSubseqEnv.outcome
    monkeypatch.setattr(
        PlantedSubseqEnv,
        "outcome",  # raise in training; held-out grading works
        lambda self, eps, ans: raising_outcome(self, eps, ans) if self.split == "train" else real(self, eps, ans),
    )
    with pytest.raises(EnvironmentFailure, match="saved in"):
        train(compose_cfg(*SMALL), tmp_path / "run")
    records = list((tmp_path / "run" / "failures").glob("*.json"))
    assert len(records) == 1
    rec = json.loads(records[0].read_text())
    assert rec["iteration"] == 1 and rec["problem_id"] and isinstance(rec["text"], str)
    assert "ZeroDivisionError: grader bug" in rec["cause"] and "raising_outcome" in rec["traceback"]


def test_held_out_grading_failures_are_loud_too(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(PlantedSubseqEnv, "outcome", raising_outcome)
    with pytest.raises(EnvironmentFailure, match="grader bug"):
        train(compose_cfg(*SMALL), tmp_path / "run")  # the start evaluation grades first


def test_scored_failures_are_counted(compose_cfg, tmp_path, monkeypatch):
    real = PlantedSubseqEnv.outcome

    def train_split_raises(self, episodes, answer):  # held-out grading stays intact
        if self.split == "train":
            raise ZeroDivisionError("grader bug")
        return real(self, episodes, answer)

    monkeypatch.setattr(PlantedSubseqEnv, "outcome", train_split_raises)
    cfg = compose_cfg(*SMALL, "reward.on_error=score", "reward.error_score=0.0", "logger.mode=disabled")
    train(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    counted = [r["train/env_failures"] for r in rows if "train/env_failures" in r]
    # Every trial that reached a grader failed; trials end at their first answer: at least one per trial.
    assert len(counted) == 2 and all(c >= 1 for c in counted) and sum(counted) <= 8
    assert not (tmp_path / "run" / "failures").exists()


def test_a_nan_loss_is_caught_with_the_batch_saved_or_skipped_and_counted(compose_cfg, tmp_path):
    with pytest.raises(FloatingPointError, match="batch is saved in"):
        train(compose_cfg(*SMALL, "algo.policy_loss=nan_for_tests"), tmp_path / "run")
    saved = list((tmp_path / "run" / "failures").glob("*_batch.pt"))
    assert len(saved) == 1 and torch.load(saved[0])["input_ids"].shape[0] == 4

    summary = train(compose_cfg(*SMALL, "algo.policy_loss=nan_for_tests", "algo.on_nonfinite=skip"), tmp_path / "skip")
    rows = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["train/nonfinite_skipped"] for r in rows if "train/nonfinite_skipped" in r]
    assert skipped == [4, 4]  # every optimiser step dropped: 2 epochs x 2 minibatches per iteration
    assert summary["iterations"] == 2
