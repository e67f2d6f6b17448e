"""bench/math_arithmetic.py: the counts it reads from a transcripts file, on hand-built trials."""

import pytest

from tests.support import load_script


def trial(prompt: str, episodes: list[str], outcome: int) -> str:
    body = "".join(f"\n-- J = 0.000 --\n[episode {i}]\n{e}\n" for i, e in enumerate(episodes))
    return (
        f"=== math.jsonl:test:0: outcome {outcome}, 20 policy tokens ===\n[prompt]\n<|im_start|>user\n{prompt}\n"
        f"<|im_end|>\n<|im_start|>assistant\n{body}=== answer 'x' -> outcome {outcome} ===\n\n"
    )


def test_counts_operands_and_results_per_form():
    mod = load_script("bench/math_arithmetic.py")
    text = "".join(
        [
            trial("What is $11+19$?", ["Adding, $11+19=30$, so the answer is $\\boxed{30}$. Answer: 30"], 1),  # all right
            trial("What is $11+19$?", ["Adding, $117+17=33$. Answer: 33"], 0),  # operands wrong
            trial("What is $11+19$?", ["31", "Wait, $11+19=24$. Answer: 24"], 0),  # in a later episode; result wrong
            trial("Compute $9-4$.", ["Answer: 5"], 1),  # no equation written
            trial("Compute $3\\cdot 4$.", ["We multiply: $3\\cdot 4=12$. Answer: 12"], 1),
            trial("Solve $x+5=12$ for $x$.", ["Subtract $5$ from both sides: $x=8$. So $x=\\boxed{8}$."], 0),
            trial("Solve $x+5=12$ for $x$.", ["Subtract $2$ from both sides: $x=7$."], 1),  # operand wrong
        ]
    )
    got = mod.parse(text)
    assert got["all"] == {"trials": 7, "writes_equation": 6, "operands_right": 4, "result_right_given_operands": 2}
    assert got["by_form"]["a+b"] == {"trials": 3, "writes_equation": 3, "operands_right": 2, "result_right_given_operands": 1}
    assert got["by_form"]["a-b"] == {"trials": 1, "writes_equation": 0, "operands_right": 0, "result_right_given_operands": 0}
    assert got["by_form"]["x+a=c"] == {"trials": 2, "writes_equation": 2, "operands_right": 1, "result_right_given_operands": 0}
    assert got["successes"] == 4
    with pytest.raises(ValueError, match="no known form: 'What is love'"):
        mod.parse(trial("What is love", ["Answer: 1"], 0))
