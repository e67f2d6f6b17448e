"""Bounded, safe grading of model answers.

Model text is hostile input: it can be huge, deeply nested, or crafted to make a
symbolic grader run forever (``9**9**9**9``) or to run code (``__import__('os')...``).
Everything here is bounded in time and never evaluates model text in this process:

- :func:`answers_match` compares a final answer with a reference. Plain numbers are
  compared exactly with :class:`fractions.Fraction` in-process (no ``eval``); answers
  that cannot equal anything (a division by a zero literal, a long division chain) score
  False in-process too; anything else goes to math-verify in a persistent **grading
  worker** process.
- :func:`score_reasoning_gym` runs a reasoning-gym scorer in the same worker. Some of
  those scorers ``eval`` the answer or pass it to sympy's ``parse_expr`` (which also
  evaluates), so answers that look like code (:func:`looks_like_code`) are rejected
  before they get there, and the worker bounds the time and memory of what remains.

The grading worker is a plain ``python`` subprocess speaking length-prefixed pickles on
its stdin/stdout. It is started lazily, reused for every call, and killed and restarted
when a call overruns its wall-clock timeout (the kill is the real bound: math-verify's
own ``signal.alarm`` timeouts are switched off, they fail outside the main thread).
A subprocess rather than ``multiprocessing``: a spawned ``multiprocessing`` child
re-imports the entry script (torch, transformers, ...) before it can grade anything,
and ``multiprocessing`` refuses to start children from daemonic processes such as
Gymnasium's ``AsyncVectorEnv`` workers. The worker is POSIX-only (``select`` on a pipe).

This module imports only the standard library at top level: the worker loads it by
file path, without importing the ``envs`` package.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import json
import logging
import os
import pickle
import re
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from typing import Any

MAX_ANSWER_CHARS = 512
"""Answers (and references) longer than this score False without being parsed."""
MAX_NESTING_DEPTH = 64
"""Answers whose ``()[]{}`` nesting is deeper than this score False without being parsed."""
MAX_DIVISIONS = 10
"""Answers (or references) with more ``/`` than this score False instead of going to
math-verify: its comparison is exponential in the length of a plain division chain
(``a/b/c/...``: ~2 s at 16 terms, found by tests/envs/test_fuzz.py), so a long chain would only
run into the grading timeout and cost a worker restart. Plain ``a/b`` fractions are
compared in-process before this check."""
SETUP_TIMEOUT_S = 120.0
"""Bound on the worker's one-off imports (math-verify, reasoning-gym) after a (re)start."""
WORKER_MEMORY_HEADROOM = 2 << 30
"""Address space the worker may grow by while grading (bytes), on top of its imports."""

# ----------------------------------------------------------------- pre-guards


def nesting_depth(text: str) -> int:
    """Deepest nesting of ``()[]{}`` in ``text`` (unbalanced closers are ignored)."""
    depth = best = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            if depth > best:
                best = depth
        elif ch in ")]}" and depth:
            depth -= 1
    return best


def passes_guards(text: str, max_chars: int = MAX_ANSWER_CHARS) -> bool:
    """Cheap checks every answer must pass before any parser sees it.

    Rejects non-strings, empty or blank text, NUL bytes, text over ``max_chars``
    characters and ``()[]{}`` nesting deeper than :data:`MAX_NESTING_DEPTH`.
    """
    if not isinstance(text, str) or not text.strip() or "\x00" in text or len(text) > max_chars:
        return False
    return nesting_depth(text) <= MAX_NESTING_DEPTH


# A zero literal: 0, 00, 0.0, 0., .0, signed.
_ZERO = r"[+-]?(?:0+(?:\.0*)?|\.0+)"
# ``/``, ``\div``, ``\over`` or ``÷`` followed by a zero literal (bare, or alone in ``()`` or
# ``{}``) that nothing binding tighter continues: ``1/0.5``, ``1/0!``, ``1/0^2``, ``1/0x``
# and ``1/0**2`` are left alone, ``1/0+1``, ``(1/0)^0`` and ``\boxed{0/0}`` are not.
_ZERO_DIVISOR_RE = re.compile(
    r"(?:/|\\div(?![A-Za-z])|\\over(?![A-Za-z])|\u00f7)\s*"
    rf"(?:\(\s*{_ZERO}\s*\)|\{{\s*{_ZERO}\s*\}}|{_ZERO})"
    r"(?=\s*(?:$|[)\]}=$+\-/]|\*(?!\*)|\\(?:right|cdot|times|div)(?![A-Za-z])))"
)
_ZERO_ARG_RE = re.compile(rf"\s*(?:{_ZERO}|\(\s*{_ZERO}\s*\))\s*")
_FRAC_RE = re.compile(r"\\[dtc]?frac(?![A-Za-z])")


def _latex_arg(text: str, i: int) -> tuple[str, int] | None:
    """The TeX argument starting at ``text[i]`` (after spaces): a ``{...}`` group's content
    or a single character, and the index after it; None when there is none."""
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] in "}\\":
        return None  # no argument, or a control sequence (\pi): not a literal
    if text[i] != "{":
        return text[i], i + 1
    end = _closing_brace(text, i)
    return (text[i + 1 : end], end + 1) if end >= 0 else None


def divides_by_zero(text: str) -> bool:
    """True if ``text`` divides by a zero literal: ``0/0``, ``1/0``, ``0/0+1``, ``x/0``,
    ``1/(0)``, ``2\\div 0``, ``{1 \\over 0}``, ``\\frac{1}{0}``, ``\\frac10``, ...

    Such a value is undefined (sympy makes it ``zoo`` or ``nan``), so it equals no
    reference; sympy's arithmetic on them is no guide (``(1/0)^0`` is 1 to it, as
    ``zoo**0 == 1``). Recognising them here spares the grading worker: the comparison
    itself is fast, but whichever answer first reaches a cold worker (at first use or
    after a restart) pays its start-up and the LaTeX parser's warm-up, which on a loaded
    machine can overrun the grading timeout and cost another restart. Textual and
    conservative: a zero continued by anything that binds tighter (``1/0.5``, ``1/0!``,
    ``1/0^0``, ``1/0x``) is not a zero literal and is left to the grader. Linear in the
    length for ``/``; ``\\frac`` arguments are matched with their braces.
    """
    if _ZERO_DIVISOR_RE.search(text):
        return True
    for m in _FRAC_RE.finditer(text):
        num = _latex_arg(text, m.end())
        den = _latex_arg(text, num[1]) if num else None
        if den is not None and _ZERO_ARG_RE.fullmatch(den[0]):
            return True
    return False


# Names an answer may call: mathematical functions only (sympy resolves them to its own
# functions; a plain ``eval`` does not know them and fails harmlessly).
_SAFE_CALLS = frozenset(
    "sin cos tan cot sec csc asin acos atan atan2 sinh cosh tanh exp log ln sqrt cbrt abs Abs "
    "floor ceil ceiling factorial binomial gcd lcm max min Max Min Rational pi E".split()
)


def looks_like_code(text: str) -> bool:
    """True if ``text`` could do something when evaluated as Python (or by sympy).

    Without dunder names, ``lambda`` and calls, an expression can only build values;
    calls of the mathematical functions in ``_SAFE_CALLS`` are allowed. The check is
    textual, conservative and linear in the length: ``open (x)``, ``[f][0](x)`` and
    ``(lambda: 0)()`` are all caught, and so is ordinary prose of the form ``word(...)``.
    """
    if "__" in text or re.search(r"\blambda\b", text):
        return True
    for m in re.finditer(r"\(", text):
        j = m.start() - 1
        while j >= 0 and text[j].isspace():
            j -= 1
        if j < 0:
            continue
        if text[j] in ")]}'\"":  # a call on the result of (...), [...] or a string
            return True
        k = j
        while k >= 0 and (text[k].isalnum() or text[k] == "_"):
            k -= 1
        name = text[k + 1 : j + 1].lstrip("0123456789")  # "2(x)" is no call; "9open(x)" may be
        if name and name not in _SAFE_CALLS:
            return True
    return False


# ---------------------------------------------------------- exact number path

_NUMBER_RE = re.compile(
    r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?"  # 12, 1,000, 12.5, 12.
    r"|[+-]?\.\d+"  # .5
    r"|[+-]?\d+/\d+"  # -3/4
)
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _strip_wrappers(text: str) -> str:
    s = text.strip()
    for _ in range(4):  # a few layers: "$\boxed{12}$." is fine, deeper wrapping is not plain
        before = s
        s = s.rstrip(".").strip()
        for left, right in _WRAPPERS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
        for box in ("\\boxed{", "\\fbox{"):
            if s.startswith(box) and _closing_brace(s, len(box) - 1) == len(s) - 1:
                s = s[len(box) : -1].strip()
        if s == before:
            break
    return s


def _closing_brace(text: str, open_at: int) -> int:
    """Index of the ``}`` matching the ``{`` at ``open_at``, or -1."""
    depth = 0
    for j in range(open_at, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return -1


def parse_number(text: str) -> Fraction | None:
    """The exact value of a plain number (``-3/4``, ``1,000``, ``$12$``, ``\\boxed{0.5}``), or None.

    Never evaluates anything: a regular expression decides what a plain number is.
    """
    if not passes_guards(text):
        return None
    s = _strip_wrappers(text)
    if not _NUMBER_RE.fullmatch(s):
        return None
    s = s.replace(",", "")
    if s.endswith("."):
        s = s[:-1]
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):  # "1/0"
        return None


# ------------------------------------------------------------- public graders


def answers_match(answer: str, reference: str, timeout_s: float = 2.0) -> bool:
    """Whether ``answer`` equals ``reference`` mathematically; bounded and safe on any string.

    1. Guards: either string empty, over :data:`MAX_ANSWER_CHARS` (512) characters,
       nested deeper than :data:`MAX_NESTING_DEPTH` (64) brackets, or holding a NUL
       byte gives False at once, before any parser sees it.
    2. Plain numbers on both sides (integers, decimals, ``a/b`` fractions, thousands
       commas, optional ``$..$`` or ``\\boxed{}``) are compared exactly in-process.
    3. More than :data:`MAX_DIVISIONS` (10) ``/`` on either side gives False, and so does a
       division by a zero literal on either side (:func:`divides_by_zero`: ``\\boxed{0/0}``,
       ``1/0``, ``\\frac{1}{0}``, ...; undefined, it equals nothing, not even itself).
    4. Anything else is parsed and compared by math-verify (``verify(gold=reference,
       target=answer)``) in the grading worker, with a hard ``timeout_s`` wall-clock
       bound per call; on timeout the worker is killed and restarted and the answer
       scores False. Worker start-up (imports) is bounded separately by
       :data:`SETUP_TIMEOUT_S` and raises RuntimeError if it fails.
    """
    if not (passes_guards(answer) and passes_guards(reference)):
        return False
    a, r = parse_number(answer), parse_number(reference)
    if a is not None and r is not None:
        return a == r
    if r is not None and not any(c.isdigit() for c in answer):
        return False  # a number needs digits; spares the worker most garbage
    if answer.count("/") > MAX_DIVISIONS or reference.count("/") > MAX_DIVISIONS:
        return False  # math-verify is exponential in a division chain's length
    if divides_by_zero(answer) or divides_by_zero(reference):
        return False  # undefined (zoo, nan): equal to nothing, and no worker round-trip
    return _math_verify_match(answer, reference, timeout_s)


@functools.lru_cache(maxsize=1 << 16)
def _math_verify_match(answer: str, reference: str, timeout_s: float) -> bool:
    """math-verify in the worker, memoised: grading is pure, and rollouts repeat answers
    (k meta-prover samples per boundary), so each distinct pair costs one round-trip."""
    status, value = _worker().request(("mv", answer, reference), timeout_s, setup=("mv",))
    return status == "ok" and bool(value)


class ScorerError(RuntimeError):
    """A reasoning-gym scorer raised, overran its timeout or killed the worker."""


def score_reasoning_gym(
    task: str,
    task_config: dict,
    seed: int,
    size: int,
    answer: str,
    entry: dict,
    timeout_s: float = 2.0,
) -> float:
    """``create_dataset(task, seed, size, **task_config).score_answer(answer, entry)``, in the worker.

    The caller applies the guards (:func:`passes_guards`, :func:`looks_like_code`);
    this function raises :class:`ScorerError` when the scorer raises, exceeds
    ``timeout_s`` or dies, and returns its score otherwise.
    """
    key = (task, json.dumps(task_config, sort_keys=True), int(seed), int(size))
    status, value = _worker().request(("rg", key, answer, entry), timeout_s, setup=("rg", key))
    if status != "ok":
        raise ScorerError(f"reasoning-gym scorer of {task!r}: {status}" + (f": {value}" if value else ""))
    return float(value)


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 5``) in ``text``, or None.

    Braces are matched, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; an unclosed
    box gives None. Linear in the length of the text.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if text.startswith(" ", i):  # "\boxed 5"
        m = re.match(r" +([^\s$]+)", text[i:])
        return m.group(1) if m else None
    end = _closing_brace(text, i) if text.startswith("{", i) else -1
    return text[i + 1 : end] if end >= 0 else None


# ------------------------------------------------------ the worker, parent side

_BOOT = (
    "import sys, json, importlib.util as u; sys.path[:] = json.loads(sys.argv[2]); "
    "s = u.spec_from_file_location('_metarl_grading_worker', sys.argv[1]); "
    "m = u.module_from_spec(s); s.loader.exec_module(m); m._serve(int(sys.argv[3]))"
)


class _Worker:
    """The grading worker process, seen from the process that uses it (one per process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._owner_pid = -1
        self._ready: set[tuple] = set()
        self.restarts = 0

    def request(self, req: tuple, timeout_s: float, setup: tuple) -> tuple[str, Any]:
        """Send ``req``; returns ``("ok", value)``, ``("err", message)``, ``("timeout", None)`` or ``("died", None)``."""
        with self._lock:
            self._ensure_started()
            if setup not in self._ready:
                status, value = self._roundtrip(("setup", *setup), SETUP_TIMEOUT_S)
                if status != "ok":
                    raise RuntimeError(f"grading worker could not set up {setup[0]!r}: {status} {value or ''}".strip())
                self._ready.add(setup)
            return self._roundtrip(req, timeout_s)

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._kill()
        if self._proc is None:
            env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
            # Started from the main thread, the worker dies with this process even when it is
            # SIGKILLed mid-grade (Linux parent-death signal; tied to the starting thread).
            parent = os.getpid() if threading.current_thread() is threading.main_thread() else 0
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, os.path.abspath(__file__), json.dumps(sys.path), str(parent)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
            self._owner_pid = os.getpid()
            self._ready = set()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or self._owner_pid != os.getpid():
            return  # a forked child running its parent's atexit hooks: not its worker to kill
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def _restart(self) -> None:
        # Start the replacement at once so that it boots while the caller carries on.
        self._kill()
        self.restarts += 1
        self._ensure_started()

    def _roundtrip(self, req: tuple, timeout_s: float) -> tuple[str, Any]:
        proc = self._proc
        data = pickle.dumps(req)
        try:
            proc.stdin.write(len(data).to_bytes(4, "big") + data)
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._restart()
            return "died", None
        deadline = time.monotonic() + max(0.0, float(timeout_s))
        fd = proc.stdout.fileno()
        buf = b""
        need = 4
        while len(buf) < need:
            remaining = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(0.0, remaining))[0] if remaining > 0 else []
            if not ready:
                self._restart()
                return "timeout", None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self._restart()
                return "died", None
            buf += chunk
            if need == 4 and len(buf) >= 4:
                need = 4 + int.from_bytes(buf[:4], "big")
        return pickle.loads(buf[4:need])


_WORKER: _Worker | None = None
_WORKER_LOCK = threading.Lock()


def _worker() -> _Worker:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = _Worker()
            atexit.register(_WORKER.close)
        return _WORKER


def _forget_worker_after_fork() -> None:
    # A forked child must not share its parent's worker (or a lock held at fork time).
    global _WORKER, _WORKER_LOCK
    _WORKER, _WORKER_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker_after_fork)


def worker_restarts() -> int:
    """How many times this process's grading worker was killed and restarted (timeouts, crashes)."""
    return 0 if _WORKER is None else _WORKER.restarts


# ------------------------------------------------------ the worker, child side


_PROSE_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")  # a word that is not a LaTeX command


def _read_exact(stream, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _limit_memory() -> None:
    try:
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = vm + WORKER_MEMORY_HEADROOM
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (ImportError, OSError, ValueError):
        pass  # not Linux: the timeout still bounds the worker


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the worker still exits when its stdin closes
    if os.getppid() != parent:
        os._exit(0)  # the parent died before prctl took effect


def _mv_match(answer: str, reference: str) -> bool:
    """math-verify's comparison of ``answer`` with ``reference`` (in the grading worker only)."""
    from math_verify import (  # deferred: start-up cost (math-verify loads only in the grading worker process)
        parse,
        verify,
    )

    def parse_math(text: str) -> list:
        # A bare formula ("x+1", "2^{10}") is read whole only inside $...$; prose
        # ("12 apples") is searched for its answer as it is.
        forms = [text, f"${text}$"]
        if "$" not in text and "\\boxed" not in text and not _PROSE_RE.search(text):
            forms.reverse()
        return parse(forms[0], parsing_timeout=None) or parse(forms[1], parsing_timeout=None)

    return bool(verify(parse_math(reference), parse_math(answer), timeout_seconds=None))


def _serve(parent: int = 0) -> None:
    """Worker main loop: read a request, answer it, forever (until stdin closes)."""
    if parent:
        _die_with_parent(parent)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    inp = sys.stdin.buffer
    datasets: dict[tuple, Any] = {}

    def handle(req: tuple) -> Any:
        kind = req[0]
        if kind == "setup":
            if req[1] == "mv":
                logging.getLogger("math_verify").setLevel(logging.ERROR)
                # math-verify's imports (sympy, the LaTeX parser) and the parser's first use happen
                # here, under SETUP_TIMEOUT_S, not inside the first answer's grading timeout: on a
                # loaded machine they alone overran 2 s, and a right LaTeX answer scored 0
                # (tests/envs/test_envs.py::test_math_loaded_traces_and_grading, CI beside a benchmark).
                _mv_match("\\frac{1}{2}", "0.5")
                _mv_match("x+1", "1+x")
            else:
                import reasoning_gym  # deferred: start-up cost (reasoning_gym loads only for the environments that use it)

                task, cfg, seed, size = req[2]
                datasets[req[2]] = reasoning_gym.create_dataset(task, seed=seed, size=size, **json.loads(cfg))
            _limit_memory()
            return True
        if kind == "mv":
            _, answer, reference = req
            return _mv_match(answer, reference)
        if kind == "rg":
            _, key, answer, entry = req
            return float(datasets[key].score_answer(answer, entry))
        raise ValueError(f"unknown request kind {kind!r}")

    while True:
        header = _read_exact(inp, 4)
        if header is None:
            return
        body = _read_exact(inp, int.from_bytes(header, "big"))
        if body is None:
            return
        try:
            result: tuple[str, Any] = ("ok", handle(pickle.loads(body)))
        except BaseException as e:  # noqa: BLE001 - SystemExit, MemoryError, ... all become a verdict
            result = ("err", f"{type(e).__name__}: {e}"[:500])
        data = pickle.dumps(result)
        out.write(len(data).to_bytes(4, "big") + data)
