"""The warm start of a production-vocabulary model (issue 18): wall, user and system time of N SFT
steps, on this checkout or an older one.

    python bench/warm_start_vocab.py                                     # 300 steps, this checkout
    python bench/warm_start_vocab.py --root /path/to/older --label before --steps 60

The model: the Qwen2-architecture toy-width model over Qwen3's 151,669-token vocabulary of
bench/vocab_scale.py (9.8M parameters, float32), ``model=hf model.name_or_path=DIR``; env=math,
the warm start's defaults (batches of 64 expert traces) with exactly ``--steps`` steps
(``warm_start.focused_until_loss=0``: the focused phase is not extended). Each measurement is two
``python train.py`` processes that differ only in ``warm_start.steps`` (N, then 0), each followed
by the smallest PPO run (one iteration of 2 trials, one held-out problem): the warm start's time
is the difference of the two, so it holds everything the warm start costs (building the traces,
trl's trainer, the SFT steps, reloading the model) and nothing else. Writes
bench/results/warm_start_vocab.json (one entry per ``--label``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from train_process import train_process  # noqa: E402  (the benchmarks' shared runner)

COMMON = [
    "env=math",
    "model=hf",
    "model.dtype=float32",
    "warm_start.focused_until_loss=0",
    "algo.iterations=1",
    "algo.problems_per_iter=1",
    "algo.group_size=2",
    "algo.minibatch_size=2",
    "eval.every=0",
    "eval.num_problems=1",
    "eval.samples_per_problem=1",
    "eval.prover_samples=1",
    "eval.extrapolation=false",
    "checkpoint_every=0",
    "logger.mode=disabled",
    "logger.progress_bar=false",
    "threads=2",
]


def run(root: Path, overrides: list[str], out: Path) -> dict:
    res = train_process(overrides, out, root=root, timeout_s=3 * 3600)
    return {k: res[k] for k in ("wall_s", "user_s", "sys_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose train.py runs")
    ap.add_argument("--label", default="after")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.support import build_hub_dir  # the fixture's builder: Qwen3's real tokenizer, toy width

    path = ROOT / "bench" / "results" / "warm_start_vocab.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hub = build_hub_dir(tmp / "toy-qwen3-vocab", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
        base = [*COMMON, f"model.name_or_path={hub}", f"warm_start.cache_dir={tmp / 'ws'}"]
        full = run(args.root, [*base, f"warm_start.steps={args.steps}"], tmp / "full")
        bare = run(args.root, [*base, "warm_start.steps=0"], tmp / "bare")
    entry = {k: full[k] - bare[k] for k in full}
    entry.update({"steps": args.steps, "root": str(args.root), "with_warm_start": full, "without": bare})
    results[args.label] = entry
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({args.label: entry}, indent=1))


if __name__ == "__main__":
    main()
