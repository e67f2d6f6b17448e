"""The RL^2 setting end to end: planted_subseq with digit feedback and several attempts per trial,
trained with MRT's termination baseline (algo.advantage=termination, no bonus), and the in-context
adaptation figures of the start and final evaluations in summary.json, metrics.jsonl and plots."""

import json

import pytest

from metarl_llm.trainer import train
from tests.support import QUICK_RUN, undocumented_keys

RUN = [
    *QUICK_RUN,
    "eval.adaptation=true",
    "eval.adaptation_episodes=[1,2,4]",
    "env=planted_subseq",
    "env.feedback=true",
    "env.feedback_detail=digits",
    "env.retry_wrong_answers=true",
    "algo=grpo",
    "algo.advantage=termination",
    "bonus.num_samples=2",
    "algo.iterations=1",
    "algo.problems_per_iter=2",
    "algo.group_size=2",
    "algo.minibatch_size=4",
    "eval.num_problems=3",
    "eval.samples_per_problem=2",
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
]


@pytest.mark.usefixtures("one_thread")
def test_termination_baseline_with_retries_and_the_adaptation_figures(compose_cfg, tmp_path):
    summary = train(compose_cfg(*RUN), tmp_path / "run")
    assert summary["advantage"] == "termination"
    for key in ("adaptation", "adaptation_start"):
        fig = summary[key]
        assert set(fig["sequential_success"]) == {"1", "2", "4"} == set(fig["parallel_pass"])
        assert fig["sequential_success"]["1"] == fig["parallel_pass"]["1"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("heldout_adapt/parallel_maj@4" in r for r in rows if r["iteration"] == 0)  # the start's
    assert any("heldout_adapt/sequential_success_4ep" in r for r in rows if r["iteration"] == 1)  # the final's
    assert any("train/J/boundary_0" in r for r in rows)  # R_term was estimated without a bonus
    assert undocumented_keys(rows) == []
    assert (tmp_path / "run" / "adaptation.png").exists() and list((tmp_path / "run").glob("adaptation_iter_*.png"))
