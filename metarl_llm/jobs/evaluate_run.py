"""``python -m metarl_llm.evaluate``: evaluate a saved checkpoint of a training run on held-out
problems at several budgets, write eval_<checkpoint>.json and its plots, and compare two runs.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from metarl_llm.config import (
    AlgoConfig,
    BonusConfig,
    BudgetConfig,
    EnvConfig,
    LoggerConfig,
    ModelConfig,
    TrainConfig,
)
from metarl_llm.evaluation.curves import (
    budget_label,
    default_efficiency_level,
    finite_or_none,
    token_efficiency_ratio,
    tokens_to_success,
)
from metarl_llm.evaluation.heldout import clamp_num_problems, evaluate_and_report
from metarl_llm.jobs.common import stream_codec, validate
from metarl_llm.models import load_policy, set_temperature
from metarl_llm.runtime.setup import heldout_env_maker, quiet_libraries, resolve_device
from metarl_llm.runtime.tracking import Tracker

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ command line

USAGE = """\
usage: python -m metarl_llm.evaluate run_dir=PATH [checkpoint=latest|iter_000060] [compare=OTHER_RUN_DIR] [KEY=VALUE ...]

Evaluates a checkpoint of a training run on held-out problems at the budget scales
eval.budget_scales (success-vs-tokens curves, regret, tokens to success, pass@k, maj@k)
and writes eval_<checkpoint>.json and PNGs into the run directory.

  run_dir=PATH         a directory written by train.py (config.yaml, checkpoints/)
  checkpoint=NAME      latest (default: the one checkpoints/latest names) or a name such as iter_000060
  compare=OTHER_RUN    also report the token-efficiency ratio against OTHER_RUN's
                       evaluation of its latest checkpoint (eval_<its checkpoint>.json)
  KEY=VALUE            Hydra-style override of the run's config, e.g.
                       eval.num_problems=32 eval.samples_per_problem=8 budget.max_episodes=4
                       eval.budget_scales=[1,2] eval.extrapolation=false logger.mode=disabled
"""
CLI_KEYS = ("run_dir", "checkpoint", "compare")


def parse_command_line(argv: Sequence[str]) -> tuple[dict, list]:
    """Split ``argv`` into the command's own options (run_dir, checkpoint, compare) and
    the parsed Hydra overrides of the run's config."""
    parsed = _parse_overrides(argv)
    options = {"run_dir": None, "checkpoint": "latest", "compare": None}
    overrides = []
    for o in parsed:
        if o.key_or_group in CLI_KEYS:
            options[o.key_or_group] = None if o.value() is None else str(o.value())
        else:
            overrides.append(o)
    if options["run_dir"] is None:
        raise ValueError("run_dir=PATH is required (a directory written by train.py)\n" + USAGE)
    return options, overrides


def _parse_overrides(args: Sequence[str]) -> list:
    """Hydra's parse of KEY=VALUE strings; a malformed one is a ValueError naming it."""

    try:
        return OverridesParser.create().parse_overrides(list(args))
    except HydraException as e:
        raise ValueError(f"cannot parse the command line {list(args)}: {e}") from e


def _env_schema(saved_env) -> type[EnvConfig]:
    """The EnvConfig subclass that holds every key of a saved env config (the one whose
    default id, then name, matches it when several do)."""

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    keys = set(saved_env.keys())
    fits = [c for c in subclasses(EnvConfig) if keys <= {f.name for f in fields(c)}]
    if not fits:
        raise ValueError(f"config.yaml: no env schema in metarl_llm.config has the keys {sorted(keys)}")
    return max(fits, key=lambda c: (c.id == saved_env.get("id"), c.name == saved_env.get("name")))


def load_run_config(run_dir: Path, overrides: Sequence = ()) -> TrainConfig:
    """The run's ``config.yaml`` as a validated :class:`TrainConfig`, with ``overrides``
    (Hydra override strings or parsed overrides) applied: a misspelt key or a value of
    the wrong type fails, naming the key."""

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"run_dir={run_dir}: {path} not found (is it a run directory written by train.py?)")
    saved = OmegaConf.load(path)
    env_cls = _env_schema(saved.env)
    schema = OmegaConf.structured(
        TrainConfig(
            env=env_cls(),
            budget=BudgetConfig(),
            model=ModelConfig(),
            algo=AlgoConfig(),
            bonus=BonusConfig(),
            logger=LoggerConfig(),
        )
    )
    cfg = OmegaConf.merge(schema, saved)
    strings = [o for o in overrides if isinstance(o, str)]
    parsed = [o for o in overrides if not isinstance(o, str)] + _parse_overrides(strings)
    for o in parsed:
        if o.is_sweep_override() or o.is_delete():
            raise ValueError(f"override {o.input_line!r}: evaluation takes plain KEY=VALUE overrides (no sweeps, no deletions)")
        value = o.value()
        try:
            OmegaConf.update(cfg, o.key_or_group, value, merge=isinstance(value, dict))
        except Exception as e:  # omegaconf's errors name the full key; say which override caused it
            raise ValueError(f"override {o.input_line!r}: {e}") from e
    return OmegaConf.to_object(cfg)


def checkpoint_name(run_dir: Path, checkpoint: str = "latest") -> str:
    """``checkpoint``, or the checkpoint ``checkpoints/latest`` names when it is "latest"."""
    if checkpoint != "latest":
        return checkpoint
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(f"checkpoint=latest: {pointer} not found (no checkpoint saved in run_dir={run_dir})")
    return pointer.read_text().strip()


def checkpoint_policy_dir(run_dir: Path, checkpoint: str) -> Path:
    """``run_dir/checkpoints/<checkpoint>/policy`` (model and tokenizer), which must exist."""
    root = Path(run_dir) / "checkpoints"
    policy = root / checkpoint / "policy"
    if not policy.is_dir():
        available = sorted(p.name for p in root.glob("iter_*")) if root.is_dir() else []
        raise FileNotFoundError(f"checkpoint={checkpoint!r}: {policy} not found; checkpoints in {root}: {available}")
    return policy


def evaluate_run(
    run_dir: str | Path, checkpoint: str = "latest", overrides: Sequence = (), compare: str | Path | None = None
) -> dict:
    """Evaluate a saved checkpoint of a training run, as the training run's final
    evaluation does (same function, same seeds). Writes ``eval_<checkpoint>.json`` and
    the PNGs into ``run_dir``; logs to W&B per ``logger.mode`` (offline by default) in
    ``run_dir/eval/<checkpoint>/``, tagged ``eval``. Returns the report (with
    ``compare`` added when asked)."""
    # The trainer imports this module, so its helpers are imported here, at call time.

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir={run_dir} does not exist")
    cfg = load_run_config(run_dir, overrides)
    name = checkpoint_name(run_dir, checkpoint)
    policy_dir = checkpoint_policy_dir(run_dir, name)
    if compare is not None:
        if not Path(compare).is_dir():
            raise FileNotFoundError(f"compare={compare} does not exist")
        try:  # before the evaluation: fail early when it is missing
            other = load_eval_report(Path(compare))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"compare={compare}: {e}") from e
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    quiet_libraries()
    device = resolve_device(cfg.device)
    model, tokenizer = load_policy(cfg.model, cfg.seed, str(policy_dir))
    set_temperature(model, cfg.model.temperature)  # the policy the run trained (a hook is not saved with the weights)
    model.to(device)
    codec = stream_codec(cfg, tokenizer)
    make_env = heldout_env_maker(cfg)
    clamp_num_problems(cfg.eval, make_env(cfg.budget).unwrapped.num_problems)

    logger = replace(cfg.logger, tags=[*cfg.logger.tags, "eval"])
    tracker = Tracker(logger, run_dir / "eval" / name, cfg.to_container(), f"{run_dir.name}/eval_{name}")
    step = int(name.split("_")[-1]) if name.split("_")[-1].isdigit() else 0
    _, figures, report = evaluate_and_report(model, codec, cfg, make_env, run_dir, name, tracker, step)
    if compare is not None:
        report["compare"] = compare_reports(report, other)
        report["compare"]["run_b"] = str(compare)
        (run_dir / f"eval_{name}.json").write_text(json.dumps(report, indent=1))
    tracker.finish({**figures, "checkpoint": name, **({"compare": report["compare"]} if compare is not None else {})})
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry: parse, evaluate, print a table (and the comparison)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return {}
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    options, overrides = parse_command_line(argv)
    report = evaluate_run(options["run_dir"], options["checkpoint"], overrides, options["compare"])
    print(f"{options['run_dir']}  checkpoint {report['checkpoint']}")
    print(format_table(report))
    if "compare" in report:
        print(f"token efficiency vs {options['compare']} (tokens of the other run / tokens of this run at the level):")
        for label, c in report["compare"]["by_budget"].items():
            print(f"  {label}x: level {c['level']:.3f}: {c['tokens_a']} vs {c['tokens_b']} tokens, ratio {c['ratio']}")
    return report


def cli() -> None:
    """``python -m metarl_llm.evaluate``: :func:`main`, with a missing file or a bad option
    reported on one line and exit status 2."""
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def load_eval_report(run_dir: Path, checkpoint: str = "latest") -> dict:
    """``eval_<checkpoint>.json`` of a run (written by its training or by this command)."""
    name = checkpoint_name(run_dir, checkpoint)
    path = Path(run_dir) / f"eval_{name}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: evaluate that run first (python -m metarl_llm.evaluate run_dir={run_dir} checkpoint={name})"
        )
    return json.loads(path.read_text())


def compare_reports(report_a: dict, report_b: dict, level: float | None = None) -> dict:
    """Token efficiency of a against b at every budget scale both reports hold: per scale
    ``level`` (default :func:`default_efficiency_level` of the two curves), ``tokens_a``,
    ``tokens_b`` (None: not reached) and ``ratio`` = tokens_b / tokens_a (> 1: a needs
    fewer tokens; None: undefined, or infinite because only a reaches it at t = 0)."""
    by_budget = {}
    for label, a in report_a["budgets"].items():
        if label not in report_b["budgets"]:
            continue
        sa, sb = np.asarray(a["curve"]), np.asarray(report_b["budgets"][label]["curve"])
        lvl = default_efficiency_level(sa, sb) if level is None else level
        by_budget[label] = {
            "level": lvl,
            "tokens_a": tokens_to_success(sa, lvl),
            "tokens_b": tokens_to_success(sb, lvl),
            "ratio": finite_or_none(token_efficiency_ratio(sa, sb, lvl)),
        }
    return {"token_efficiency_ratio": by_budget.get(budget_label(1.0), {}).get("ratio"), "by_budget": by_budget}


def compare_runs(
    run_a: Path, run_b: Path, checkpoint_a: str = "latest", checkpoint_b: str = "latest", level: float | None = None
) -> dict:
    """:func:`compare_reports` of two evaluated runs (their ``eval_<checkpoint>.json``);
    for bench code."""
    out = compare_reports(load_eval_report(run_a, checkpoint_a), load_eval_report(run_b, checkpoint_b), level)
    return {"run_a": str(run_a), "run_b": str(run_b), **out}


def format_table(report: dict) -> str:
    """A short text table of a report: one row per budget scale."""
    k = report["eval"]["samples_per_problem"]
    head = f"{'budget':>7} {'episodes':>8} {'C':>5} {'success':>8} {f'pass@{k}':>7} {f'maj@{k}':>6} {'regret':>7} {'t_to_success':>12} {'at level':>8} {'tok/trial':>9}"
    lines = [head]
    for label, b in report["budgets"].items():
        m = b["metrics"]
        t = m["tokens_to_success"]
        lines.append(
            f"{label + 'x':>7} {b['budget']['max_episodes']:>8} {b['budget_tokens']:>5} {m['success']:>8.3f} "
            f"{m[f'pass@{k}']:>7.3f} {m[f'maj@{k}']:>6.3f} {m['regret']:>7.3f} {'-' if t is None else int(t):>12} "
            f"{m['tokens_to_success_level']:>8.3f} {m['tokens_per_trial']:>9.1f}"
        )
    return "\n".join(lines)
