"""Invertible ARC grid transforms: known images of the 8 dihedral elements, inverses
and compositions on random grids of random (also non-square) shapes, colour
permutations that fix the background, random transform sets, and whole-task
transforms and demonstration reordering."""

import itertools

import numpy as np
import pytest

from envs.arc_grids import ArcTask
from metarl_llm.arc.augment import (
    DIHEDRAL_NAMES,
    IDENTITY,
    Transform,
    apply_task,
    colour_transform,
    compose,
    dihedral,
    dihedral_transforms,
    invert_task,
    permute_demonstrations,
    random_colour_permutation,
    random_transforms,
)


def random_grid(rng, h=None, w=None):
    h = h or int(rng.integers(1, 9))
    w = w or int(rng.integers(1, 9))
    return tuple(tuple(int(v) for v in row) for row in rng.integers(0, 10, (h, w)))


def random_grids(seed, n=60):
    rng = np.random.default_rng(seed)
    return [random_grid(rng) for _ in range(n)]


def random_transform(rng):
    return Transform(int(rng.integers(8)), random_colour_permutation(rng))


G = ((1, 2, 3), (4, 5, 6))  # non-square, distinct cells


@pytest.mark.parametrize(
    "name, image",
    [
        ("identity", ((1, 2, 3), (4, 5, 6))),
        ("rot90", ((3, 6), (2, 5), (1, 4))),  # counter-clockwise
        ("rot180", ((6, 5, 4), (3, 2, 1))),
        ("rot270", ((4, 1), (5, 2), (6, 3))),
        ("flipud", ((4, 5, 6), (1, 2, 3))),
        ("fliplr", ((3, 2, 1), (6, 5, 4))),
        ("transpose", ((1, 4), (2, 5), (3, 6))),
        ("antitranspose", ((6, 3), (5, 2), (4, 1))),
    ],
)
def test_dihedral_elements_have_their_known_images(name, image):
    t = dihedral(name)
    assert t.apply(G) == image
    assert t(G) == image
    assert t.invert(image) == G
    assert t.name == name


def test_every_transform_inverse_round_trips_on_random_grids_of_random_shapes():
    rng = np.random.default_rng(1)
    grids = random_grids(0)
    assert any(len(g) != len(g[0]) for g in grids)  # non-square shapes are covered
    transforms = dihedral_transforms() + [colour_transform(rng) for _ in range(4)] + [random_transform(rng) for _ in range(8)]
    for t in transforms:
        for g in grids:
            img = t.apply(g)
            assert t.invert(img) == g
            assert t.apply(t.invert(g)) == g
            assert t.inverse().apply(img) == g
            swaps = t.dihedral in (1, 3, 6, 7)
            assert (len(img), len(img[0])) == ((len(g[0]), len(g)) if swaps else (len(g), len(g[0])))


def test_the_eight_dihedral_elements_are_distinct_and_closed_under_composition():
    images = {t.apply(G) for t in dihedral_transforms()}
    assert len(images) == 8
    group = set(dihedral_transforms())
    for a, b in itertools.product(dihedral_transforms(), repeat=2):
        assert a.then(b) in group
    assert [t.name for t in dihedral_transforms()] == list(DIHEDRAL_NAMES)


def test_compositions_apply_left_to_right_and_invert():
    rng = np.random.default_rng(2)
    grids = random_grids(3, 20)
    for _ in range(40):
        a, b, c = (random_transform(rng) for _ in range(3))
        abc = compose(a, b, c)
        assert abc == a.then(b).then(c) == a.then(b.then(c))
        assert abc.inverse() == compose(c.inverse(), b.inverse(), a.inverse())
        assert a.then(a.inverse()) == IDENTITY and a.inverse().then(a) == IDENTITY
        for g in grids:
            assert abc.apply(g) == c.apply(b.apply(a.apply(g)))
            assert abc.invert(abc.apply(g)) == g
    assert compose() == IDENTITY and IDENTITY.is_identity


def test_colour_permutations_fix_the_background_and_are_bijections():
    rng = np.random.default_rng(4)
    every_colour = (tuple(range(10)),)
    for _ in range(50):
        t = colour_transform(rng)
        assert t.colours[0] == 0 and sorted(t.colours) == list(range(10))
        img = t.apply(every_colour)
        assert img[0][0] == 0  # background kept
        assert sorted(img[0]) == list(range(10))  # bijection
        assert t.invert(img) == every_colour
    g = ((0, 0, 3), (0, 7, 0))
    t = Transform(colours=(0, 2, 3, 4, 5, 6, 7, 8, 9, 1))
    assert t.apply(g) == ((0, 0, 4), (0, 8, 0))
    assert t.name == "perm0234567891"


def test_transform_validation_names_the_fault():
    with pytest.raises(ValueError, match="background"):
        Transform(colours=(1, 0, 2, 3, 4, 5, 6, 7, 8, 9))
    with pytest.raises(ValueError, match="permutation"):
        Transform(colours=(0, 1, 1, 3, 4, 5, 6, 7, 8, 9))
    with pytest.raises(ValueError, match="dihedral"):
        Transform(dihedral=8)
    with pytest.raises(ValueError, match="unknown element"):
        dihedral("rot45")
    with pytest.raises(ValueError, match="rectangular"):
        IDENTITY.apply(((1, 2), (3,)))
    with pytest.raises(ValueError, match="0..9"):
        IDENTITY.apply(((1, 12),))


def test_random_transforms_are_distinct_identity_first_and_seeded():
    a = random_transforms(np.random.default_rng(5), 20)
    assert a == random_transforms(np.random.default_rng(5), 20)
    assert a != random_transforms(np.random.default_rng(6), 20)
    assert a[0] == IDENTITY and len(set(a)) == 20
    assert {t.dihedral for t in a[1:8]} == set(range(1, 8))  # the first 7 cover every spatial change
    assert all(t.colours != tuple(range(10)) for t in a[1:])
    assert len({t.name for t in a}) == 20
    plain = random_transforms(np.random.default_rng(5), 8, colours=False)
    assert set(plain) == set(dihedral_transforms()) and plain[0] == IDENTITY
    assert random_transforms(np.random.default_rng(0), 1) == [IDENTITY]
    with pytest.raises(ValueError, match="colours=True"):
        random_transforms(np.random.default_rng(0), 9, colours=False)
    with pytest.raises(ValueError, match="k must be"):
        random_transforms(np.random.default_rng(0), 0)


def make_task(seed=7, n=4):
    rng = np.random.default_rng(seed)
    train = [(random_grid(rng), random_grid(rng)) for _ in range(n)]
    test = [(random_grid(rng, 2, 5), random_grid(rng, 3, 4))]
    return ArcTask.build("task-x", train, test, source="unit", task_type="demo")


def test_apply_task_transforms_every_grid_and_inverts_back():
    task = make_task()
    rng = np.random.default_rng(8)
    for t in [random_transform(rng) for _ in range(10)]:
        moved = apply_task(t, task)
        assert moved.task_id == task.task_id and moved.source == task.source and moved.task_type == task.task_type
        assert moved.meta["transform"] == t.name
        for (i, o), (mi, mo) in zip(task.train + task.test, moved.train + moved.test):
            assert mi == t.apply(i) and mo == t.apply(o)
        assert len(moved.train) == len(task.train) and len(moved.test) == len(task.test)
        back = invert_task(t, moved)
        assert back == task and "transform" not in back.meta
        assert apply_task(t.inverse(), moved) == task
    with pytest.raises(ValueError, match="Transform"):
        apply_task("rot90", task)


def test_demonstration_reordering_is_a_seeded_permutation_of_the_demonstrations_only():
    task = make_task(n=6)
    a = permute_demonstrations(task, np.random.default_rng(9))
    assert a == permute_demonstrations(task, np.random.default_rng(9))
    assert sorted(a.train) == sorted(task.train) and a.train != task.train
    assert a.test == task.test
    orders = {permute_demonstrations(task, np.random.default_rng(s)).train for s in range(20)}
    assert len(orders) > 10


def test_rows_only_transforms_keep_rows_and_invert():
    """1-D tasks: only identity and fliplr (each with colour permutations) are drawn, so a
    row stays a row; every transform still round-trips."""
    rng = np.random.default_rng(3)
    ts = random_transforms(rng, 9, rows_only=True)
    assert ts[0].is_identity and len(set(ts)) == 9
    assert {t.dihedral for t in ts} <= {0, 5}
    row = ((1, 2, 3, 0, 4),)
    for t in ts:
        assert len(t.apply(row)) == 1 and t.invert(t.apply(row)) == row
    with pytest.raises(ValueError, match="colours"):
        random_transforms(rng, 3, colours=False, rows_only=True)


def test_leave_one_out_of_a_one_row_task_has_only_row_prompts():
    from envs.arc_grids import ArcTask
    from metarl_llm.arc.ttt import leave_one_out_splits

    task = ArcTask.build("t", [([1, 2, 0], [2, 1, 0]), ([3, 4, 0], [4, 3, 0]), ([5, 6, 0], [6, 5, 0])], [([7, 8, 0], [8, 7, 0])])
    splits = leave_one_out_splits(task, np.random.default_rng(0), 7, 64)
    assert len(splits) > 3
    for sp in splits:
        assert len(sp.query) == 1 and len(sp.target) == 1 and all(len(g) == 1 for pair in sp.context for g in pair)
