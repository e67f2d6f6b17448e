"""Full fine-tuning vs a LoRA policy: held-out success and memory at equal PPO iterations.

    OMP_NUM_THREADS=1 python bench/lora.py                      # 30 iterations, 32 held-out problems, seed 0, 1 thread
    OMP_NUM_THREADS=1 python bench/lora.py --iterations 100 --num-problems 64 --seeds 0 1 2
    OMP_NUM_THREADS=1 python bench/lora.py --lora-lr 3e-3 algo.problems_per_iter=16

Both arms start from one cached warm start of the default job (planted_subseq, the tiny
~1M-parameter model, ``warm_start.seed=0``, trained once by a first process that does
nothing else) and run PPO for the same iterations on the same problems:

- ``full``: every weight trains (``algo.lr`` as configured: 1e-4 by default), and the
  frozen reference is a deep copy of the policy;
- ``lora``: ``model.lora.r=8`` (alpha 16, the attention and MLP projections); only the
  adapter (and the value head) trains, at ``--lora-lr`` (1e-3 by default: LoRA updates
  need a larger step), and the reference is the same weights with the adapter disabled.

Each (arm, seed) runs ``metarl_llm.jobs.ppo.train`` in a fresh process (the RL seed
varies; the warm start stays the one of ``warm_start.seed=0``), which reports:

- held-out success of the warm-started model and of the trained one (``eval.num_problems``
  problems x ``eval.samples_per_problem`` trials, at the training budget);
- the peak resident set size of that process (``resource.getrusage``: imports, rollouts,
  evaluations and the update together), and the same minus the peak right after the
  imports (what training added; both arms import peft before that point, so the
  library's own code is not counted against LoRA);
- the bytes of training state, measured on the live objects after the first update:
  parameters (the policy's, frozen ones included, plus the value head), the reference's
  own parameters (a copy for ``full``, none for ``lora``), gradients and AdamW state. For
  a 1M-parameter model these are a few MB, far below the process's RSS; they are the part
  that grows with the model.

Writes bench/results/lora.json (every figure, the settings) and bench/results/lora_table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metarl_llm.runtime.setup import compose_config as compose

ARMS = {"full": [], "lora": ["model.lora.r=8"]}


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (by storage pointer: shared parameters count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def worker(arm: str, overrides: list[str], out: Path) -> None:
    """One arm in this (fresh) process: train, measure, write ``out`` (JSON)."""
    import peft  # noqa: F401  (both arms: the LoRA arm's library code is not part of the training delta)
    import torch

    import metarl_llm.jobs.common as C
    import metarl_llm.jobs.ppo as T
    from metarl_llm.trainer import train

    rss_after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    cfg = compose(overrides)
    if arm == "warm":  # fill the warm-start cache, nothing else
        C.start_job(cfg, Path(out).parent / "warm")
        _, _, _, _, info = C.base_policy(cfg, torch.device("cpu"))
        out.write_text(json.dumps({"warm_start_cached": bool(info.get("warm_start/cached", False))}))
        return
    seen: dict = {}
    orig_score, orig_update = T.score_batch, T.ppo_update

    def score_batch(actor_critic, reference, *a, **kw):
        seen["reference"] = reference
        return orig_score(actor_critic, reference, *a, **kw)

    def ppo_update(model, optimizer, *a, **kw):
        stats = orig_update(model, optimizer, *a, **kw)
        if "bytes" not in seen:  # after the first update: gradients and optimiser state exist
            params = list(model.parameters())
            own = {p.data_ptr() for p in params}
            ref_params = [p for p in seen["reference"].parameters() if p.data_ptr() not in own]
            state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
            b = {
                "parameters": tensor_bytes(params),
                "trainable_parameters": tensor_bytes(p for p in params if p.requires_grad),
                "reference_copy": tensor_bytes(ref_params),
                "gradients": tensor_bytes(p.grad for p in params),
                "optimizer_state": tensor_bytes(state),
            }
            b["total"] = b["parameters"] + b["reference_copy"] + b["gradients"] + b["optimizer_state"]
            seen["bytes"] = b
            seen["num_parameters"] = sum(p.numel() for p in params)
            seen["num_trainable"] = sum(p.numel() for p in params if p.requires_grad)
        return stats

    T.score_batch, T.ppo_update = score_batch, ppo_update
    t0 = time.perf_counter()
    summary = train(cfg, out.parent / out.stem)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.write_text(
        json.dumps(
            {
                "arm": arm,
                "overrides": overrides,
                "success_start": summary["heldout_success_start"],
                "success_final": summary["heldout_success_final"],
                "tokens_per_trial_final": summary["heldout_tokens_per_trial"],
                "warm_start_cached": summary["warm_start_cached"],
                "peak_rss_bytes": peak,
                "rss_after_imports_bytes": rss_after_imports,
                "peak_rss_minus_imports_bytes": peak - rss_after_imports,
                "training_state_bytes": seen["bytes"],
                "num_parameters": seen["num_parameters"],
                "num_trainable_parameters": seen["num_trainable"],
                "wall_time_s": time.perf_counter() - t0,
                "update_tokens_per_s": summary["update_tokens_per_s"],
            },
            indent=1,
        )
    )


def run_worker(arm: str, overrides: list[str], out_root: Path, threads: int, name: str | None = None) -> dict:
    name = name or arm
    out = out_root / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", arm, "--worker-out", str(out), "--", *overrides]
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_SILENT": "true"}
    log = out_root / f"{name}.log"
    with log.open("w") as f:
        res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {res.returncode}); see {log}")
    return json.loads(out.read_text())


def mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--num-problems", type=int, default=32, help="held-out problems of each evaluation")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="algo.lr of the LoRA arm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="RL seeds (one warm start for all)")
    parser.add_argument("--out-root", default=str(ROOT / "outputs" / "bench" / "lora"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both arms")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.overrides, Path(args.worker_out))
        return

    common = [
        "warm_start.seed=0",
        f"algo.iterations={args.iterations}",
        f"eval.num_problems={args.num_problems}",
        "eval.every=0",
        "eval.extrapolation=false",
        "checkpoint_every=0",
        "logger.mode=disabled",
        "logger.progress_bar=false",
        f"threads={args.threads}",
        *args.overrides,
    ]
    arms = {"full": common + ARMS["full"], "lora": common + ARMS["lora"] + [f"algo.lr={args.lora_lr}"]}
    out_root = Path(args.out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    warm = run_worker("warm", common, out_root, args.threads)  # the shared warm start, outside the measured processes
    results = {
        arm: [run_worker(arm, ovr + [f"seed={s}"], out_root, args.threads, f"{arm}_seed{s}") for s in args.seeds]
        for arm, ovr in arms.items()
    }
    if not all(r["warm_start_cached"] for runs in results.values() for r in runs):
        raise RuntimeError("a run trained its own warm start: the arms must share the cached one")

    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lora.json").write_text(
        json.dumps(
            {
                "settings": {
                    "common_overrides": common,
                    "arm_overrides": arms,
                    "seeds": args.seeds,
                    "threads": args.threads,
                    "warm_start_was_cached": warm["warm_start_cached"],
                },
                "arms": results,
            },
            indent=1,
        )
    )
    lines = [
        "| arm | seed | trainable params | held-out success start -> final | peak RSS (MiB) | peak RSS - after imports (MiB) "
        "| params (MiB) | reference copy (MiB) | grads (MiB) | AdamW state (MiB) | params+ref+grads+optimizer (MiB) | wall (s) |",
        "|" + " --- |" * 12,
    ]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for arm, runs in results.items():
        rows = [(str(s), r) for s, r in zip(args.seeds, runs)]
        if len(runs) > 1:
            avg = {
                k: mean([r[k] for r in runs])
                for k in ("success_start", "success_final", "peak_rss_bytes", "peak_rss_minus_imports_bytes", "wall_time_s")
            }
            rows.append(("mean", {**runs[0], **avg}))
        for seed, r in rows:
            b = r["training_state_bytes"]
            lines.append(
                f"| {arm} | {seed} | {r['num_trainable_parameters']:,} of {r['num_parameters']:,} | {r['success_start']:.3f} -> "
                f"{r['success_final']:.3f} | {mib(r['peak_rss_bytes'])} | {mib(r['peak_rss_minus_imports_bytes'])} | "
                f"{mib(b['parameters'])} | {mib(b['reference_copy'])} | {mib(b['gradients'])} | {mib(b['optimizer_state'])} | "
                f"{mib(b['total'])} | {r['wall_time_s']:.0f} |"
            )
    lr_full = next((o.split("=", 1)[1] for o in arms["full"] if o.startswith("algo.lr=")), "1e-4 (default)")
    table = "\n".join(lines)
    (out_dir / "lora_table.md").write_text(
        f"planted_subseq, tiny model, one cached warm start (warm_start.seed=0), RL seeds {args.seeds}, "
        f"{args.iterations} PPO iterations, {args.num_problems} held-out problems x 4 trials at the training budget, "
        f"{args.threads} thread(s). full: algo.lr={lr_full}; lora: model.lora.r=8 (alpha 16), algo.lr={args.lora_lr}. "
        f"Memory: peak RSS of each run's process; the byte columns are the live training state after the first update.\n\n"
        f"{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
