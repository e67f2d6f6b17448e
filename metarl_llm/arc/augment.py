"""Invertible augmentations of ARC grids and tasks.

Grids are :data:`envs.arc_grids.Grid` (tuples of rows of ints 0..9). Two families of
invertible maps act on them:

- the **dihedral group** D4 of the square: its 8 elements, indexed as in
  :data:`DIHEDRAL_NAMES` (``identity``, ``rot90`` (counter-clockwise), ``rot180``,
  ``rot270``, ``flipud`` (rows reversed), ``fliplr`` (columns reversed), ``transpose``
  (main diagonal), ``antitranspose`` (anti-diagonal)). They act on grids of any shape
  (an HxW grid becomes HxW or WxH);
- **colour permutations** that keep the background colour 0 fixed (a permutation of
  1..9): a cell of colour ``c`` becomes colour ``perm[c]``.

Colour permutations act on values and the dihedral group on positions, so the two
commute and every composition of them is exactly one pair (dihedral element, colour
permutation). :class:`Transform` is that pair, hashable and comparable: two transforms
are equal iff they act identically on every grid. ``apply`` maps a grid into the
transformed frame, ``invert`` maps it back (``t.invert(t.apply(g)) == g``).

Training-only augmentation: :func:`permute_demonstrations` reorders a task's
demonstrations (the answer does not depend on their order; used to expand the
test-time-training data, never to change an evaluation prompt).

Everything here is pure: randomness comes only from the ``numpy.random.Generator``
passed in, so results are deterministic given its seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from envs.arc_grids import ArcTask, Grid

NUM_COLOURS = 10
DIHEDRAL_NAMES = ("identity", "rot90", "rot180", "rot270", "flipud", "fliplr", "transpose", "antitranspose")
IDENTITY_COLOURS: tuple[int, ...] = tuple(range(NUM_COLOURS))

_DIHEDRAL_OPS = (
    lambda a: a,
    lambda a: np.rot90(a, 1),
    lambda a: np.rot90(a, 2),
    lambda a: np.rot90(a, 3),
    lambda a: a[::-1, :],
    lambda a: a[:, ::-1],
    lambda a: a.T,
    lambda a: a[::-1, ::-1].T,
)


def _dihedral_tables() -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """Composition table ``C[a][b]`` (apply a, then b) and inverses, derived from the ops
    on a 2x3 array of distinct values (whose 8 images are all distinct)."""
    probe = np.arange(6).reshape(2, 3)
    images = [op(probe) for op in _DIHEDRAL_OPS]

    def index_of(arr: np.ndarray) -> int:
        hits = [k for k, im in enumerate(images) if im.shape == arr.shape and np.array_equal(im, arr)]
        assert len(hits) == 1
        return hits[0]

    table = tuple(tuple(index_of(_DIHEDRAL_OPS[b](_DIHEDRAL_OPS[a](probe))) for b in range(8)) for a in range(8))
    inverse = tuple(next(b for b in range(8) if table[a][b] == 0) for a in range(8))
    return table, inverse


_COMPOSE, _INVERSE = _dihedral_tables()


def _to_array(grid: Grid) -> np.ndarray:
    try:
        arr = np.asarray(grid, dtype=np.int64)
    except (ValueError, TypeError) as e:
        raise ValueError(f"grid: expected a non-empty rectangular grid of ints 0..9 ({e})") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"grid: expected a non-empty rectangular grid, got an array of shape {arr.shape}")
    if arr.min() < 0 or arr.max() >= NUM_COLOURS:
        raise ValueError("grid: colours must be integers 0..9")
    return arr


def _to_grid(arr: np.ndarray) -> Grid:
    return tuple(tuple(row) for row in arr.tolist())


@dataclass(frozen=True)
class Transform:
    """An invertible grid map: dihedral element ``dihedral`` (index into
    :data:`DIHEDRAL_NAMES`) and colour permutation ``colours`` (``colours[c]`` is the
    new colour of colour ``c``; ``colours[0] == 0``). Colours are mapped, then the
    dihedral element moves the cells (the two commute)."""

    dihedral: int = 0
    colours: tuple[int, ...] = IDENTITY_COLOURS

    def __post_init__(self):
        if not isinstance(self.dihedral, (int, np.integer)) or not 0 <= int(self.dihedral) < 8:
            raise ValueError(f"Transform: dihedral must be an index 0..7, got {self.dihedral!r}")
        cols = tuple(int(c) for c in self.colours)
        if sorted(cols) != list(IDENTITY_COLOURS):
            raise ValueError(f"Transform: colours must be a permutation of 0..9, got {self.colours!r}")
        if cols[0] != 0:
            raise ValueError(f"Transform: colours must keep the background 0 fixed, got colours[0]={cols[0]}")
        object.__setattr__(self, "dihedral", int(self.dihedral))
        object.__setattr__(self, "colours", cols)

    # ---------------------------------------------------------------- naming
    @property
    def name(self) -> str:
        """``identity``, a dihedral name, ``perm<10 digits>`` (the colour map), or
        ``<dihedral>+perm<digits>``; unique per transform."""
        parts = [DIHEDRAL_NAMES[self.dihedral]] if self.dihedral else []
        if self.colours != IDENTITY_COLOURS:
            parts.append("perm" + "".join(map(str, self.colours)))
        return "+".join(parts) or "identity"

    def __repr__(self) -> str:
        return f"Transform({self.name})"

    @property
    def is_identity(self) -> bool:
        return self.dihedral == 0 and self.colours == IDENTITY_COLOURS

    # --------------------------------------------------------------- actions
    def apply(self, grid: Grid) -> Grid:
        """The grid in the transformed frame (HxW -> HxW or WxH)."""
        arr = _to_array(grid)
        if self.colours != IDENTITY_COLOURS:
            arr = np.asarray(self.colours)[arr]
        return _to_grid(_DIHEDRAL_OPS[self.dihedral](arr))

    __call__ = apply

    def inverse(self) -> "Transform":
        """The transform undoing this one."""
        inv = [0] * NUM_COLOURS
        for c, d in enumerate(self.colours):
            inv[d] = c
        return Transform(_INVERSE[self.dihedral], tuple(inv))

    def invert(self, grid: Grid) -> Grid:
        """Map a grid of the transformed frame back: ``invert(apply(g)) == g``."""
        return self.inverse().apply(grid)

    def then(self, other: "Transform") -> "Transform":
        """The transform applying ``self`` first, then ``other``."""
        colours = tuple(other.colours[c] for c in self.colours)
        return Transform(_COMPOSE[self.dihedral][other.dihedral], colours)

    def apply_pairs(self, pairs: Sequence[tuple[Grid, Grid]]) -> tuple[tuple[Grid, Grid], ...]:
        """Every (input, output) pair with both grids transformed."""
        return tuple((self.apply(i), self.apply(o)) for i, o in pairs)


IDENTITY = Transform()


def compose(*transforms: Transform) -> Transform:
    """The transform applying ``transforms`` left to right (``compose(a, b)(g) == b(a(g))``)."""
    out = IDENTITY
    for t in transforms:
        if not isinstance(t, Transform):
            raise ValueError(f"compose: expected Transform objects, got {type(t).__name__}")
        out = out.then(t)
    return out


def dihedral(which: int | str) -> Transform:
    """The dihedral element by index 0..7 or name (see :data:`DIHEDRAL_NAMES`)."""
    if isinstance(which, str):
        if which not in DIHEDRAL_NAMES:
            raise ValueError(f"dihedral: unknown element {which!r}; expected one of {DIHEDRAL_NAMES}")
        which = DIHEDRAL_NAMES.index(which)
    return Transform(dihedral=which)


def dihedral_transforms() -> list[Transform]:
    """The 8 elements of the dihedral group, identity first, in :data:`DIHEDRAL_NAMES` order."""
    return [Transform(dihedral=d) for d in range(8)]


def random_colour_permutation(rng: np.random.Generator) -> tuple[int, ...]:
    """A uniformly random permutation of colours 1..9 with 0 fixed (a ``colours`` tuple)."""
    return (0,) + tuple(int(c) for c in rng.permutation(np.arange(1, NUM_COLOURS)))


def colour_transform(rng: np.random.Generator) -> Transform:
    """A random colour permutation (background 0 fixed), no spatial change."""
    return Transform(colours=random_colour_permutation(rng))


def random_transforms(rng: np.random.Generator, k: int, colours: bool = True, rows_only: bool = False) -> list[Transform]:
    """``k`` distinct transforms, the identity first.

    The dihedral elements of transforms 1..k-1 cycle through a random order of the 7
    non-identity elements, then of all 8 (so the first 7 augmentations cover every
    spatial change); with ``colours`` each of them also gets a random colour
    permutation (0 fixed), redrawn until the transform is new. Without ``colours`` only
    the 8 dihedral elements exist, so ``k <= 8``.

    ``rows_only``: only the elements that keep a 1-row grid a row (identity and fliplr),
    for 1-D tasks such as arc_1d, which a model never sees as columns; then ``k <= 2``
    without ``colours``.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"random_transforms: k must be an integer >= 1, got {k!r}")
    limit = 2 if rows_only else 8
    if not colours and k > limit:
        raise ValueError(f"random_transforms: k={k} > {limit} distinct transforms needs colours=True")
    fliplr = DIHEDRAL_NAMES.index("fliplr")
    out = [IDENTITY]
    seen = {IDENTITY}
    cycle: list[int] = [fliplr] if rows_only else [int(d) for d in rng.permutation(np.arange(1, 8))]
    while len(out) < k:
        if not cycle:
            cycle = [int(d) for d in rng.permutation([0, fliplr])] if rows_only else [int(d) for d in rng.permutation(8)]
        d = cycle.pop(0)
        t = Transform(d, random_colour_permutation(rng) if colours else IDENTITY_COLOURS)
        while t in seen:  # only possible with colours (9! permutations per element)
            t = Transform(d, random_colour_permutation(rng))
        seen.add(t)
        out.append(t)
    return out


def single_row(task: ArcTask) -> bool:
    """Whether every grid of ``task`` (demonstrations and test pairs) is one row."""
    return all(len(g) == 1 for pair in task.train + task.test for g in pair)


def apply_task(transform: Transform, task: ArcTask) -> ArcTask:
    """``task`` with every grid (demonstrations and test pairs) transformed. The task id,
    source and type are kept; ``meta["transform"]`` records the transform's name."""
    if not isinstance(transform, Transform):
        raise ValueError(f"apply_task: transform must be a Transform, got {type(transform).__name__}")
    return dataclasses.replace(
        task,
        train=transform.apply_pairs(task.train),
        test=transform.apply_pairs(task.test),
        meta={**task.meta, "transform": transform.name},
    )


def invert_task(transform: Transform, task: ArcTask) -> ArcTask:
    """Undo :func:`apply_task` (the ``transform`` meta entry is dropped)."""
    back = apply_task(transform.inverse(), task)
    meta = dict(back.meta)
    meta.pop("transform", None)
    return dataclasses.replace(back, meta=meta)


# ---------------------------------------------------- training-only augmentation


def permute_pairs(pairs: Sequence[tuple[Grid, Grid]], rng: np.random.Generator) -> tuple[tuple[Grid, Grid], ...]:
    """The demonstration pairs in a uniformly random order (training-only augmentation)."""
    return tuple(pairs[int(j)] for j in rng.permutation(len(pairs)))


def permute_demonstrations(task: ArcTask, rng: np.random.Generator) -> ArcTask:
    """``task`` with its demonstrations reordered at random (test pairs untouched).
    Training-only: evaluation prompts keep the task's own order."""
    return dataclasses.replace(task, train=permute_pairs(task.train, rng))
