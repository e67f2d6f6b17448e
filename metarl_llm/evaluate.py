"""``python -m metarl_llm.evaluate run_dir=PATH [checkpoint=...] [compare=...] [KEY=VALUE ...]``:
evaluate a saved checkpoint of a training run (:mod:`metarl_llm.jobs.evaluate_run`; the
measures are defined in :mod:`metarl_llm.evaluation.heldout`)."""

from __future__ import annotations

from metarl_llm.jobs.evaluate_run import USAGE, cli, evaluate_run, main

__all__ = ["USAGE", "cli", "evaluate_run", "main"]

if __name__ == "__main__":
    cli()
