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
