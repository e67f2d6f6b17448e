"""Any reasoning-gym task as a trial environment.

reasoning-gym's scorers are run in the grading worker (:mod:`envs.grading`), never in
this process: several of them ``eval`` the answer or hand it to sympy's
``parse_expr`` (n_queens, spiral_matrix, countdown, puzzle24, ...). Answers that look
like code are rejected before they reach a scorer, and the worker bounds the time and
memory of the rest.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from envs.base import SPLITS, EpisodicTextEnv, Problem, split_of
from envs.grading import MAX_ANSWER_CHARS, looks_like_code, parse_number, passes_guards, score_reasoning_gym


def _plain(value: Any) -> Any:
    """Plain dicts and lists from any mappings and sequences (e.g. OmegaConf containers from Hydra)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _registry() -> dict:
    from reasoning_gym.factory import (
        DATASETS,  # deferred: start-up cost (reasoning_gym loads only for the environments that use it)
    )

    return DATASETS


@functools.lru_cache(maxsize=32)
def _items(task: str, config_json: str, seed: int, size: int, test_fraction: float) -> dict[str, tuple[dict, ...]]:
    """``size`` items of ``task`` generated from ``seed``, deduplicated by question, split by its hash."""
    import reasoning_gym  # deferred: start-up cost (reasoning_gym loads only for the environments that use it)

    dataset = reasoning_gym.create_dataset(task, seed=seed, size=size, **json.loads(config_json))
    seen: set[str] = set()
    pools: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for i in range(size):
        item = dataset[i]
        if item["question"] in seen:
            continue
        seen.add(item["question"])
        pools[split_of(item["question"], test_fraction)].append({"index": i, "entry": item})
    return {s: tuple(p) for s, p in pools.items()}


class ReasoningGymEnv(EpisodicTextEnv):
    """One reasoning-gym task (``chain_sum``, ``countdown``, ``arc_1d``, ...) as trials.

    A Gymnasium episode (reset -> terminated) is one **trial**; one ``step`` consumes
    one **episode** (an attempt, a check, the final answer).

    Example trial (``task="chain_sum"``, prompt then episodes, one per line)::

        Prompt:    "State the final answer to the following arithmetic problem: 4 - 1 - 7 =\\n"
        Episode 0: "-3"                (a failed attempt; reward 0)
        Episode 1: "Answer: -4"        (commits "-4"; reward 1.0)

    +--------------------+---------------------------------------------------------------+
    | Observation space  | ``UnicodeText``: the task's question + ``episode_delimiter``; |
    |                    | then ``""`` per episode, ``"[correct]"``/``"[wrong]"`` with   |
    |                    | ``feedback=True``, or ``forced_answer_text``                  |
    | Action space       | ``UnicodeText``: the text of one episode (no delimiter)       |
    | Reward             | 0 per uncommitted episode; at termination the task's own      |
    |                    | ``score_answer`` in [0, 1] (partial credit on some tasks)     |
    | Termination        | an episode contains ``answer_marker`` (the text after it is   |
    |                    | the answer), or the forced answer after ``max_episodes``      |
    | Truncation         | never (the forced answer ends a trial)                        |
    | ``reset`` options  | ``{"index": i}``: problem ``i`` of the split                  |
    | terminating info   | ``scorer_errors``, ``rejected_answers``: this env's counts    |
    +--------------------+---------------------------------------------------------------+

    Keyword arguments (``gymnasium.make("metarl/ReasoningGym-v0", **kwargs)``):

    +------------------------+--------------+------------------------------------------------+
    | kwarg                  | default      | meaning                                        |
    +========================+==============+================================================+
    | ``task``               | "chain_sum"  | reasoning-gym task name                        |
    | ``task_config``        | None         | dict of the task's generator options           |
    | ``size``               | 2000         | items generated from ``seed``; each goes to    |
    |                        |              | train or test by a hash of its question        |
    | ``seed``               | 0            | generator seed                                 |
    | ``test_fraction``      | 0.2          | share of questions hashed into ``test``        |
    | ``grading_timeout_s``  | 2.0          | wall-clock bound of one scorer call            |
    | ``split``              | "train"      | ``"train"`` or ``"test"``                      |
    | ``max_episodes``       | 3            | episodes before an answer is forced            |
    | ``answer_marker``      | "Answer:"    | text that commits a final answer               |
    | ``forced_answer_text`` | "Answer:"    | observation that makes the policy answer now   |
    | ``episode_delimiter``  | ``"\\n"``      | ends the prompt and each episode; tasks with   |
    |                        |              | multi-line answers need e.g. ``"\\n\\n"``        |
    | ``feedback``           | False        | verdict on each uncommitted episode            |
    | ``max_text_length``    | 100000       | longest episode text accepted                  |
    +------------------------+--------------+------------------------------------------------+

    Items are generated once per ``(task, task_config, seed, size, test_fraction)`` and
    cached for the process; slow generators (countdown, puzzle24: ~15-65 items/s) want a
    small ``size``. Duplicate questions are kept once.

    Grading: an answer scores 0.0 without reaching the scorer (counted in
    ``rejected_answers``) when it fails the guards of :func:`envs.grading.passes_guards`
    with a length limit of ``max(512, 2 * len(reference))`` characters, or when it looks
    like code (:func:`envs.grading.looks_like_code`). A scorer that raises, overruns
    ``grading_timeout_s`` or crashes scores 0.0 and is counted in ``scorer_errors``.

    Expert traces: ``n_failed`` wrong answers (the reference perturbed: a number
    shifted, a character changed; checked to score below 1), then
    ``"Answer: <reference>"``. ``variety`` is the probability of a random perturbation
    (and a short lead-in before the answer) instead of the canonical one.
    """

    # The task's scorer (task, task_config, seed, size, answer, entry, timeout_s) -> score; a class
    # attribute so that a subclass (or a test) can replace it.
    scorer = staticmethod(score_reasoning_gym)

    def __init__(
        self,
        *,
        task: str = "chain_sum",
        task_config: dict | None = None,
        size: int = 2000,
        seed: int = 0,
        test_fraction: float = 0.2,
        grading_timeout_s: float = 2.0,
        **base_kwargs,
    ):
        # split, max_episodes, answer_marker, ... : EpisodicTextEnv's keywords, whose
        # explicit signature rejects an unknown option by name.
        super().__init__(**base_kwargs)
        name = type(self).__name__
        registry = _registry()
        if task not in registry:
            close = difflib.get_close_matches(task, registry, n=5) or sorted(registry)[:8]
            raise ValueError(f"{name}: unknown reasoning-gym task {task!r}; e.g. {close} ({len(registry)} tasks)")
        task_config = _plain(task_config or {})
        fields = {f.name for f in dataclasses.fields(registry[task][1])} - {"seed", "size"}
        unknown = sorted(set(task_config) - fields)
        if unknown:
            raise ValueError(
                f"{name}: unknown task_config option(s) {unknown} for {task!r}; valid: {sorted(fields)} "
                "(seed and size are keyword arguments of the env itself)"
            )
        if size < 1:
            raise ValueError(f"{name}: size must be >= 1, got {size}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"{name}: test_fraction must be in (0, 1), got {test_fraction}")
        if grading_timeout_s <= 0:
            raise ValueError(f"{name}: grading_timeout_s must be positive, got {grading_timeout_s}")
        self.task = task
        self.task_config = task_config
        self.size = int(size)
        self.seed = int(seed)
        self.grading_timeout_s = float(grading_timeout_s)
        try:
            config_json = json.dumps(task_config, sort_keys=True)
        except TypeError as e:
            raise ValueError(f"{name}: task_config must be JSON-serialisable: {e}") from None
        self._items = _items(task, config_json, self.seed, self.size, float(test_fraction))[self.split]
        if not self._items:
            raise ValueError(f"{name}: the {self.split!r} split of {task!r} is empty; raise size or change test_fraction")
        self.scorer_errors = 0
        """Scorer calls that raised, timed out or crashed (each scored 0.0)."""
        self.rejected_answers = 0
        """Answers scored 0.0 by the guards without reaching the scorer."""

    @property
    def num_problems(self) -> int:
        return len(self._items)

    def _problem(self, index: int) -> Problem:
        item = self._items[index]
        entry = item["entry"]
        return Problem(
            problem_id=f"{self.task}:{self.seed}:{item['index']}",
            prompt=entry["question"] + self.episode_delimiter,
            reference=str(entry["answer"]),
            data={"entry": entry},
        )

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = super().step(action)
        if terminated:
            info["scorer_errors"] = self.scorer_errors
            info["rejected_answers"] = self.rejected_answers
        return obs, reward, terminated, truncated, info

    # ------------------------------------------------------------------ grading
    def score(self, answer_text: str) -> float:
        """The task's ``score_answer`` in [0, 1], behind the guards; 0.0 on any scorer failure."""
        value, failure = self._grade(answer_text)
        if failure == "rejected":
            self.rejected_answers += 1
        elif failure == "error":
            self.scorer_errors += 1
        return value

    def _grade(self, answer_text: str) -> tuple[float, str | None]:
        """(score, None) or (0.0, "rejected" | "error"); counts nothing."""
        limit = max(MAX_ANSWER_CHARS, 2 * len(self.reference_answer))
        if not passes_guards(answer_text, limit) or looks_like_code(answer_text):
            return 0.0, "rejected"
        try:
            value = self.scorer(
                self.task,
                self.task_config,
                self.seed,
                self.size,
                answer_text,
                self.problem.data["entry"],
                self.grading_timeout_s,
            )
        except Exception:  # noqa: BLE001 - reported through the scorer_errors count
            return 0.0, "error"
        return (min(1.0, max(0.0, value)) if math.isfinite(value) else 0.0), None

    def score_episode(self, episode_text: str) -> float:
        return self.score(episode_text.strip()) if isinstance(episode_text, str) else 0.0

    # ------------------------------------------------------------ expert traces
    def expert_trace(self, rng: np.random.Generator, n_failed: int, variety: float) -> list[str]:
        if not 0 <= n_failed < self.max_episodes:
            raise ValueError(f"expert_trace: n_failed must be in [0, max_episodes={self.max_episodes}), got {n_failed}")
        if not 0.0 <= variety <= 1.0:
            raise ValueError(f"expert_trace: variety must be in [0, 1], got {variety}")
        episodes = [self._wrong_answer(rng if rng.random() < variety else None, j) for j in range(n_failed)]
        lead = str(rng.choice(["", "Checking again. ", "So "])) if rng.random() < variety else ""
        episodes.append(f"{lead}{self.answer_marker} {self.reference_answer}")
        return episodes

    def _wrong_answer(self, rng: np.random.Generator | None, j: int) -> str:
        """A perturbed reference scoring 0 (or the lowest-scoring of a few tries); canonical when ``rng`` is None."""
        best, best_score = None, 2.0
        for attempt in range(8):
            wrong = _perturb(self.reference_answer, j + attempt, rng)
            if wrong == self.reference_answer or self.answer_marker in wrong:
                continue
            s = self._grade(wrong)[0]
            if s == 0.0:
                return wrong
            if s < best_score:
                best, best_score = wrong, s
        return best if best is not None and best_score < 1.0 else "?"


def _perturb(reference: str, k: int, rng: np.random.Generator | None) -> str:
    """The reference made wrong: a number shifted, else one character changed (``k``-th canonical or random)."""
    value = parse_number(reference)
    if value is not None and value.denominator == 1:
        delta = int(rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])) if rng is not None else k + 1
        return str(value.numerator + delta)
    spots = [m.start() for m in re.finditer(r"[A-Za-z0-9]", reference)]
    if not spots:
        return reference + "?"
    i = int(rng.integers(0, len(spots))) if rng is not None else -1 - (k % len(spots))
    pos = spots[i]
    shift = int(rng.integers(1, 9)) if rng is not None else 1 + k // len(spots)
    ch = reference[pos]
    if ch.isdigit():
        new = str((int(ch) + shift) % 10)
    else:
        base = ord("a") if ch.islower() else ord("A")
        new = chr(base + (ord(ch) - base + shift) % 26)
    return reference[:pos] + new + reference[pos + 1 :]
