"""Data parallel through accelerate: a 2-process launch equals a 1-process run of the same global batch."""

import json
import os

import pytest
import torch

from metarl_llm.core.batch import RolloutBatch
from metarl_llm.runtime.distributed import RUN_TIME_ENV, Dist, gather_batch, run_time
from tests.support import load_script


def load_bench():
    return load_script("bench/data_parallel.py", "bench_data_parallel")


def test_single_process_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = Dist()
    assert (d.world, d.rank, d.is_main) == (1, 0, True)
    assert d.shard(8) == range(0, 8)
    x = torch.arange(3.0)
    assert torch.equal(d.all_sum(x), x) and d.all_gather_objects({"a": 1}) == [{"a": 1}]
    batch = RolloutBatch(*[torch.zeros(2, 3)] * 10, torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert gather_batch(d, batch) is batch


def test_shards_must_divide_evenly(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = Dist()
    d.world, d.rank = 2, 1  # the arithmetic only
    assert d.shard(8) == range(4, 8)
    with pytest.raises(ValueError, match="algo.problems_per_iter=7 is not divisible by the 2 processes"):
        d.shard(7, "algo.problems_per_iter")


def test_run_time_is_fixed_per_launch(monkeypatch):
    monkeypatch.setenv(RUN_TIME_ENV, "86400.5")
    assert run_time("%Y") == run_time("%Y") and run_time("%S").isdigit()
    monkeypatch.delenv(RUN_TIME_ENV)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    first = run_time("%H-%M-%S")
    assert os.environ[RUN_TIME_ENV] and run_time("%H-%M-%S") == first


def test_two_processes_match_one_process(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 train.py device=cpu` against `train.py`: same trials, same
    losses, entropy and gradient norms per iteration (an entropy bonus gives the untrained
    model a non-zero gradient, so the second iteration depends on the first update)."""
    bench = load_bench()
    result = bench.main(
        [
            "--iterations",
            "2",
            "--out-root",
            str(tmp_path / "runs"),
            "--results-dir",
            str(tmp_path / "res"),
            "--timeout",
            "600",
            "algo.ent_coef=0.05",
            # a small model: the test compares the processes with each other, which needs no size
            "model.tiny.hidden_size=64",
            "model.tiny.num_layers=2",
            "model.tiny.intermediate_size=128",
        ]
    )
    rows = result["iterations"]
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        single, multi = r["single"], r["two_process"]
        assert single["train/tokens_per_trial"] == multi["train/tokens_per_trial"]  # the same trials
        assert single["train/grad_norm"] > 0
        for k in ("train/entropy", "train/grad_norm", "train/loss/policy", "train/loss/kl", "train/kl_ref"):
            assert multi[k] == pytest.approx(single[k], rel=1e-4, abs=1e-6), k
    # One run directory per launch: the second process wrote nothing of its own.
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 1 and sorted(p.name for p in (tmp_path / "runs" / runs[0]).iterdir()) == ["single", "two_process"]
    assert json.loads((tmp_path / "res" / "data_parallel.json").read_text())["max_abs_diff"] < 1e-3
