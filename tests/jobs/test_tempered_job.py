"""model.temperature in a PPO run: the trainer's recomputed log-probs of the tempered policy equal
the rollout's sampling log-probs (train/logprob_mismatch_max), and a tempered run samples other
trials than an untempered one; eval.greedy and eval.temperature run the held-out evaluation."""

import json

import pytest

from metarl_llm.trainer import train
from tests.support import QUICK_RUN

SMALL = [
    *QUICK_RUN,
    "env=planted_subseq",
    "algo.iterations=1",
    "algo.problems_per_iter=2",
    "algo.group_size=3",
    "algo.minibatch_size=3",
    "eval.num_problems=2",
    "eval.samples_per_problem=2",
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
]


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("one_thread")
def test_a_tempered_policy_scores_what_it_sampled(compose_cfg, tmp_path):
    train(compose_cfg(*SMALL, "model.temperature=0.5"), tmp_path / "cold")
    train(compose_cfg(*SMALL), tmp_path / "plain")
    cold = next(r for r in rows(tmp_path / "cold") if "train/logprob_mismatch_max" in r)
    plain = next(r for r in rows(tmp_path / "plain") if "train/logprob_mismatch_max" in r)
    assert cold["train/logprob_mismatch_max"] < 1e-5 and plain["train/logprob_mismatch_max"] < 1e-5
    assert cold["train/entropy"] < plain["train/entropy"]  # softmax(logits / 0.5) of an untrained model is sharper
    train(compose_cfg(*SMALL, "model.temperature=0.5", "eval.greedy=true"), tmp_path / "greedy")
    heldout = [r for r in rows(tmp_path / "greedy") if "heldout/success" in r]
    assert heldout and all(0 <= r["heldout/success"] <= 1 for r in heldout)


def test_bad_temperatures_name_the_key(compose_cfg):
    with pytest.raises(ValueError, match="model.temperature must be > 0"):
        compose_cfg("model.temperature=0").validate()
    with pytest.raises(ValueError, match="eval.temperature must be > 0 or null"):
        compose_cfg("eval.temperature=-1").validate()
