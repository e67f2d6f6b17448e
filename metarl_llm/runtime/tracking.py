"""Run outputs: Weights & Biases (offline by default) and the same scalars in metrics.jsonl."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from metarl_llm.config import LoggerConfig, LoggerMode

log = logging.getLogger(__name__)


MODES = tuple(m.value for m in LoggerMode)  # ("offline", "online", "disabled")


def read_summary(run_dir: Path) -> dict | None:
    """``<run_dir>/summary.json`` when it is complete (a JSON object; :meth:`Tracker.finish`
    writes it atomically, as the last output of a run), else None."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return summary if isinstance(summary, dict) else None


class Tracker:
    """Logs scalars to ``<run_dir>/metrics.jsonl`` and W&B; tables and images to W&B.

    ``logger.mode=offline`` (default) needs no network: the run lands in
    ``<run_dir>/wandb/`` and can be uploaded later with ``wandb sync``.
    """

    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        config: dict,
        name: str,
        resume_step: int | None = None,
        run_id: str | None = None,
        resume_rows: int | None = None,
    ):
        """``resume_step``: a resumed run continues after that step: rows of metrics.jsonl
        logged after it (by the run that was interrupted) are dropped, and the W&B run
        ``run_id`` is continued instead of starting a new one. ``resume_rows``: the number
        of rows metrics.jsonl held when the checkpoint resumed from was saved (its
        ``metrics_rows``, :attr:`rows` then); when given, exactly those first rows are kept,
        which also drops rows logged after the checkpoint at its own step (the final
        evaluation's, logged at the last iteration after the last checkpoint). Without it
        (checkpoints written before ``metrics_rows`` existed) rows up to ``resume_step`` are kept."""
        if cfg.mode not in MODES:
            raise ValueError(f"logger.mode={cfg.mode!r}; expected one of {MODES}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill (only ever the last one)
                continue
            if resume_rows is not None:
                if len(kept) == resume_rows:
                    break
            elif resume_step is not None and row.get("iteration", 0) > resume_step:
                continue
            kept.append(line)
        if resume_rows is not None and len(kept) < resume_rows:
            log.warning(
                "resume: metrics.jsonl has %d rows, its checkpoint was saved after %d; keeping them all", len(kept), resume_rows
            )
        if len(kept) != len(lines):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            tmp.replace(path)
        self.rows = len(kept)  # the rows of metrics.jsonl (a checkpoint records them as metrics_rows)
        self._jsonl = open(path, "a", buffering=1)
        self._wandb = None
        if cfg.mode != "disabled":
            import wandb  # deferred: start-up cost (wandb loads only when a W&B run is made)

            self._wandb = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                group=cfg.group,
                tags=list(cfg.tags),
                name=name,
                dir=str(self.run_dir),
                mode=str(cfg.mode),  # a plain string (cfg.mode may be a LoggerMode)
                config=config,
                settings=wandb.Settings(console="off", silent=True),
                **({"id": run_id, "resume": "allow"} if run_id else {}),
            )

    @property
    def wandb_run(self):
        return self._wandb

    @property
    def run_id(self) -> str | None:
        """The W&B run id (what a resumed run continues), None without W&B."""
        return self._wandb.id if self._wandb is not None else None

    def log(self, metrics: dict, step: int) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"iteration": step, **clean}) + "\n")
        self.rows += 1
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        if self._wandb is not None:
            import wandb  # deferred: start-up cost (wandb loads only when a W&B run is made)

            self._wandb.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def image(self, key: str, path: Path, step: int) -> None:
        if self._wandb is not None:
            import wandb  # deferred: start-up cost (wandb loads only when a W&B run is made)

            self._wandb.log({key: wandb.Image(str(path))}, step=step)

    def finish(self, summary: dict) -> None:
        """Write summary.json (atomically: a complete summary.json marks a finished run, see
        :func:`read_summary`), close metrics.jsonl and finish the W&B run."""
        path = self.run_dir / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
        os.replace(tmp, path)
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.summary.update(summary)
            self._wandb.finish()


class NullTracker:
    """The tracker of a non-main process of a multi-process launch: writes nothing."""

    wandb_run = None
    run_id = None
    rows = 0

    def log(self, metrics: dict, step: int) -> None:
        pass

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        pass

    def image(self, key: str, path: Path, step: int) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass
