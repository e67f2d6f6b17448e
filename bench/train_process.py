"""One ``python train.py`` in its own process, as a user runs it: what the benchmarks that compare
whole runs share (bench/adaptation.py, real_vocab.py, vocab_scale.py, warm_start_vocab.py).

:func:`train_process` runs ``train.py`` of a checkout (``root``; an older one for a before/after
comparison) with the given overrides and ``out_dir``, ``OMP_NUM_THREADS`` set, and returns its wall,
user and system seconds (and ``summary.json`` when the run wrote one). A failed run raises with
the end of its stderr; every run has a time limit. :func:`mean_ci`: the benchmarks' mean over
seeds with its 95% t-interval.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # two-sided 95% t quantiles by degrees of freedom


def mean_ci(xs) -> tuple[float, float]:
    """Mean over seeds and the half-width of its 95% t-interval (0 for one seed); None and
    non-finite entries are left out."""
    v = [float(x) for x in xs if x is not None and math.isfinite(x)]
    if len(v) < 2:
        return (sum(v) / len(v) if v else math.nan), 0.0
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return m, T95.get(len(v) - 1, 1.96) * sd / math.sqrt(len(v))


def train_process(overrides: list[str], out: Path, root: Path = ROOT, threads: int = 2, timeout_s: float = 4 * 3600) -> dict:
    """Run ``root/train.py *overrides out_dir=out``; returns ``{"wall_s", "user_s", "sys_s",
    "summary"}`` (``summary``: the run's summary.json, None if it wrote none)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "train.py", *overrides, f"out_dir={out}"],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(root)},
        timeout=timeout_s,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        raise RuntimeError(f"train.py {' '.join(overrides)} failed:\n{res.stderr[-4000:]}")
    summary_path = Path(out) / "summary.json"
    return {
        "wall_s": wall,
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
        "summary": json.loads(summary_path.read_text()) if summary_path.exists() else None,
    }
