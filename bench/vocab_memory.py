"""Peak memory of one PPO update at fixed B and T, for a small and a production vocabulary.

    python bench/vocab_memory.py                     # V = 100 and V = 151,669, B = 32, T = 128
    python bench/vocab_memory.py --root /path/to/an/older/checkout   # the same measurement of other code

Each measurement is its own process (peak resident memory, ``ru_maxrss``, is per process): a
Qwen2-architecture model at toy width (hidden 64, 2 layers, tied embeddings, float32) over a
vocabulary of V ids, its actor-critic (shared value head), AdamW, and one rollout batch of B
trials of T tokens (random ids, the second half of each trial action tokens). The process scores
the batch (policy and reference log-probs, as the trainer does) and runs one ppo_update of one
epoch and one minibatch. Reported: the resident memory after building everything (``setup``),
the peak over scoring and the update (``peak``), their difference (``update``), and the model's
parameter count. The expected difference between the vocabularies is the weights, gradients and
AdamW state of the embedding (tied to the LM head): 16 bytes x (V1 - V0) x H, plus at most one
chunk of logits; the [B, T, V] logits of a full-logit computation would add 4 B T V bytes each.
Writes bench/results/vocab_memory.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from metarl_llm.config import AlgoConfig
from metarl_llm.core.batch import RolloutBatch
from metarl_llm.models import ActorCritic, frozen_reference
from metarl_llm.rl.scoring import score_batch
from metarl_llm.rl.update import ppo_update

V, B, T, H = (int(x) for x in sys.argv[1:5])
torch.manual_seed(0)
torch.set_num_threads(2)
cfg = Qwen2Config(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=2 * H, tie_word_embeddings=True, max_position_embeddings=4096)
policy = Qwen2ForCausalLM(cfg).eval()
ac = ActorCritic(policy, "shared")
ref = frozen_reference(ac)
opt = torch.optim.AdamW(ac.parameters(), lr=1e-4)
ids = torch.randint(0, V, (B, T))
act = torch.zeros(B, T)
act[:, T // 2 :] = 1
z = torch.zeros(B, T)
batch = RolloutBatch(ids, torch.ones(B, T, dtype=torch.long), act, torch.where(act > 0, 0, -1), z, z, z, z, act * 0.1, z,
                     torch.zeros(B), torch.zeros(B, dtype=torch.long))
kb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
setup = kb()
batch = score_batch(ac, ref, batch, use_critic=True, rows=B)
algo = AlgoConfig(ppo_epochs=1, minibatch_size=B, micro_batch_tokens=0)
ppo_update(ac, opt, batch, algo, torch.Generator().manual_seed(0), use_critic=True)
print(json.dumps({"V": V, "B": B, "T": T, "H": H, "params": sum(p.numel() for p in ac.parameters()),
                  "setup_mb": setup / 1024, "peak_mb": kb() / 1024, "update_mb": (kb() - setup) / 1024}))
"""


def measure(root: Path, v: int, b: int, t: int, h: int) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(v), str(b), str(t), str(h)],
        cwd=root,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"},
        timeout=1800,
    )
    if res.returncode:
        return {"V": v, "error": res.stderr[-2000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose code is measured")
    ap.add_argument("--vocab", type=int, nargs="+", default=[100, 151669])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vocab_memory.json")
    args = ap.parse_args()
    rows = [measure(args.root, v, args.batch, args.tokens, args.hidden) for v in args.vocab]
    for r in rows:
        print(json.dumps(r))
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    old[args.label] = rows
    args.out.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
