"""Does compiled decoding pay on this machine? (issue 18, part 3)

    python bench/compiled_decode.py                    # tiny model and the production vocabulary
    python bench/compiled_decode.py --models tiny --reps 5

Two measurements per model, each eager against ``rollout.compile_decode=true`` (torch.compile,
inductor backend, of the one-token decode step over a static KV cache:
:class:`metarl_llm.rollout.decode.DecodeBatch`), in one process, alternating, ``--reps`` each:

- ``decode``: a greedy decode of R rows (a P-token prompt, then S one-token steps) through
  :func:`metarl_llm.rollout.decode.decode`; the tokens of the two arms must be equal (checked).
- ``rollout``: one PPO iteration's trials as the trainer plays them: ``algo.problems_per_iter x
  algo.group_size`` (8 x 8) trials of the model's default environment at the default budget
  through the cached engine (planted_subseq for the tiny model; math for the production
  vocabulary), rows leaving the batch as they finish; the trials of the two arms must agree.

Reported: the compile time (the first compiled call's extra seconds over a warm one; in the
rollout that includes the recompile when the batch size first changes), the median seconds of
each arm, the speed-up, and how many decodes (rollouts) pay the compile back (infinite when
compiled is not faster). Results: bench/results/compiled_decode.json. A GPU run
(``--device cuda``) times the same on the GPU; none was available here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def load(which: str, tmp: Path, device: str):
    """(model, codec, env name) of a model: the default tiny one, or a Qwen2 toy-width model with
    Qwen3's real vocabulary in a hub-style directory (as bench/vocab_scale.py)."""
    from metarl_llm.config import ModelConfig
    from metarl_llm.core.trial import StreamCodec
    from metarl_llm.models import load_policy

    if which == "tiny":
        model, tok = load_policy(ModelConfig(), 0)
        env = "planted_subseq"
    else:
        from tests.support import build_hub_dir

        hub = build_hub_dir(tmp / "hub", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
        model, tok = load_policy(ModelConfig(name_or_path=str(hub)), 0)
        env = "math"
    return model.to(device).eval(), StreamCodec(tok, "\n", "Answer:"), env


@torch.no_grad()
def greedy_decode(model, prompt: torch.Tensor, steps: int, backend: str | None) -> torch.Tensor:
    """Greedy decode of ``prompt`` [R, P] for ``steps`` tokens; [R, steps]."""
    from metarl_llm.rollout.decode import DecodeBatch, decode
    from metarl_llm.rollout.sampling import draw_rule

    R, P = prompt.shape
    b = DecodeBatch(model, prompt.device, R, P + steps, compile_backend=backend)
    logits = b.feed(prompt.tolist(), 0)
    never = torch.tensor([-1], device=prompt.device)
    out = decode(b, logits, torch.full((R,), steps), never, 0, draw_rule(greedy=True))
    return out.tokens


def rollout(model, codec, env: str, backend: str | None, n_problems: int = 8, group: int = 8):
    """One PPO iteration's trials (n_problems x group) through the cached engine, default budget."""
    import gymnasium

    import envs
    from metarl_llm.config import BudgetConfig
    from metarl_llm.rollout.cached import CachedEngine
    from metarl_llm.rollout.engine import run_trials

    budget = BudgetConfig()
    engine = CachedEngine()
    engine.compile_backend = backend
    n = n_problems * group
    env_list = [gymnasium.make(envs.ENV_IDS[env], max_episodes=budget.max_episodes) for _ in range(n)]
    resets = [{"options": {"index": i // group}} for i in range(n)]
    groups = [i // group for i in range(n)]
    return run_trials(model, codec, env_list, resets, groups, budget, torch.Generator().manual_seed(0), engine=engine)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def compare(eager_fn, compiled_fn, same, reps: int) -> dict:
    """Warm eager once, time the first compiled call, then alternate ``reps`` of each."""
    ref, _ = timed(eager_fn)
    got, first = timed(compiled_fn)
    agree = same(ref, got)
    te, tc = [], []
    for _ in range(reps):
        a, t = timed(eager_fn)
        te.append(t)
        c, t = timed(compiled_fn)
        tc.append(t)
        agree = agree and same(a, c)
    e, c_ = statistics.median(te), statistics.median(tc)
    return {
        "eager_s": te,
        "compiled_s": tc,
        "eager_median_s": e,
        "compiled_median_s": c_,
        "speedup": e / c_,
        "compile_s": first - c_,
        "calls_to_pay_off": (first - c_) / (e - c_) if e > c_ else float("inf"),
        "same_output": agree,
    }


def same_trials(a, b) -> bool:
    return [t.ids for t in a] == [t.ids for t in b]


def measure(which: str, tmp: Path, args) -> dict:
    """Both measurements for one model (module docstring)."""
    torch._dynamo.reset()  # each model compiles from scratch
    model, codec, env = load(which, tmp, args.device)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, min(V, 90), (args.rows, args.prompt), generator=g).to(args.device)
    res = {"params": sum(p.numel() for p in model.parameters()), "vocab": V, "env": env}
    res["decode"] = compare(
        lambda: greedy_decode(model, prompt, args.steps, None),
        lambda: greedy_decode(model, prompt, args.steps, "inductor"),
        lambda a, b: bool((a == b).all()),
        args.reps,
    )
    print(which, "decode", json.dumps(res["decode"]), flush=True)
    trials = rollout(model, codec, env, None)
    res["rollout_tokens"] = sum(len(t.ids) for t in trials)
    res["rollout"] = compare(
        lambda: rollout(model, codec, env, None),
        lambda: rollout(model, codec, env, "inductor"),
        same_trials,
        args.reps,
    )
    print(which, "rollout", json.dumps(res["rollout"]), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "prod_vocab"], choices=["tiny", "prod_vocab"])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"settings": vars(args), "torch": torch.__version__, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for which in args.models:
            out["models"][which] = measure(which, Path(tmp), args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compiled_decode.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
