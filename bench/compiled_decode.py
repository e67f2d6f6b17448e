"""Does compiled decoding pay on this machine? (issue 18, part 3)

    python bench/compiled_decode.py                    # tiny model and the production vocabulary
    python bench/compiled_decode.py --models tiny --reps 5

The same greedy decode of R rows (a P-token prompt, then S one-token steps) two ways:

- ``eager``: the project's decode path, :class:`metarl_llm.rollout.decode.DecodeBatch` (the
  in-place growing KV cache; every step a plain forward of the model);
- ``compiled``: ``torch.compile(model.forward)`` over transformers' ``StaticCache`` (fixed
  shapes every step: the [R, C] mask and [R, H, C, D] cache of capacity C, the step's column
  given as ``cache_position``), the form transformers itself compiles for generation.

Both take the argmax, so their tokens must be equal (checked). Reported per model: the
compile time (the first compiled call's extra seconds over a warm one), the eager and
compiled seconds per decode (median of ``--reps``, alternating), and the number of decodes
after which compiling has paid for itself (infinite when compiled is not faster). Results:
bench/results/compiled_decode.json. A GPU run (``--device cuda``) would time CUDA graphs
(``mode="reduce-overhead"``) the same way; none was available here.
"""

from __future__ import annotations

import argparse
import functools
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


def load(which: str, tmp: Path):
    from metarl_llm.config import ModelConfig
    from metarl_llm.models import load_policy

    if which == "tiny":
        return load_policy(ModelConfig(), 0)
    from tests.support import build_hub_dir  # Qwen3's real tokenizer files, toy width (as bench/vocab_scale.py)

    hub = build_hub_dir(tmp / "hub", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    return load_policy(ModelConfig(name_or_path=str(hub)), 0)


@torch.no_grad()
def eager_decode(model, prompt: torch.Tensor, steps: int, capacity: int) -> torch.Tensor:
    """Greedy decode of ``prompt`` [R, P] for ``steps`` tokens on the project's DecodeBatch; [R, steps]."""
    from metarl_llm.rollout.decode import DecodeBatch

    b = DecodeBatch(model, "cpu", prompt.shape[0], capacity)
    logits = b.feed(prompt.tolist(), 0)
    toks = []
    for _ in range(steps):
        t = logits.argmax(-1)
        toks.append(t)
        logits = b.feed(t[:, None], 0)
    return torch.stack(toks, 1)


@torch.no_grad()
def compiled_decode(model, step, prompt: torch.Tensor, steps: int, capacity: int) -> torch.Tensor:
    """The same decode with ``step`` (the compiled forward) over a StaticCache of ``capacity``; [R, steps]."""
    from transformers.cache_utils import StaticCache

    R, P = prompt.shape
    cache = StaticCache(config=model.config, max_cache_len=capacity)
    mask = torch.zeros(R, capacity, dtype=torch.long)
    mask[:, :P] = 1
    o = model(input_ids=prompt, attention_mask=mask[:, :P], position_ids=torch.arange(P)[None].expand(R, P),
              past_key_values=cache, cache_position=torch.arange(P), use_cache=True, logits_to_keep=1)  # fmt: skip
    logits, pos, toks = o.logits[:, -1], torch.full((R, 1), P), []
    for i in range(steps):
        t = logits.argmax(-1)
        toks.append(t)
        mask[:, P + i] = 1
        o = step(input_ids=t[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                 cache_position=torch.tensor([P + i]), use_cache=True, logits_to_keep=1)  # fmt: skip
        logits, pos = o.logits[:, -1], pos + 1
    return torch.stack(toks, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "prod_vocab"], choices=["tiny", "prod_vocab"])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    R, P, S = args.rows, args.prompt, args.steps
    C = P + S + 8
    out = {"settings": vars(args), "torch": torch.__version__, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for which in args.models:
            model, _ = load(which, Path(tmp))
            model.eval()
            V = model.config.vocab_size
            prompt = torch.randint(3, min(V, 90), (R, P), generator=torch.Generator().manual_seed(0))

            eager = functools.partial(eager_decode, model, prompt, S, C)
            compiled = functools.partial(compiled_decode, model, torch.compile(model.forward, dynamic=False), prompt, S, C)
            eager()  # warm-up
            t0 = time.perf_counter()
            compiled()
            first = time.perf_counter() - t0
            te, tc, same = [], [], True
            for _ in range(args.reps):
                t0 = time.perf_counter()
                a = eager()
                te.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                c = compiled()
                tc.append(time.perf_counter() - t0)
                same &= bool((a == c).all())
            e, c_ = statistics.median(te), statistics.median(tc)
            res = {
                "params": sum(p.numel() for p in model.parameters()),
                "vocab": V,
                "eager_s": te,
                "compiled_s": tc,
                "eager_median_s": e,
                "compiled_median_s": c_,
                "speedup": e / c_,
                "compile_s": first - c_,
                "decodes_to_pay_off": (first - c_) / (e - c_) if e > c_ else float("inf"),
                "same_tokens": same,
            }
            out["models"][which] = res
            print(which, json.dumps(res), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compiled_decode.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
