"""Progress of a long phase (the warm start, verifier training, the SFT baselines, test-time
training, evaluation at several budgets): a bar with rate and ETA on a terminal, and a log line
every ``every_s`` seconds (and at the end) when the output is not a terminal (a job's log file, CI).
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("metarl_llm.progress")


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``with Progress(total, "warm start", unit="step") as p: ... p.update(1, loss=0.3)``.

    ``bar``: draw a tqdm bar when the output is a terminal (``logger.progress_bar``); otherwise, or
    when ``bar`` is False, one log line every ``every_s`` seconds (0: every update) and one at the
    end, each with done/total, the rate and the ETA, and the latest ``update`` values.
    ``stream``: where the bar goes and whose ``isatty`` decides (default: stderr)."""

    def __init__(self, total: int, desc: str, unit: str = "step", bar: bool = True, every_s: float = 30.0, stream=None):
        self.total, self.desc, self.unit, self.every_s = int(total), desc, unit, every_s
        self.done, self.closed = 0, False
        self.values: dict = {}
        self.start = self.last_log = time.perf_counter()
        stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.bar = tqdm(total=self.total, desc=desc, unit=unit, file=stream, dynamic_ncols=True) if bar and self.tty else None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rate(self) -> float:
        """Units per second so far."""
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """``warm start: 120/300 steps (40%), 3.2 steps/s, 0:37 elapsed, ETA 0:56, loss=0.41``."""
        rate, elapsed = self.rate(), time.perf_counter() - self.start
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = _duration((self.total - self.done) / rate) if rate > 0 and self.total else "?"
        extra = "".join(f", {k}={v:.4g}" if isinstance(v, float) else f", {k}={v}" for k, v in self.values.items())
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit}s{share}, {rate:.3g} {self.unit}s/s, "
            f"{_duration(elapsed)} elapsed, ETA {eta}{extra}"
        )

    def update(self, n: int = 1, **values) -> None:
        """``n`` more units done; ``values`` (a loss, a success rate) are shown beside the count."""
        self.done += n
        self.values.update(values)
        if self.bar is not None:
            self.bar.update(n)
            if values:
                self.bar.set_postfix(
                    {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in self.values.items()}, refresh=False
                )
            return
        now = time.perf_counter()
        if now - self.last_log >= self.every_s and self.done < self.total:
            self.last_log = now
            log.info(self.line())

    def close(self) -> None:
        """End the bar, or log the final line (once)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        else:
            log.info(self.line())
