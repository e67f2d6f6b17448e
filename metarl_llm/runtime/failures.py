"""Failure records: what a failed iteration needs to be reproduced, written to ``run_dir/failures/``."""

from __future__ import annotations

import contextlib
import json
import logging
import traceback
from pathlib import Path
from typing import Iterator

import torch

from envs.base import EnvironmentFailure
from metarl_llm.core.batch import RolloutBatch

log = logging.getLogger(__name__)


def save_failure(run_dir: Path, iteration: int, error: BaseException, batch: RolloutBatch | None = None) -> Path:
    """Write what a failure needs to be reproduced into ``run_dir/failures/``: a JSON
    record (iteration, error, traceback, and for an environment failure the problem id
    and the offending text) and, when given, the rollout batch (``torch.load``-able).
    Returns the JSON record's path."""

    out = Path(run_dir) / "failures"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"iter_{iteration:06d}_{type(error).__name__}"
    record = {
        "iteration": iteration,
        "error": f"{type(error).__name__}: {error}",
        "traceback": "".join(traceback.format_exception(error)),
    }
    if isinstance(error, EnvironmentFailure):
        record.update(problem_id=error.problem_id, text=error.text, episode=error.episode, cause=error.cause_repr)
    if batch is not None:
        torch.save(batch._asdict(), out / f"{stem}_batch.pt")
        record["batch"] = str(out / f"{stem}_batch.pt")
    path = out / f"{stem}.json"
    path.write_text(json.dumps(record, indent=2))
    log.error("iteration %d failed (%s); saved %s", iteration, record["error"][:200], path)
    return path


@contextlib.contextmanager
def failure_record(run_dir: Path, iteration: int, batch: RolloutBatch | None = None) -> Iterator[None]:
    """Record a failure of the block it guards in ``run_dir/failures/`` and re-raise it, saying where:

    - an :class:`~envs.base.EnvironmentFailure` (a grader or environment error): the record
      holds the problem id and the offending text; the error's message gets the record's path;
    - with ``batch`` given, a ``FloatingPointError`` (a non-finite reward, loss or gradient):
      the record and the batch are saved, and a FloatingPointError naming the iteration and
      the batch's file is raised from it.
    """
    try:
        yield
    except EnvironmentFailure as e:
        e.args = (f"{e.args[0]}; the problem id and text are saved in {save_failure(run_dir, iteration, e)}",)
        raise
    except FloatingPointError as e:
        if batch is None:
            raise
        path = save_failure(run_dir, iteration, e, batch)
        raise FloatingPointError(f"iteration {iteration}: {e}; the batch is saved in {path}") from e
