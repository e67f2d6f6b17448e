"""A PPO run whose episodes are cut after generation (segment=markers, MRT's rule) with the progress
bonus: the warm start's traces, the rollout, J at every boundary and the update run end to end, the
trainer's log-probs match the sampled ones, and the warm start's cache entry depends on the rule."""

import json

import pytest

from metarl_llm.trainer import train
from tests.support import QUICK_RUN

SMALL = [
    *QUICK_RUN,
    "env=math",
    "segment=markers",
    "bonus=info_gain",
    "budget.max_total_tokens=80",
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
    "warm_start.steps=3",
    "warm_start.num_traces=16",
    "warm_start.batch_size=8",
]


@pytest.mark.usefixtures("one_thread")
def test_a_markers_run_trains_end_to_end(compose_cfg, tmp_path):
    cache = f"warm_start.cache_dir={tmp_path / 'ws'}"
    train(compose_cfg(*SMALL, cache), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    it = next(r for r in rows if "train/logprob_mismatch_max" in r)
    assert it["train/logprob_mismatch_max"] < 1e-5
    assert (tmp_path / "run" / "config.yaml").read_text().count("name: markers") == 1
    # the final evaluation's transcripts: every piece of the stream labelled, J before each episode
    [text] = [p.read_text() for p in (tmp_path / "run").glob("transcripts_*.txt")]
    first = text.split("\n\n=== ")[0]
    assert first.startswith("=== ") and "[prompt]\n" in first and "[episode 0" in first and "-- J = " in first
    assert first.count("-- J = ") == first.count("[episode ")  # a boundary before each episode, the answer's included
    assert first.count("(answer") == 1
    train(compose_cfg(*SMALL, cache, "segment=paragraph"), tmp_path / "para")
    assert len(list((tmp_path / "ws").iterdir())) == 2  # one cache entry per rule
