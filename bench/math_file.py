"""Write a MATH-format JSONL file of simple problems (``problem``, ``solution`` ending in
``\\boxed{}``, no ``answer`` field), generated and seeded: real-format data without a download.

    python bench/math_file.py out.jsonl --num 400 --seed 0

Four problem forms, each with a one-sentence worked solution in MATH's style: a sum, a
difference, a product of small numbers, and a linear equation ``x + a = b``; 993 distinct
problems in all (``--num`` above that is refused). Used by
bench/real_vocab.py and the README's MATH-format command.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def record(rng: random.Random) -> dict:
    form = rng.randrange(4)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if form == 0:
        return {
            "problem": f"What is ${a}+{b}$?",
            "solution": f"Adding, ${a}+{b}={a + b}$, so the answer is $\\boxed{{{a + b}}}$.",
        }
    if form == 1:
        a, b = max(a, b), min(a, b)
        return {
            "problem": f"Compute ${a}-{b}$.",
            "solution": f"Subtracting, ${a}-{b}={a - b}$. The answer is $\\boxed{{{a - b}}}$.",
        }
    if form == 2:
        a, b = a % 9 + 2, b % 9 + 2
        return {
            "problem": f"Compute ${a}\\cdot {b}$.",
            "solution": f"We multiply: ${a}\\cdot {b}={a * b}$. The answer is $\\boxed{{{a * b}}}$.",
        }
    return {
        "problem": f"Solve $x+{a}={a + b}$ for $x$.",
        "solution": f"Subtract ${a}$ from both sides: $x={b}$. So $x=\\boxed{{{b}}}$.",
    }


def write(path: Path, num: int, seed: int) -> Path:
    rng = random.Random(seed)
    seen, rows = set(), []
    for _ in range(num * 20):
        r = record(rng)
        if r["problem"] not in seen:
            seen.add(r["problem"])
            rows.append(r)
        if len(rows) == num:
            break
    if len(rows) < num:  # the four forms hold 993 distinct problems; never write fewer than asked
        raise ValueError(
            f"math_file.write: found only {len(rows)} distinct problems in {num * 20} draws, asked for {num}; use --num {len(rows)} or less"
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--num", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(write(args.out, args.num, args.seed))


if __name__ == "__main__":
    main()
