"""Fuzzed inputs (issue 7, item 4): property-based tests of every environment's answer
parsers, graders, ``score``, ``score_episode`` and ``step`` on arbitrary and adversarial text.

Targets: :mod:`envs.grading` (``passes_guards``, ``nesting_depth``, ``looks_like_code``,
``parse_number``, ``extract_boxed``, ``answers_match``), :func:`envs.arc_grids.parse_grid`,
and for each environment (``planted_subseq``, ``math``, ``reasoning_gym`` with
``chain_sum`` and ``countdown`` - whose scorer hands the answer to sympy's ``parse_expr`` -
and ``arc`` with source ``arc_1d``) its ``parse_answer``, ``score``, ``score_episode``
and whole trials of ``step``.

Inputs: arbitrary Unicode (lone surrogates included), token soups of the domains' own
vocabulary (answer markers, digits, ``\\boxed{``, ``\\frac{``, ``^``, ``**``, wrappers, odd
Unicode digits, NUL bytes, newlines, the current problem's reference), power towers
(``9**9**9**9``, ``10^100000``, ...), brackets nested up to 5,000 deep, ~100k-character
strings, grid-like strings with bad rows, and Python-injection payloads aimed at a marker
file (``__import__('os').system('touch /tmp/pwned_<uuid>')``, ``exec``, ``eval``,
``lambda``, ...).

Properties: no exception escapes (a score is a ``float`` in the environment's documented
range, ``step`` returns the Gymnasium 5-tuple with a finite reward, or the documented
ValueError for text over ``max_text_length``); nothing is executed (the marker file never
appears, and reasoning-gym rejects every payload before its scorer); determinism (the same
input gives the same score, again on a fresh environment reset with the same seed, with the
math-verify memo cleared; trials replay step for step); bounded time: every call is timed
and must finish within ``IN_PROCESS_BOUND_S`` (2 s) when graded in this process, or within
the grading timeout plus ``WORKER_ALLOWANCE_S`` (15 s: a call after an overrun pays the
fresh worker's imports) when it may reach the grading worker. A call that overran the
grading timeout (the worker was restarted) scores 0 by contract; that 0 is its determinism
check, not a second timed-out run.

Settings: every test is ``@settings(max_examples=N, deadline=None, derandomize=True,
database=None)``: the same examples on every run, no example database. ``deadline`` is off
because the time bound is asserted per call by the tests themselves (a per-example deadline
is flaky on a loaded machine); no health check is suppressed. N (``EXAMPLES``) is 500 for
the in-process parsers, 300 for the in-process environments and 200 for worker-graded
targets, plus the explicit ``@example``s. Worker-graded targets run with a grading timeout of
``WORKER_TIMEOUT_S`` (1 s; the environments' default is 2 s) and are not generated the input
classes known to overrun it (power towers, long ``a/b/c/...`` division chains, a few dozen
nested brackets): each overrun costs the timeout plus a worker restart, so those are explicit
examples there, while in-process targets get them freely. Run with ``-s`` for the summary
per target: examples, timed calls, slowest call and its input, overruns.

Finding: math-verify's comparison (sympy's ``evalf`` of the unevaluated quotient) is
exponential in the length of a plain division chain, ~2 s at 16 terms
(``"2114509537/2114509537/..."``), so such answers scored 0 by overrunning the timeout, and
an equal one (``"$24/2/1/.../1$"``, ~1.3 s) either way by machine load. Fixed: answers with
more than ``envs.grading.MAX_DIVISIONS`` (10) ``/`` score False before math-verify.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import uuid
from fractions import Fraction

import gymnasium
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import envs
from envs import grading
from envs.arc_grids import MAX_SIDE, format_grid, parse_grid
from envs.grading import (
    MAX_ANSWER_CHARS,
    MAX_NESTING_DEPTH,
    answers_match,
    extract_boxed,
    looks_like_code,
    nesting_depth,
    parse_number,
    passes_guards,
)

IN_PROCESS_BOUND_S = 2.0
"""Bound on one call that never leaves this process (parsers, planted_subseq, arc)."""
WORKER_ALLOWANCE_S = 15.0
"""Added to the grading timeout for calls that may reach the grading worker: a call after a
timeout pays the fresh worker's imports (sympy, math-verify, reasoning-gym), seconds on a
loaded machine."""
EXAMPLES = {"parser": 500, "env": 300, "worker": 200}
"""max_examples: in-process parsers, in-process environments, worker-graded targets."""
WORKER_TIMEOUT_S = 1.0
"""Grading timeout of the worker-graded targets here (the environments' default is 2 s; the
mechanism is the same, and each overrun costs a timeout plus a worker restart)."""

MARKER = os.path.join(tempfile.gettempdir(), f"pwned_{uuid.uuid4().hex}")
"""File every injection payload tries to create; it must never exist."""
REF = "\ue000REF\ue000"
"""Placeholder a strategy may emit; tests replace it with the current reference answer."""

ENVS = {
    "planted_subseq": ("planted_subseq", {}),
    "math": ("math", {"grading_timeout_s": WORKER_TIMEOUT_S}),
    "rg_chain_sum": ("reasoning_gym", {"task": "chain_sum", "size": 300, "grading_timeout_s": WORKER_TIMEOUT_S}),
    "rg_countdown": ("reasoning_gym", {"task": "countdown", "size": 10, "grading_timeout_s": WORKER_TIMEOUT_S}),
    "arc_1d": ("arc", {"source": "arc_1d", "size": 500}),
}
WORKER_GRADED = {"math", "rg_chain_sum", "rg_countdown"}
PARTIAL_CREDIT = {"rg_chain_sum", "rg_countdown"}  # score in [0, 1]; the others score 0.0 or 1.0

STATS: dict[str, dict] = {}
"""target -> {"examples", "calls", "slowest_s", "slowest_input", "timeouts"}; printed at the end."""


# ----------------------------------------------------------------------- helpers


def _stat(target: str) -> dict:
    return STATS.setdefault(
        target, {"examples": 0, "calls": 0, "slowest_s": 0.0, "slowest_input": "", "timeouts": 0, "timed_out": []}
    )


def count_timeout(target: str, text: str) -> None:
    s = _stat(target)
    s["timeouts"] += 1
    s["timed_out"].append(ascii(text)[:60])


def count_example(target: str) -> None:
    _stat(target)["examples"] += 1


def timed(target: str, bound_s: float, fn, *args):
    """``fn(*args)``, its wall time recorded under ``target`` and asserted below ``bound_s``."""
    start = time.perf_counter()
    out = fn(*args)
    elapsed = time.perf_counter() - start
    s = _stat(target)
    s["calls"] += 1
    if elapsed > s["slowest_s"]:
        s["slowest_s"] = elapsed
        s["slowest_input"] = ascii(args[0] if args else None)[:48]
    assert elapsed < bound_s, f"{target}: {elapsed:.2f}s >= {bound_s}s on {ascii(args[:1])[:200]}"
    return out


def _holds_payload(text: str) -> bool:
    return any(p.replace("{m}", MARKER) in text for p in INJECTIONS)


def nothing_executed() -> None:
    assert not os.path.exists(MARKER), f"an injection payload ran: {MARKER} exists"


def make(key: str):
    name, kwargs = ENVS[key]
    return gymnasium.make(envs.ENV_IDS[name], **kwargs).unwrapped


def bound_of(key: str, env) -> float:
    return env.grading_timeout_s + WORKER_ALLOWANCE_S if key in WORKER_GRADED else IN_PROCESS_BOUND_S


@pytest.fixture(scope="module")
def env_pool():
    """One long-lived env per key, its grader warmed up (the worker's one-off imports are
    not a property of any input)."""
    pool = {}
    for key in ENVS:
        env = make(key)
        env.reset(seed=0)
        env.score(env.reference_answer)
        pool[key] = env
    return pool


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    nothing_executed()
    width = max((len(t) for t in STATS), default=10)
    lines = [
        "",
        f"fuzz summary (marker {MARKER} absent)",
        f"{'target':<{width}}  examples   calls  slowest_s  timeouts  slowest input",
    ]
    for target in sorted(STATS):
        s = STATS[target]
        lines.append(
            f"{target:<{width}}  {s['examples']:>8}  {s['calls']:>6}  {s['slowest_s']:>9.4f}  {s['timeouts']:>8}  {s['slowest_input']}"
        )
    for target in sorted(STATS):
        for text in STATS[target]["timed_out"]:
            lines.append(f"  timed out in {target}: {text}")
    print("\n".join(lines))


# -------------------------------------------------------------------- strategies

_any_char = st.characters() | st.characters(categories=["Cs"])  # lone surrogates too
any_text = st.text(_any_char, max_size=300)

VOCAB = [
    "Answer:",
    "Answer: ",
    "answer:",
    "ANSWER:",
    "Answer",
    ":",
    "Final Answer:",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "10",
    "12",
    "-1",
    "007",
    "1,000",
    "1,23",
    "0.5",
    "-3/4",
    ".5",
    "1.",
    "1e5",
    "1e309",
    "1_000",
    "0x10",
    "inf",
    "-inf",
    "nan",
    "oo",
    "zoo",
    "1/0",
    "0/0",
    "\\boxed{",
    "\\boxed ",
    "\\fbox{",
    "{",
    "}",
    "\\frac{",
    "\\dfrac",
    "\\sqrt{",
    "\\sqrt[3]{",
    "^",
    "^{",
    "**",
    "_",
    "\\cdot",
    "\\times",
    "\\div",
    "\\pm",
    "\\infty",
    "\\pi",
    "\\left(",
    "\\right)",
    "\\text{",
    "\\mathrm{",
    "\\begin{pmatrix}",
    "\\end{pmatrix}",
    "&",
    "\\\\",
    "\\",
    "$",
    "$$",
    "\\(",
    "\\)",
    "\\[",
    "\\]",
    "(",
    ")",
    "[",
    "]",
    "+",
    "-",
    "*",
    "/",
    "=",
    "<",
    ">",
    ",",
    ".",
    "%",
    "!",
    "'",
    '"',
    "#",
    "@",
    ";",
    "x",
    "y",
    "e",
    "i",
    "I",
    "E",
    "pi",
    "sin",
    "log",
    "sqrt",
    "Abs",
    "factorial",
    "Rational",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "\r\n",
    "\x00",
    "\x1b",
    "\ud800",
    "\udfff",
    "\u200b",
    "\ufeff",
    "\u202e",
    "\u0663",
    "\u00b2",
    "\u00bd",
    "\u216b",
    "\U0001d7d9",
    "\uff11",
    "\u00e9",
    "\u0301",
    "\u2212",
    "\u00d7",
    "12/34",
    "0/",
    "//",
    "/0",
    "000/000",
    "9/9/9",
    REF,
    REF,
    REF,
]
soup = st.lists(st.sampled_from(VOCAB) | st.text(_any_char, max_size=3), max_size=40).map("".join)

BOMBS = [
    "9**9**9**9",
    "10**10**10",
    "2**2**2**2**2**2",
    "(9**9)**(9**9)",
    "10^100000",
    "10^{100000}",
    "$10^{10^{10}}$",
    "2^{2^{2^{2^{2}}}}",
    "9^9^9^9",
    "\\boxed{9^{9^{9^{9}}}}",
    "factorial(10**9)",
    "10!!!!",
    "1e999999999",
    "10**-10**10",
    "\\frac{1}{10^{10^{10}}}",
]
bombs = st.tuples(st.sampled_from(["", "Answer: ", "x = ", "$"]), st.sampled_from(BOMBS), st.sampled_from(["", "$", "."])).map(
    "".join
)

INJECTIONS = [
    "__import__('os').system('touch {m}')",
    '__import__("os").system("touch {m}")',
    "exec(\"open('{m}', 'w').close()\")",
    "eval(\"__import__('os').system('touch {m}')\")",
    "(lambda: open('{m}', 'w'))()",
    "lambda: __import__('os').system('touch {m}')",
    "open('{m}', 'w')",
    "[open][0]('{m}', 'w')",
    "getattr(__builtins__, 'open')('{m}', 'w')",
    "exec ('import os; os.system(\"touch {m}\")')",
    "compile('open(\"{m}\", \"w\")', 's', 'exec')",
    "$__import__('os').system('touch {m}')$",
    "\\boxed{__import__('os').system('touch {m}')}",
    "1 + __import__('subprocess').call(['touch', '{m}'])",
    "Symbol('x').__class__.__init__.__globals__['os'].system('touch {m}')",
    "f\"{open('{m}', 'w')}\"",
    "().__class__.__base__.__subclasses__()",
    "sin(open('{m}', 'w'))",
    'sqrt (exec(\'open("{m}", "w")\'))',
    "breakpoint()",
    "input()",
    "exit()",
    "os._exit(0)",
]
injection = st.tuples(
    st.sampled_from(["", "Answer: ", "1 + ", "\\boxed{", "$", "x"]),
    st.sampled_from(INJECTIONS).map(lambda p: p.replace("{m}", MARKER)),
    st.sampled_from(["", "}", "$", " + 1", "\n"]),
).map("".join)

_OPEN_CLOSE = [
    ("(", ")"),
    ("{", "}"),
    ("[", "]"),
    ("\\boxed{", "}"),
    ("\\frac{1}{", "}"),
    ("\\sqrt{", "}"),
    ("2^{", "}"),
    ("-(", ")"),
    ("$", "$"),
    ("\\left(", "\\right)"),
    ("Answer: (", ")"),
]


def nested(depths: st.SearchStrategy[int]) -> st.SearchStrategy[str]:
    """Brackets, boxes, fractions, ... nested ``depths`` deep, closed or not."""

    @st.composite
    def build(draw):
        depth = draw(depths)
        left, right = draw(st.sampled_from(_OPEN_CLOSE))
        inner = draw(st.sampled_from(["", "1", "x", "12", REF, "9**9"]))
        closed = draw(st.booleans())
        return left * depth + inner + (right * depth if closed else "")

    return build()


ANY_DEPTH = st.sampled_from([MAX_NESTING_DEPTH - 1, MAX_NESTING_DEPTH, MAX_NESTING_DEPTH + 1, 1000, 5000]) | st.integers(1, 5000)
# Within the guard, math-verify can take seconds on a few dozen nested brackets (bounded by
# the grading timeout); worker-graded targets get shallow nesting or nesting the guard rejects.
WORKER_DEPTH = st.integers(1, 6) | st.integers(MAX_NESTING_DEPTH + 1, 5000) | st.sampled_from([MAX_NESTING_DEPTH + 1, 5000])


@st.composite
def long_text(draw):
    """~100k characters, around the environments' max_text_length of 100,000."""
    unit = draw(
        st.sampled_from(
            ["1", "x", "(", "{", "\\boxed{", "Answer: ", "9", "12/", " ", "\n", "\x00", "\u00e9", "\ud800", "1,", REF]
        )
    )
    n = draw(st.sampled_from([99_999, 100_000, 100_001]) | st.integers(90_000, 100_000))
    return (unit * (n // len(unit) + 1))[:n]


@st.composite
def grid_like(draw, max_rows: int = 32):
    """'12/34'-style grids, often broken: ragged rows, empty rows, odd digits, too large."""
    rows = draw(st.integers(0, max_rows))
    cols = draw(st.integers(0, 32))
    cells = draw(st.text("0123456789", min_size=rows * cols, max_size=rows * cols))
    grid = [cells[r * cols : (r + 1) * cols] for r in range(rows)]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.integers(0, 5))
        if not grid:
            break
        r = draw(st.integers(0, len(grid) - 1))
        if kind == 0:
            grid[r] = grid[r][:-1]  # ragged
        elif kind == 1:
            grid[r] = ""  # empty row
        elif kind == 2:
            grid[r] += draw(st.sampled_from([" ", "x", "\u0663", "\u00b2", "\x00", "-", "+", ".", "\n", "/"]))
        elif kind == 3:
            grid.append(grid[r])  # an extra row
        elif kind == 4:
            grid[r] = grid[r] * 2
    sep = draw(st.sampled_from(["/", "/", "/", "\n", " / ", "|"]))
    pad = draw(st.sampled_from(["", " ", "\n", "\t", "Answer: ", "\u00a0"]))
    return pad + sep.join(grid) + pad


ref_mixed = st.tuples(soup, st.just(REF), soup).map("".join)


def fuzz_text(in_process: bool) -> st.SearchStrategy[str]:
    """Arbitrary and adversarial text.

    Targets graded in this process get everything. Targets graded in the worker do not get
    the generated classes known to run math-verify / sympy into the grading timeout (power
    towers, long ``a/b/c/...`` division chains, a few dozen nested brackets): each such
    input costs a timeout and a worker restart (seconds), so they are explicit examples
    there (``HOSTILE_EXAMPLES``, the division chains of ``test_answers_match``) and their
    grading timeout is ``WORKER_TIMEOUT_S``.
    """
    branches = [any_text, st.text(max_size=30), soup, soup, ref_mixed, injection, long_text()]
    if in_process:
        return st.one_of(branches + [nested(ANY_DEPTH), grid_like(), bombs, bombs])
    return st.one_of(branches + [nested(WORKER_DEPTH), grid_like(max_rows=6)])


def fill(text: str, reference: str) -> str:
    return text.replace(REF, reference)


def _settings(kind: str, **kwargs):
    return settings(max_examples=EXAMPLES[kind], deadline=None, derandomize=True, database=None, **kwargs)


# Explicit examples for every text-taking test: the named hostile inputs.
HOSTILE_EXAMPLES = [
    "9**9**9**9",
    "10^100000",
    "(" * 5000 + "1" + ")" * 5000,
    "\\boxed{" * 5000 + "1" + "}" * 5000,
    "1" * 100_000,
    "Answer: " + "{" * 99_000,
    "\x00",
    "12\x00",
    "\ud800Answer: \udfff",
    "",
    "Answer:",
    "12/3",
    "12/34/5",
    f"__import__('os').system('touch {MARKER}')",
    f"Answer: __import__('os').system('touch {MARKER}')",
    f"(lambda: open('{MARKER}', 'w'))()",
]


def with_examples(**others):
    """Decorator: the hostile examples as ``text``, the other arguments of ``@given`` fixed to ``others``."""

    def decorate(fn):
        for text in HOSTILE_EXAMPLES:
            fn = example(text=text, **others)(fn)
        return fn

    return decorate


# --------------------------------------------------------------- grading helpers


@_settings("parser")
@given(text=fuzz_text(in_process=True))
@with_examples()
def test_guards(text):
    count_example("grading.guards")
    depth = timed("grading.guards", IN_PROCESS_BOUND_S, nesting_depth, text)
    ok = timed("grading.guards", IN_PROCESS_BOUND_S, passes_guards, text)
    code = timed("grading.guards", IN_PROCESS_BOUND_S, looks_like_code, text)
    assert isinstance(depth, int) and 0 <= depth <= sum(text.count(c) for c in "([{")
    assert ok is (bool(text.strip()) and "\x00" not in text and len(text) <= MAX_ANSWER_CHARS and depth <= MAX_NESTING_DEPTH)
    assert isinstance(code, bool)
    assert code == looks_like_code(text)
    if _holds_payload(text):
        assert code, "an injection payload is not flagged as code"


@_settings("parser")
@given(text=st.tuples(st.one_of(any_text, soup), injection, st.one_of(any_text, soup)).map("".join))
def test_injection_payloads_are_flagged_and_never_run(text):
    """Any text holding a payload looks like code, and no grader runs it."""
    count_example("grading.looks_like_code[injection]")
    assert timed("grading.looks_like_code[injection]", IN_PROCESS_BOUND_S, looks_like_code, text)
    assert parse_number(text) is None
    nothing_executed()


@_settings("parser")
@given(text=fuzz_text(in_process=True))
@with_examples()
@example(text="\u0663/\u0664")  # Arabic-Indic digits: \d matches them, Fraction must too
@example(text="1,000.")
def test_parse_number(text):
    count_example("grading.parse_number")
    value = timed("grading.parse_number", IN_PROCESS_BOUND_S, parse_number, text)
    assert value is None or isinstance(value, Fraction)
    if value is not None:
        assert passes_guards(text)
        assert parse_number(text) == value
        # The canonical text of the value parses back to it, and a plain number equals itself.
        assert parse_number(str(value)) == value
        assert timed("grading.parse_number", IN_PROCESS_BOUND_S, answers_match, text, text) is True


@_settings("parser")
@given(text=fuzz_text(in_process=True))
@with_examples()
@example(text="\\boxed 5")
@example(text="\\boxed{\\frac{1}{2}")
def test_extract_boxed(text):
    count_example("grading.extract_boxed")
    boxed = timed("grading.extract_boxed", IN_PROCESS_BOUND_S, extract_boxed, text)
    assert boxed is None or (isinstance(boxed, str) and boxed in text)
    assert extract_boxed(text) == boxed


REFERENCES = ["12", "4", "-3/4", "1,000", "\\frac{1}{2}", "x+1", "\\sqrt{2}", "(1, 2)", "2^{10}"]


@_settings("worker")
@given(text=fuzz_text(in_process=False), reference=st.sampled_from(REFERENCES))
@with_examples(reference="12")
@example(text="12 apples", reference="12")
# Found by this fuzzing: math-verify (sympy's evalf of the unevaluated quotient) is
# exponential in the length of a division chain, ~2 s at 16 terms: now refused by a guard.
@example(text="/".join(["2114509537"] * 20), reference="12")
def test_answers_match(text, reference):
    """math equivalence: a bool, the same after the memo is cleared, in bounded time."""
    count_example("grading.answers_match")
    text = fill(text, reference)
    bound = WORKER_TIMEOUT_S + WORKER_ALLOWANCE_S
    restarts = grading.worker_restarts()
    first = timed("grading.answers_match", bound, answers_match, text, reference, WORKER_TIMEOUT_S)
    assert isinstance(first, bool)
    if grading.worker_restarts() != restarts:
        count_timeout("grading.answers_match", text)
        assert first is False  # an overrun scores False by contract
    else:
        grading._math_verify_match.cache_clear()
        again = timed("grading.answers_match", bound, answers_match, text, reference, WORKER_TIMEOUT_S)
        if grading.worker_restarts() == restarts:
            assert again is first
    if not (passes_guards(text) and passes_guards(reference)):
        assert first is False
    nothing_executed()


# ------------------------------------------------------------------ arc parse_grid


@_settings("parser")
@given(text=st.one_of(grid_like(), grid_like(), fuzz_text(in_process=True)), max_side=st.sampled_from([MAX_SIDE, MAX_SIDE, 1, 5]))
@with_examples(max_side=MAX_SIDE)
@example(text="\u0663\u0664/\u0665\u0666", max_side=MAX_SIDE)
@example(text="\u00b2", max_side=MAX_SIDE)
@example(text="/".join(["1" * 30] * 30), max_side=MAX_SIDE)
@example(text="/".join(["1" * 31] * 30), max_side=MAX_SIDE)
def test_parse_grid(text, max_side):
    """parse_grid is strict: None, or a rectangular grid of 0..9 whose text is exactly the input (stripped)."""
    count_example("arc_grids.parse_grid")
    grid = timed("arc_grids.parse_grid", IN_PROCESS_BOUND_S, parse_grid, text, max_side)
    if grid is not None:
        assert isinstance(grid, tuple) and grid and all(isinstance(r, tuple) and r for r in grid)
        assert len({len(r) for r in grid}) == 1 and len(grid) <= max_side and len(grid[0]) <= max_side
        assert all(type(v) is int and 0 <= v <= 9 for r in grid for v in r)
        assert format_grid(grid) == text.strip()
    assert parse_grid(text, max_side) == grid


# -------------------------------------------------------------------- environments


def _check_score(key: str, value) -> None:
    assert type(value) is float and math.isfinite(value), (key, value)
    if key in PARTIAL_CREDIT:
        assert 0.0 <= value <= 1.0, (key, value)
    else:
        assert value in (0.0, 1.0), (key, value)


def _env_examples(key: str) -> int:
    """Examples per env key: fewer for the worker-graded ones (a round-trip per call)."""
    return EXAMPLES["worker"] if key in WORKER_GRADED else EXAMPLES["env"]


@pytest.mark.parametrize("key", list(ENVS))
def test_score(key, env_pool):
    """parse_answer, score and score_episode on fuzzed text: a float in range, bounded time,
    the same on a fresh env reset with the same seed, nothing executed."""
    env = env_pool[key]
    bound = bound_of(key, env)
    target = f"{key}.score"

    @settings(max_examples=_env_examples(key), deadline=None, derandomize=True, database=None)
    @given(text=fuzz_text(in_process=key not in WORKER_GRADED), seed=st.integers(0, 2**31 - 1))
    @with_examples(seed=0)
    def run(text, seed):
        for t in ("parse_answer", "score", "score_episode"):
            count_example(f"{key}.{t}")
        _, info = env.reset(seed=seed)
        text = fill(text, env.reference_answer)
        answer = timed(f"{key}.parse_answer", IN_PROCESS_BOUND_S, env.parse_answer, text)
        if answer is None:
            assert env.answer_marker not in text
        else:
            assert isinstance(answer, str) and env.answer_marker not in answer and answer == answer.strip()

        restarts = grading.worker_restarts()
        rejected = getattr(env, "rejected_answers", 0)
        s1 = timed(target, bound, env.score, text)
        _check_score(key, s1)
        if key in PARTIAL_CREDIT and _holds_payload(text):
            assert env.rejected_answers == rejected + 1, "a payload reached a reasoning-gym scorer"
        timed_out = grading.worker_restarts() != restarts
        if timed_out:  # the grader overran its timeout: 0 by contract
            count_timeout(target, text)
            assert s1 == 0.0
        else:
            grading._math_verify_match.cache_clear()
            fresh = make(key)
            _, fresh_info = fresh.reset(seed=seed)
            assert fresh_info["problem_id"] == info["problem_id"]
            s2 = timed(target, bound, fresh.score, text)
            _check_score(key, s2)
            if grading.worker_restarts() == restarts:
                assert s2 == s1, (ascii(text)[:80], s1, s2)

        nothing_executed()
        if timed_out and key in PARTIAL_CREDIT:
            return  # reasoning-gym's score_episode is score(text.strip()): the same overrun again
        restarts = grading.worker_restarts()
        e1 = timed(f"{key}.score_episode", bound, env.score_episode, text)
        _check_score(key, e1)
        if grading.worker_restarts() != restarts:
            count_timeout(f"{key}.score_episode", text)
            assert e1 == 0.0
        else:
            assert env.score_episode(text) == e1
        nothing_executed()

    run()


@pytest.mark.parametrize("key", list(ENVS))
def test_step(key, env_pool):
    """Whole trials of fuzzed episodes: the 5-tuple with a finite reward in range, the trial
    ends within max_episodes + 1 steps, and a fresh env reset with the same seed replays it."""
    env = env_pool[key]
    bound = bound_of(key, env)
    target = f"{key}.step"
    texts = fuzz_text(in_process=key not in WORKER_GRADED)

    @settings(max_examples=_env_examples(key), deadline=None, derandomize=True, database=None)
    @given(actions=st.lists(texts, min_size=1, max_size=env.max_episodes + 1), seed=st.integers(0, 2**31 - 1))
    @example(actions=["Answer: 10^100000"], seed=0)
    @example(actions=["$10^{10^{10}}$", "(" * 5000, "x" * 100_000, "Answer:"], seed=1)
    @example(actions=["1" * 100_001], seed=2)  # over max_text_length: the documented ValueError
    @example(actions=[f"Answer: __import__('os').system('touch {MARKER}')"], seed=3)
    @example(actions=["\x00", "\ud800", f"exec(\"open('{MARKER}', 'w')\")"], seed=4)
    @example(actions=[REF, REF, REF, REF], seed=5)
    def run(actions, seed):
        count_example(target)
        restarts = grading.worker_restarts()
        trial = play(env, seed, actions, target, bound)
        if grading.worker_restarts() != restarts:
            count_timeout(target, repr(actions))
        else:
            grading._math_verify_match.cache_clear()
            replay = play(make(key), seed, actions, target, bound)
            if grading.worker_restarts() == restarts:
                assert replay == trial
        nothing_executed()

    run()


def play(env, seed: int, actions: list[str], target: str, bound: float) -> list:
    """Reset with ``seed`` and step ``actions`` (then empty episodes) until the trial ends;
    the comparable record of each step."""
    _, info = env.reset(seed=seed)
    record = [info["problem_id"]]
    reference = env.reference_answer
    queue = [fill(a, reference) for a in actions]
    accepted = 0
    while accepted <= env.max_episodes:  # forced after max_episodes, so at most max_episodes + 1 steps
        action = queue.pop(0) if queue else ""
        if len(action) > env.action_space.max_length:
            with pytest.raises(ValueError, match="max_text_length"):
                env.step(action)
            record.append("too long")
            continue
        out = timed(target, bound, env.step, action)
        assert isinstance(out, tuple) and len(out) == 5
        obs, reward, terminated, truncated, info = out
        assert isinstance(obs, str) and type(reward) is float and math.isfinite(reward)
        assert 0.0 <= reward <= 1.0
        assert terminated in (True, False) and truncated is False and isinstance(info, dict)
        assert info["episode_index"] == accepted and info["correct"] in (True, False)
        accepted += 1
        if not terminated:
            assert reward == 0.0
            assert info["forcing_answer"] == (accepted >= env.max_episodes)
        else:
            assert obs == "" and (info["answer"] is None or isinstance(info["answer"], str))
        counters = {"scorer_errors", "rejected_answers"}  # cumulative per env instance
        record.append((obs, reward, terminated, truncated, {k: v for k, v in info.items() if k not in counters}))
        if terminated:
            return record
    raise AssertionError(f"trial did not end within max_episodes + 1 = {env.max_episodes + 1} steps")
