"""envs.grading: exact numbers, math-verify in a bounded worker, guards against hostile answers."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest

from envs import grading
from envs.grading import answers_match, extract_boxed, looks_like_code, parse_number


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("0.5", "1/2"),
        ("12", "12.0"),
        ("$12$", "12"),
        ("\\boxed{12}", "12"),
        ("1,000", "1000"),
        ("-3/4", "-0.75"),
        (" 12. ", "12"),
        ("$\\boxed{7}$", "7"),
        ("+5", "5"),
    ],
)
def test_plain_numbers_compare_exactly(answer, reference):
    assert answers_match(answer, reference)
    assert answers_match(reference, answer)


@pytest.mark.parametrize(
    "answer, reference",
    [("13", "12"), ("0.51", "1/2"), ("-12", "12"), ("1,000", "100"), ("12", "120"), ("1/3", "0.333333")],
)
def test_different_numbers_do_not_match(answer, reference):
    assert not answers_match(answer, reference)


@pytest.mark.parametrize(
    "answer, reference, expected",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("0.5", "\\frac{1}{2}", True),
        ("\\boxed{\\frac{3}{4}}", "0.75", True),
        ("x+1", "1+x", True),
        ("2^{10}", "1024", True),
        ("3\\sqrt{2}", "\\sqrt{18}", True),
        ("12 apples", "12", True),
        ("\\frac{1}{3}", "0.5", False),
        ("1+x", "1", False),
        ("(1, 2)", "2", False),
    ],
)
def test_math_verify_cases(answer, reference, expected):
    assert answers_match(answer, reference) is expected


def test_guards_reject_before_parsing():
    assert not answers_match("1" * 513, "1" * 513)  # over 512 characters: False even if equal
    deep = "(" * 65 + "1" + ")" * 65
    assert not answers_match(deep, "1")
    assert not answers_match("", "")
    assert not answers_match("   ", "12")
    assert not answers_match("12\x00", "12")
    assert not answers_match("12", "12\x00")
    assert answers_match("1" * 512, "1" * 512)  # the limit itself is allowed


def test_long_division_chains_are_refused_without_the_worker():
    """math-verify is exponential in a division chain's length (~2 s at 16 terms): over
    MAX_DIVISIONS slashes the answer scores False at once, without a worker round-trip."""
    chain = "/".join(["2114509537"] * 20)
    restarts = grading.worker_restarts()
    start = time.monotonic()
    assert answers_match(chain, "12") is False
    assert answers_match("$" + "/".join(["24", "2"] + ["1"] * 18) + "$", "12") is False  # equal, but refused
    assert time.monotonic() - start < 0.5
    assert grading.worker_restarts() == restarts
    # At the limit the chain still goes to math-verify: 24/2/1/.../1 with 10 slashes is 12.
    at_limit = "$" + "/".join(["24", "2"] + ["1"] * (grading.MAX_DIVISIONS - 1)) + "$"
    assert at_limit.count("/") == grading.MAX_DIVISIONS
    assert answers_match(at_limit, "12") is True


# Answers that divide by a zero literal: sympy makes them zoo or nan (or, for ``(1/0)^0``,
# 1: zoo**0 == 1), which equals no reference; math-verify would only be asked to say so.
ZERO_DIVISIONS = [
    "\\boxed{0/0}",
    "0/0",
    "1/0",
    "0/0+1",
    "\\frac{0}{0}",
    "\\frac{1}{0}",
    "$\\dfrac{3}{0}$",
    "\\frac10",
    "\\frac{1}{ 0.0 }",
    "x/0",
    "1 / 0.0",
    "-1/(0)",
    "2/{-0}",
    "2\\div 0",
    "{1 \\over 0}",
    "7/0.",
    "1/00",
    "(1/0)^0",
    "\\left(\\frac{1}{0}\\right)^0",
    "12 apples/0",
    "$0/0$.",
]
# Near misses that are ordinary numbers: they must still reach the exact path or math-verify.
NOT_ZERO_DIVISIONS = [
    "10/2",
    "0/5",
    "1/0.5",
    "1/.5",
    "1/05",
    "1/0!",
    "\\frac{1}{0!}",
    "\\frac{0}{5}",
    "\\frac{1}{0.5}",
    "\\frac{10}{2}",
    "1/20",
    "10/0.25",
    "3/(0+1)",
    "0.5",
    "\\frac{1}{2}",
    "x/0y",
    "1/0^0",
    "2/0x",
]


def test_division_by_zero_is_refused_without_the_worker(monkeypatch):
    """``\\boxed{0/0}`` and its relatives score False in-process: they never reach
    math-verify, so they never start (or wait for) a cold grading worker."""

    def no_math_verify(*args):
        raise AssertionError(f"reached math-verify: {args!r}")

    monkeypatch.setattr(grading, "_math_verify_match", no_math_verify)
    slowest = 0.0
    for answer in ZERO_DIVISIONS:
        for reference in ["12", "1", "0", "\\frac{1}{2}", "x+1", "\\infty", answer]:  # an undefined value equals nothing
            for a, r in ((answer, reference), (reference, answer)):
                start = time.perf_counter()
                assert answers_match(a, r) is False, (a, r)
                slowest = max(slowest, time.perf_counter() - start)
    assert slowest < 0.1, slowest
    assert all(grading.divides_by_zero(answer) for answer in ZERO_DIVISIONS)


def test_near_zero_divisions_are_not_refused():
    for text in NOT_ZERO_DIVISIONS:
        assert not grading.divides_by_zero(text), text


def test_a_dataset_reference_that_divides_by_zero_is_refused_at_load(tmp_path):
    """No answer can equal such a reference (not even the expert's), so the loader names
    the record instead of leaving an unwinnable problem in the data."""
    from envs.math_env import MathEnv

    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "1/0?", "solution": "It is $\\\\boxed{\\\\frac{1}{0}}$."}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*divides by zero"):
        MathEnv(dataset=str(path))


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("10/2", "5"),
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("0/5", "0"),
        ("\\frac{0}{5}", "0"),
        ("1/0.5", "2"),
        ("\\frac{1}{0.5}", "2"),
        ("1/05", "0.2"),
        ("10/0.25", "40"),
        ("\\frac{1}{0!}", "1"),
        ("\\boxed{\\frac{10}{2}}", "5"),
        ("3/(0+1)", "3"),
    ],
)
def test_legitimate_fractions_still_grade(answer, reference):
    assert answers_match(answer, reference) is True
    assert answers_match(reference, answer) is True


@pytest.mark.parametrize("reference", ["12", "\\frac{1}{2}"])  # numeric and symbolic references
@pytest.mark.parametrize(
    "answer",
    [
        "__import__('os').system('touch {marker}')",
        "$__import__('os').system('touch {marker}')$",
        "\\boxed{__import__('os').system('touch {marker}')}",
        "9**9**9**9",
        "10**10**10",
        "$10^{10^{10}}$",
        "(" * 10_000 + ")" * 10_000,
        "x" * 200_000,
        "1" * 200_000,
        "\x00\x00",
        "",
    ],
)
def test_hostile_answers_are_false_and_bounded(answer, reference, tmp_path):
    marker = tmp_path / "pwned"
    answer = answer.replace("{marker}", str(marker))
    start = time.monotonic()
    assert answers_match(answer, reference) is False
    assert time.monotonic() - start < 5.0
    assert not marker.exists()


def test_worker_is_restarted_after_a_timeout():
    assert answers_match("\\frac{2}{4}", "0.5")  # worker up and warm
    restarts = grading.worker_restarts()
    start = time.monotonic()
    assert answers_match("$10^{10^{10}}$", "12", timeout_s=0.3) is False  # sympy would compute it
    assert time.monotonic() - start < 5.0
    assert grading.worker_restarts() == restarts + 1
    assert answers_match("\\frac{1}{2}", "0.5")  # a fresh worker grades again
    assert grading.worker_restarts() == restarts + 1


def test_parse_number_never_evaluates():
    assert parse_number("-3/4") == Fraction(-3, 4)
    assert parse_number("1,234.5") == Fraction(12345, 10)
    assert parse_number("\\boxed{\\boxed{2}}") == 2
    for text in ["1/0", "1e5", "2**3", "1+1", "0x10", "1,23", "abc", "", "\\boxed{1}+\\boxed{2}"]:
        assert parse_number(text) is None, text


def test_extract_boxed():
    assert extract_boxed("so \\boxed{\\frac{1}{2}} and finally \\boxed{3}") == "3"
    assert extract_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("$x = \\boxed 5$") == "5"
    assert extract_boxed("\\fbox{7}") == "7"
    assert extract_boxed("\\boxed{\\frac{1}{2}") is None  # unclosed
    assert extract_boxed("no box") is None


def test_looks_like_code():
    for code in ["open('/tmp/x', 'w')", "__import__('os')", "[open][0]('x')", "(lambda: 0)()", "exec ('1')", "''.join(x)"]:
        assert looks_like_code(code), code
    for text in ["(3 + 5) * 7 - 2", "x**2 + sin(x) + C", "[[1, 2], [3, 4]]", "Alice is a knight.", "2 × 433"]:
        assert not looks_like_code(text), text
