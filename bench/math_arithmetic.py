"""Where the 993-record MATH-format run fails: copying the operands, or the arithmetic?

    python bench/math_arithmetic.py                     # about 19 minutes on 2 cores
    python bench/math_arithmetic.py --parse-only FILE   # re-read a transcripts file

Runs bench/real_vocab.py's 993-record configuration (the Qwen2 toy model, hidden 128 x 4
layers over Qwen3's vocabulary; the same warm start, seed and held-out set) for one PPO
iteration, with every held-out trial's transcript logged (``logger.num_transcripts=256``), and
reads the transcripts. Each bench/math_file.py problem has one worked equation in its solution
(``$a+b=c$``, ``$a-b=c$``, ``$a\\cdot b=c$``, or ``Subtract $a$ from both sides: $x=c$``); per
trial it finds the first such equation of the problem's form anywhere in the policy's episodes
and counts:

- ``writes_equation``: trials that write one;
- ``operands_right``: of those, the operands are the problem's (``a`` and ``b``; ``a`` for
  the linear equation);
- ``result_right_given_operands``: of those, ``c`` is the right result.

Results: bench/results/math_arithmetic.json (the counts, overall and by problem form) and the
transcripts, bench/results/math_arithmetic_transcripts.txt. Nothing is graded here: the
trials' outcomes are the environment's.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FORMS = {  # problem form: (prompt pattern, equation pattern in the policy's text, result of the operands)
    "a+b": (r"What is \$(\d+)\+(\d+)\$\?", r"\$(\d+)\+(\d+)=(-?\d+)\$", lambda a, b: a + b),
    "a-b": (r"Compute \$(\d+)-(\d+)\$\.", r"\$(\d+)-(\d+)=(-?\d+)\$", lambda a, b: a - b),
    "a*b": (r"Compute \$(\d+)\\cdot (\d+)\$\.", r"\$(\d+)\\cdot (\d+)=(-?\d+)\$", lambda a, b: a * b),
    "x+a=c": (r"Solve \$x\+(\d+)=(\d+)\$ for \$x\$\.", r"Subtract \$(\d+)\$ from both sides: \$x=(-?\d+)\$", None),
}


def parse(text: str) -> dict:
    """The counts of the module docstring from a transcripts file (``=== <problem>: outcome ...``
    blocks with ``[prompt]`` and ``[episode ...]`` sections)."""
    blocks = text.split("\n=== ")
    counts = {f: dict(trials=0, writes_equation=0, operands_right=0, result_right_given_operands=0) for f in FORMS}
    successes = 0
    for block in blocks:
        head, sep, rest = block.partition("[prompt]")
        if not sep:
            continue
        successes += ": outcome 1" in head
        prompt = re.search(r"user\n(.*?)\n", rest).group(1)
        body = rest.split("[episode", 1)[1] if "[episode" in rest else ""
        form, m = next(((f, m) for f, spec in FORMS.items() if (m := re.match(spec[0], prompt))), (None, None))
        if form is None:
            raise ValueError(f"a prompt of no known form: {prompt!r}")
        _, eq_re, result = FORMS[form]
        c = counts[form]
        c["trials"] += 1
        w = re.search(eq_re, body)
        if not w:
            continue
        c["writes_equation"] += 1
        a, b = int(m.group(1)), int(m.group(2))
        if result is None:  # x + a = b: the operand is a, the result b - a
            ok, right = int(w.group(1)) == a, int(w.group(2)) == b - a
        else:
            ok, right = (int(w.group(1)), int(w.group(2))) == (a, b), int(w.group(3)) == result(a, b)
        c["operands_right"] += ok
        c["result_right_given_operands"] += ok and right
    total = {k: sum(c[k] for c in counts.values()) for k in next(iter(counts.values()))}
    return {"all": total, "by_form": counts, "successes": successes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parse-only", type=Path, help="read this transcripts file; run nothing")
    args = ap.parse_args()
    if args.parse_only:
        print(json.dumps(parse(args.parse_only.read_text()), indent=1))
        return
    sys.path.insert(0, str(HERE))
    import real_vocab
    from math_file import write as write_math_file
    from train_process import train_process

    # real_vocab.py's 993-record row, as bench/results/README.md gives its command
    row = ["--data", "math_file", "--math-records", "993", "--eval-problems", "256"]
    args = real_vocab.parser().parse_args(row + ["--hidden", "128", "--layers", "4", "--intermediate", "512"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hub = real_vocab.build_model(args, tmp / "toy-qwen3-vocab")
        data = f"env.dataset={write_math_file(tmp / 'math.jsonl', args.math_records, 0)}"
        base = real_vocab.common(args, transcripts=256) + real_vocab.warm_overrides(args, tmp / "ws")
        extra = [f"model.name_or_path={hub}", data, "algo.iterations=1"]
        res = train_process(base + extra, tmp / "run")
        [transcripts] = (tmp / "run").glob("transcripts_*.txt")
        shutil.copy(transcripts, RESULTS / "math_arithmetic_transcripts.txt")
        out = {
            **parse(transcripts.read_text()),
            "heldout_success_warm_started": res["summary"]["heldout_success_start"],
            "heldout_success_after_one_iteration": res["summary"]["heldout_success_final"],
            "wall_s": res["wall_s"],
        }
    (RESULTS / "math_arithmetic.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
