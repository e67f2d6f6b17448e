"""Math problems: a tiny embedded arithmetic generator, or any MATH-style dataset.

The embedded default is sized for the laptop-CPU main job: a ~1M-parameter
character-level model learns one-digit sums and differences in minutes (FINDINGS:
three 2-digit terms were not learnable in two minutes). The operands are drawn here
rather than by reasoning-gym's ``basic_arithmetic``: that generator draws operands
from ``0..10**digits`` inclusive (so "one digit" includes 10) and cannot honour a
``min_value``/``max_value`` range; the expression is three lines of code either way.
"""

from __future__ import annotations

import functools
import json
import os
import re
from fractions import Fraction
from typing import Any

import numpy as np

from envs.base import SPLITS, EpisodicTextEnv, Problem, split_of
from envs.grading import MAX_ANSWER_CHARS, answers_match, divides_by_zero, extract_boxed, parse_number

_OPS = "+-*/"
_NAMES = ("Tom", "Ann", "Sam", "Mia")
_ITEMS = ("apple", "pen", "card", "egg")
_LAST_NUMBER_RE = re.compile(r"(?<![\d)])-?\d+(?:\.\d+)?(?:/\d+)?")
_MAX_DRAWS = 1000

# ----------------------------------------------------------- embedded generator


def _evaluate(terms: tuple[int, ...], ops: tuple[str, ...]) -> Fraction | None:
    """Exact value with the usual precedence (``*`` and ``/`` first); None on division by zero."""
    products, adds = [Fraction(terms[0])], []
    for op, t in zip(ops, terms[1:]):
        if op == "*":
            products[-1] *= t
        elif op == "/":
            if t == 0:
                return None
            products[-1] /= t
        else:
            adds.append(op)
            products.append(Fraction(t))
    value = products[0]
    for op, v in zip(adds, products[1:]):
        value = value + v if op == "+" else value - v
    return value


def _format_expr(terms: tuple[int, ...], ops: tuple[str, ...]) -> str:
    out = str(terms[0])
    for op, t in zip(ops, terms[1:]):
        out += op + (f"({t})" if t < 0 else str(t))
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _word_problem(terms: tuple[int, ...], ops: tuple[str, ...], name: str, item: str) -> str | None:
    """A short story with the same arithmetic, or None when none fits (negatives, mixed ops)."""
    if min(terms) < 0:
        return None
    if len(ops) == 1 and ops[0] == "*":
        return f"{name} has {_plural(terms[0], 'bag')} of {_plural(terms[1], item)}. How many {item}s?"
    if len(ops) == 1 and ops[0] == "/":
        return f"{name} shares {_plural(terms[0], item)} among {_plural(terms[1], 'kid')}. How many each?"
    if not set(ops) <= {"+", "-"}:
        return None
    parts, running = [f"{name} has {_plural(terms[0], item)}"], terms[0]
    for op, t in zip(ops, terms[1:]):
        running += t if op == "+" else -t
        if running < 0:
            return None
        parts.append(f"gets {t} more" if op == "+" else f"gives away {t}")
    return " and ".join(parts) + ". How many now?"


@functools.lru_cache(maxsize=32)
def _generated_problems(
    ops: str,
    min_value: int,
    max_value: int,
    num_terms: int,
    word_fraction: float,
    size: int,
    seed: int,
    test_fraction: float,
) -> dict[str, tuple[dict, ...]]:
    """The embedded problem pool: ``size`` seeded draws, one problem per distinct expression.

    Each expression is told in one form (a story with probability ``word_fraction``),
    and the split key is the expression, so no arithmetic straddles the split.
    """
    rng = np.random.default_rng([seed, 1])
    seen: set[str] = set()
    pools: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for _ in range(size):
        for _attempt in range(_MAX_DRAWS):
            terms = tuple(int(t) for t in rng.integers(min_value, max_value + 1, size=num_terms))
            expr_ops = tuple(str(o) for o in rng.choice(list(ops), size=num_terms - 1))
            value = _evaluate(terms, expr_ops)
            if value is not None and value.denominator == 1:
                break
        else:
            raise ValueError(
                f"MathEnv: no integer-valued expression in {_MAX_DRAWS} draws with ops={ops!r}, "
                f"values {min_value}..{max_value}; widen the range or drop '/'"
            )
        expr = _format_expr(terms, expr_ops)
        tell = rng.random() < word_fraction
        name, item = str(rng.choice(_NAMES)), str(rng.choice(_ITEMS))
        if expr in seen:
            continue
        seen.add(expr)
        question = (tell and _word_problem(terms, expr_ops, name, item)) or f"{expr}=?"
        pools[split_of(expr, test_fraction)].append(
            {"question": question, "answer": str(int(value)), "expr": expr, "terms": terms, "ops": expr_ops}
        )
    return {s: tuple(p) for s, p in pools.items()}


# ----------------------------------------------------------------------- loader


def _gsm8k_final(answer: str) -> str | None:
    """The final answer of a GSM8K-style answer field (the worked solution, then a line
    ``#### <answer>``), thousands separators removed; None when the field has no such line."""
    head, sep, tail = answer.rpartition("####")
    if not sep or (head and not head.endswith("\n")):
        return None  # "####" inside a line is not GSM8K's marker
    final = tail.strip().replace(",", "")
    if not final:
        raise ValueError(f"GSM8K-style answer ends with '####' but no final answer after it: {answer[-80:]!r}")
    return final


def _record(row: Any, where: str, problem_key: str, answer_key: str, solution_key: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with {problem_key!r}, got {type(row).__name__}")
    problem = row.get(problem_key)
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"{where}: missing or empty {problem_key!r} (keys: {sorted(row)[:10]})")
    solution = row.get(solution_key)
    solution = solution if isinstance(solution, str) else None
    answer = row.get(answer_key)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        answer = extract_boxed(solution) if solution else None
        if answer is None:
            raise ValueError(f"{where}: no {answer_key!r} and no \\boxed{{}} answer in {solution_key!r}")
    answer = str(answer).strip()
    final = _gsm8k_final(answer)
    if final is not None:  # GSM8K: "<worked solution>\n#### <final answer>"
        solution = solution or answer[: answer.rindex("####")].strip() or None
        answer = final
    if len(answer) > MAX_ANSWER_CHARS:
        raise ValueError(f"{where}: answer of {len(answer)} characters exceeds the grader's limit of {MAX_ANSWER_CHARS}")
    if divides_by_zero(answer):
        # Undefined: the grader matches no answer to it, the expert's included.
        raise ValueError(f"{where}: answer {answer!r} divides by zero, so no answer can match it; fix or drop the record")
    return {"question": problem, "answer": answer, "solution": solution, "where": where}


def _read_jsonl(path: str, keys: tuple[str, str, str]) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines carry no record
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            records.append(_record(row, where, *keys))
    return records


def _read_parquet(path: str, keys: tuple[str, str, str]) -> list[dict]:
    import pyarrow.parquet as pq  # deferred: start-up cost (pyarrow loads only for a Parquet dataset file)

    rows = pq.read_table(path).to_pylist()
    return [_record(row, f"{path} row {i}", *keys) for i, row in enumerate(rows, 1)]


@functools.lru_cache(maxsize=16)
def _loaded_file(path: str, mtime_ns: int, keys: tuple[str, str, str]) -> tuple[dict, ...]:
    if path.endswith(".jsonl"):
        records = _read_jsonl(path, keys)
    elif path.endswith(".parquet"):
        records = _read_parquet(path, keys)
    else:
        raise ValueError(f"MathEnv: unsupported dataset file {path!r}; expected .jsonl or .parquet")
    if not records:
        raise ValueError(f"MathEnv: dataset file {path!r} holds no records")
    return tuple(records)


@functools.lru_cache(maxsize=16)
def _loaded_hub(name: str, split: str | None, keys: tuple[str, str, str]) -> dict[str | None, tuple[dict, ...]]:
    """Records of a hub dataset by its own split names (one ``None`` entry when ``split`` is given)."""
    import datasets  # deferred: start-up cost (datasets loads only when it is needed)

    loaded = datasets.load_dataset(name, split=split) if split else datasets.load_dataset(name)
    parts = {split: loaded} if split else dict(loaded)
    return {
        part: tuple(_record(row, f"{name} [{part}] row {i}", *keys) for i, row in enumerate(rows, 1))
        for part, rows in parts.items()
    }


def _is_local(dataset: str) -> bool:
    return os.path.exists(os.path.expanduser(dataset)) or dataset.endswith((".jsonl", ".parquet", ".json"))


# -------------------------------------------------------------------------- env


class MathEnv(EpisodicTextEnv):
    """Math word problems and arithmetic, graded by exact numbers or math-verify.

    A Gymnasium episode (reset -> terminated) is one **trial**; one ``step`` consumes
    one **episode** (an attempt at the sum, a check, the final answer).

    With ``dataset=None`` (default) problems are generated: ``num_terms`` integers in
    ``[min_value, max_value]`` joined by operators from ``ops`` (integer results only),
    shown as ``"7+5=?"`` or, with probability ``word_fraction``, as a short story with
    the same arithmetic (``"Tom has 7 apples and gets 5 more. How many now?"``).
    Otherwise ``dataset`` is a ``.jsonl`` or ``.parquet`` file or a Hugging Face hub id
    with MATH-style records (``problem``, ``answer`` or a ``solution`` with ``\\boxed{}``)
    or GSM8K-style ones (an ``answer`` holding the worked solution and a last line
    ``#### <final answer>``: the final answer is graded, the rest is the solution; GSM8K
    names its problem field ``question``, so set ``problem_key="question"``).

    Example trial (default generator, prompt then episodes, one per line)::

        Prompt:    "7+5=?\\n"
        Episode 0: "7+5=11"             (a failed attempt; reward 0)
        Episode 1: "7+5=12 Answer: 12"  (commits "12"; reward 1.0)

    +--------------------+---------------------------------------------------------------+
    | Observation space  | ``UnicodeText``: the problem + ``episode_delimiter``; then    |
    |                    | ``""`` per episode, ``"[correct]"``/``"[wrong]"`` with        |
    |                    | ``feedback=True``, or ``forced_answer_text``                  |
    | Action space       | ``UnicodeText``: the text of one episode (no delimiter)       |
    | Reward             | 0 per uncommitted episode; at termination 1.0 iff the answer  |
    |                    | equals the reference (:func:`envs.grading.answers_match`)     |
    | Termination        | an episode contains ``answer_marker`` (the text after it is   |
    |                    | the answer), or the forced answer after ``max_episodes``      |
    | Truncation         | never (the forced answer ends a trial)                        |
    | ``reset`` options  | ``{"index": i}``: problem ``i`` of the split                  |
    +--------------------+---------------------------------------------------------------+

    Keyword arguments (``gymnasium.make("metarl/Math-v0", **kwargs)``):

    +------------------------+-------------+-------------------------------------------------+
    | kwarg                  | default     | meaning                                         |
    +========================+=============+=================================================+
    | ``dataset``            | None        | None: the generator; else a ``.jsonl`` /        |
    |                        |             | ``.parquet`` path or a hub id                   |
    | ``dataset_split``      | None        | None: split the records by a hash of the        |
    |                        |             | problem text (a hub dataset with its own        |
    |                        |             | ``train``/``test`` splits uses them); a name:   |
    |                        |             | load that split (hub) or take the whole file,   |
    |                        |             | as this env's ``split``, with no hashing        |
    | ``problem_key``        | "problem"   | record field with the problem text              |
    | ``answer_key``         | "answer"    | record field with the reference answer          |
    | ``solution_key``       | "solution"  | record field whose last ``\\boxed{}`` is the     |
    |                        |             | answer when ``answer_key`` is absent            |
    | ``ops``                | "+-"        | generator: operators to draw from ``+-*/``      |
    | ``min_value``          | 0           | generator: smallest operand                     |
    | ``max_value``          | 5           | generator: largest operand                      |
    | ``num_terms``          | 3           | generator: operands per expression              |
    | ``word_fraction``      | 0.25        | generator: share of problems told as a story    |
    | ``size``               | 5000        | generator: seeded draws (one problem per        |
    |                        |             | distinct expression)                            |
    | ``seed``               | 0           | generator: seed of the draws                    |
    | ``test_fraction``      | 0.2         | share hashed into ``test``                      |
    | ``num_test_problems``  | 256         | at most this many test problems (the first in   |
    |                        |             | draw or file order); None: all. The default     |
    |                        |             | generator has only 44 test expressions          |
    | ``grading_timeout_s``  | 2.0         | wall-clock bound of one math-verify comparison  |
    | ``split``              | "train"     | ``"train"`` or ``"test"``                       |
    | ``max_episodes``       | 3           | episodes before an answer is forced             |
    | ``answer_marker``      | "Answer:"   | text that commits a final answer                |
    | ``forced_answer_text`` | "Answer:"   | observation that makes the policy answer now    |
    | ``episode_delimiter``  | ``"\\n"``     | ends the prompt and each episode                |
    | ``feedback``           | False       | verdict on each uncommitted episode             |
    | ``max_text_length``    | 100000      | longest episode text accepted                   |
    +------------------------+-------------+-------------------------------------------------+

    Generator options are ignored when ``dataset`` is set. The generator's split key
    is the expression (``"7+5"``), so a sum and its stories never straddle the split.
    Loading errors name the file and line (JSONL) or row: a missing file, invalid
    JSON, a non-object record, a record with neither answer nor boxed solution, an
    answer too long for the grader, or one that divides by zero (which nothing matches). Blank JSONL lines are allowed.

    Expert traces: ``n_failed`` wrong attempts (a wrong result: off by one, a wrong
    operation, a dropped term), then the equation with the right result and the
    committed answer. ``variety`` is the probability that each episode takes a varied
    form (commuted operands, ``"is"`` or ``", so"`` wording, random wrong results) instead of
    the canonical one (``"7+5=11"``, ``"7+5=12 Answer: 12"``). Loaded problems have no
    equation: failed episodes are perturbed answers, the last writes the record's solution
    text (when it has one) and commits the reference (varied: one form in four commits the
    answer alone, as a generated sum's "Answer: 12").
    """

    def __init__(
        self,
        *,
        dataset: str | None = None,
        dataset_split: str | None = None,
        problem_key: str = "problem",
        answer_key: str = "answer",
        solution_key: str = "solution",
        ops: str = "+-",
        min_value: int = 0,
        max_value: int = 5,
        num_terms: int = 3,
        word_fraction: float = 0.25,
        size: int = 5000,
        seed: int = 0,
        test_fraction: float = 0.2,
        num_test_problems: int | None = 256,
        grading_timeout_s: float = 2.0,
        **base_kwargs,
    ):
        # split, max_episodes, answer_marker, ... : EpisodicTextEnv's keywords, whose
        # explicit signature rejects an unknown option by name.
        super().__init__(**base_kwargs)
        name = type(self).__name__
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"{name}: test_fraction must be in (0, 1), got {test_fraction}")
        if grading_timeout_s <= 0:
            raise ValueError(f"{name}: grading_timeout_s must be positive, got {grading_timeout_s}")
        if num_test_problems is not None and num_test_problems < 1:
            raise ValueError(f"{name}: num_test_problems must be >= 1 or None, got {num_test_problems}")
        self.grading_timeout_s = float(grading_timeout_s)
        self.dataset = dataset
        if dataset is None:
            if not ops or set(ops) - set(_OPS):
                raise ValueError(f"{name}: ops must be a non-empty string of {_OPS!r}, got {ops!r}")
            if min_value > max_value:
                raise ValueError(f"{name}: min_value ({min_value}) > max_value ({max_value})")
            if num_terms < 1 or size < 1:
                raise ValueError(f"{name}: num_terms and size must be >= 1, got {num_terms}, {size}")
            if not 0.0 <= word_fraction <= 1.0:
                raise ValueError(f"{name}: word_fraction must be in [0, 1], got {word_fraction}")
            self._records = _generated_problems(
                "".join(sorted(set(ops), key=_OPS.index)),
                int(min_value),
                int(max_value),
                int(num_terms),
                float(word_fraction),
                int(size),
                int(seed),
                float(test_fraction),
            )[self.split]
            self._source = "arith"
        else:
            self._records = self._load(dataset, dataset_split, (problem_key, answer_key, solution_key), test_fraction)
            self._source = os.path.basename(dataset) if _is_local(dataset) else dataset
        if self.split == "test" and num_test_problems is not None:
            self._records = self._records[:num_test_problems]
        if not self._records:
            raise ValueError(f"{name}: the {self.split!r} split is empty; add problems or change test_fraction")

    def _load(self, dataset: str, dataset_split: str | None, keys: tuple[str, str, str], test_fraction: float):
        if _is_local(dataset):
            path = os.path.abspath(os.path.expanduser(dataset))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"MathEnv: dataset file not found: {path}")
            records = _loaded_file(path, os.stat(path).st_mtime_ns, keys)
            if dataset_split is not None:
                return records  # the file is that split
        else:
            parts = _loaded_hub(dataset, dataset_split, keys)
            if dataset_split is not None:
                return parts[dataset_split]
            if self.split in parts:
                return parts[self.split]  # the dataset's own split
            records = tuple(r for part in parts.values() for r in part)
        return tuple(r for r in records if split_of(r["question"], test_fraction) == self.split)

    @property
    def num_problems(self) -> int:
        return len(self._records)

    def _problem(self, index: int) -> Problem:
        r = self._records[index]
        pid = f"arith:{r['question']}" if self.dataset is None else f"{self._source}:{self.split}:{index}"
        return Problem(problem_id=pid, prompt=r["question"] + self.episode_delimiter, reference=r["answer"], data=r)

    # ------------------------------------------------------------------ grading
    def score(self, answer_text: str) -> float:
        """1.0 iff the answer equals the reference (:func:`envs.grading.answers_match`), else 0.0."""
        return float(answers_match(answer_text, self.reference_answer, self.grading_timeout_s))

    def score_episode(self, episode_text: str) -> float:
        """Score of the episode's last ``\\boxed{}`` or, failing that, its last number."""
        if not isinstance(episode_text, str):
            return 0.0
        candidate = extract_boxed(episode_text)
        if candidate is None:
            numbers = _LAST_NUMBER_RE.findall(episode_text[-MAX_ANSWER_CHARS:])
            candidate = numbers[-1] if numbers else None
        return 0.0 if candidate is None else self.score(candidate)

    # ------------------------------------------------------------ expert traces
    def expert_trace(self, rng: np.random.Generator, n_failed: int, variety: float) -> list[str]:
        if not 0 <= n_failed < self.max_episodes:
            raise ValueError(f"expert_trace: n_failed must be in [0, max_episodes={self.max_episodes}), got {n_failed}")
        if not 0.0 <= variety <= 1.0:
            raise ValueError(f"expert_trace: variety must be in [0, 1], got {variety}")
        data, m = self.problem.data, self.answer_marker
        if "expr" in data:
            return [self._arith_miss(rng, j, variety) for j in range(n_failed)] + [self._arith_hit(rng, variety)]
        ref = self.reference_answer
        episodes = [self._loaded_miss(rng, j, variety) for j in range(n_failed)]
        solution = (data.get("solution") or "").replace("\n", " ").strip()
        # The solution is the record's working, as "7+5=12" is a generated sum's: the canonical
        # episode writes it out, and a varied one (one form in four, as _arith_hit) skips to the answer.
        bare = not solution or (rng.random() < variety and int(rng.integers(0, 4)) == 3)
        episodes.append(f"{m} {ref}" if bare else f"{solution} {m} {ref}")
        return episodes

    def _commuted(self) -> str:
        """The expression with its first two operands swapped where that keeps its value."""
        terms, ops = self.problem.data["terms"], self.problem.data["ops"]
        if len(ops) >= 1 and ops[0] in "+*" and (ops[0] == "*" or len(ops) == 1 or ops[1] in "+-"):
            return _format_expr((terms[1], terms[0]) + terms[2:], ops)
        return self.problem.data["expr"]

    def _arith_miss(self, rng: np.random.Generator, j: int, variety: float) -> str:
        expr, value = self.problem.data["expr"], int(self.reference_answer)
        delta = (j // 2 + 1) * (-1 if j % 2 == 0 else 1)  # -1, +1, -2, +2, ...
        steps = self._steps(slip=delta if rng.random() >= variety else int(rng.choice([-2, -1, 1, 2])))
        if steps is not None:  # a slip in the last step of the working
            return steps
        if rng.random() >= variety:
            return f"{expr}={value + delta}"
        wrong = self._wrong_result(rng, value)
        form = int(rng.integers(0, 4))
        return (f"{expr}={wrong}", f"{self._commuted()}={wrong}", f"{expr} is {wrong}", f"I get {wrong}")[form]

    def _wrong_result(self, rng: np.random.Generator, value: int) -> int:
        terms, ops = self.problem.data["terms"], self.problem.data["ops"]
        for _ in range(100):
            kind = int(rng.integers(0, 3))
            if kind == 0:  # arithmetic slip
                wrong = value + int(rng.choice([-10, -2, -1, 1, 2, 10]))
            elif kind == 1 and ops:  # wrong operation
                i = int(rng.integers(0, len(ops)))
                swapped = ops[:i] + ({"+": "-", "-": "+", "*": "+", "/": "*"}[ops[i]],) + ops[i + 1 :]
                v = _evaluate(terms, swapped)
                wrong = int(v) if v is not None and v.denominator == 1 else value + 1
            else:  # dropped the last term
                v = _evaluate(terms[:-1], ops[:-1]) if ops else None
                wrong = int(v) if v is not None and v.denominator == 1 else value - 1
            if wrong != value:
                return wrong
        return value + 1

    def _steps(self, slip: int = 0) -> str | None:
        """Left-to-right working for chains of + and - ("3+5=8 8-1=7"), the last result
        off by ``slip``; None for two terms or other operators (no working needed)."""
        terms, ops = self.problem.data["terms"], self.problem.data["ops"]
        if len(ops) < 2 or any(o not in "+-" for o in ops):
            return None
        acc, parts = terms[0], []
        for k, (o, t) in enumerate(zip(ops, terms[1:])):
            new = acc + t if o == "+" else acc - t
            if k == len(ops) - 1:
                new += slip
            parts.append(f"{acc}{o}{t}={new}")
            acc = new
        return " ".join(parts)

    def _arith_hit(self, rng: np.random.Generator, variety: float) -> str:
        expr, v, m = self.problem.data["expr"], self.reference_answer, self.answer_marker
        steps = self._steps()
        if steps is not None:  # multi-step chains: the expert shows its working
            return f"{steps} {m} {v}" if rng.random() >= variety or rng.random() < 0.5 else f"{steps}, so {m} {v}"
        if rng.random() >= variety:
            return f"{expr}={v} {m} {v}"
        form = int(rng.integers(0, 4))
        return (f"{expr}={v} {m} {v}", f"{self._commuted()}={v} {m} {v}", f"{expr}={v}, so {m} {v}", f"{m} {v}")[form]

    def _loaded_miss(self, rng: np.random.Generator, j: int, variety: float) -> str:
        ref = self.reference_answer
        varied = rng.random() < variety
        delta = int(rng.choice([-3, -2, -1, 1, 2, 3])) if varied else (j // 2 + 1) * (-1 if j % 2 == 0 else 1)
        value = parse_number(ref)
        if value is not None:
            wrong = value + delta
            return str(wrong.numerator) if wrong.denominator == 1 else f"{wrong.numerator}/{wrong.denominator}"
        return f"\\boxed{{{ref}{'+' if delta > 0 else '-'}{abs(delta)}}}"
