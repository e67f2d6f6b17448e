"""Trained verifiers (issue 4, "Verification"): data, training, scoring, best-of-N.

A :class:`Verifier` is a causal-LM trunk with a linear scalar head; it reads the
hidden state at a chosen stream position and returns the logit of P(success). It is
trained on trials sampled from a base policy, each labelled by its environment, and
then serves two uses:

- **VB at test time**: best-of-N, the trial with the highest verifier score among N
  sampled trials, beside maj@N and pass@N (:func:`best_of_n`);
- **the ``verifier`` estimator of J** (DESIGN.md section 6): its score at every episode
  boundary of a trial (:func:`score_prefixes`, :func:`trained_verifier_estimator`).

Token in, token out: a verifier reads the policy's own token ids (never decoded and
re-tokenised), so it must share the policy's vocabulary (:func:`check_same_vocabulary`).

Examples and labels (:func:`verifier_examples`)
-----------------------------------------------
Each trial gives one *end* example, read at the trial's last token, and (with
``prefixes=True``) one *prefix* example per boundary of ``bonus.boundary_prefixes``
(after the prompt, after each episode before the final-answer one), read at the
prefix's last token. Every example of a trial carries the trial's label:

    label = 1.0 if outcome >= 1.0 else 0.0

A graded outcome below 1 (partial credit) is a failure: the verifier estimates
P(outcome >= 1), the success that pass@k and best-of-N count.

What the scores estimate. Binary cross-entropy is minimised by the conditional mean
of the label given what the verifier reads, so:

- at the trial's end, the outcome is a function of the stream: the verifier is an
  outcome reward model, P(success | whole trial);
- at a prefix, the label is **one Monte-Carlo sample** of the sampling policy's success
  from that prefix: the policy went on writing episodes (with the rest of its budget)
  and the trial's outcome was observed once. The verifier estimates
  V^pi(prefix) = P(the *sampling* policy eventually succeeds | prefix). This is a J-like
  value but **not the meta-prover's J**, which is P(success | the policy is forced to
  answer right after the prefix): V^pi counts the episodes still to come, so it is
  usually above J, and it refers to the policy that sampled the data, not to a policy
  trained afterwards. Its progress differences are advantages of the sampling policy
  (a "process advantage verifier", Setlur et al. 2024) rather than MRT's information gain.
  Prefix examples of one trial share one label, so they are correlated; the held-out
  metrics are given for all examples and for end and prefix examples apart.

Held-out metrics (:func:`verifier_metrics`)
-------------------------------------------
With p = sigmoid(logit) and 0/1 labels y over n examples:

- ``accuracy``: share of examples with (p >= 0.5) == y;
- ``bce``: mean of -[y log p + (1-y) log(1-p)] (nats, from the logits);
- ``brier``: mean of (p - y)^2;
- ``ece``: expected calibration error over 10 equal-width bins of p: bin b holds the
  examples with min(floor(10 p), 9) == b (so [b/10, (b+1)/10), the last bin [0.9, 1]),
  and ECE = sum_b (n_b / n) |mean(y in b) - mean(p in b)|; empty bins count 0;
- ``auroc``: P(p+ > p-) + 1/2 P(p+ = p-) for a random positive and negative example,
  computed from midranks (tied scores share the mean of their ranks); nan when one
  class is absent;
- ``positive_rate``: mean label (the base rate), ``predicted_positive_rate``: share with
  p >= 0.5, ``mean_prob``: mean p, ``count``: n.

Integration
-----------
- The ``verifier`` estimator of J: :func:`trained_verifier_estimator` has the
  ``Estimator`` signature of :mod:`metarl_llm.bonus` and reads ``opts.verifier`` as the
  directory of a saved verifier (``bonus.verifier=/path/to/verifier``).
- ``algo=verifier``: :func:`run_verifier_training` takes already-built objects (policy,
  codec, environment factory, verifier, budget, :class:`VerifierConfig`) and does it all:
  sample, label, train, save, best-of-N.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from metarl_llm.bonus import JOptions, boundary_prefixes
from metarl_llm.config import BudgetConfig, TinyModelConfig, VerifierConfig
from metarl_llm.evaluate import heldout_resets
from metarl_llm.models import build_tiny_model, resolve_dtype
from metarl_llm.rollout import StreamCodec, Trial, run_trials

SUCCESS_THRESHOLD = 1.0  # label = outcome >= this
ECE_BINS = 10
VERIFIER_FILE = "verifier.json"  # marks a saved verifier directory; holds the format and head size
HEAD_FILE = "verifier_head.safetensors"
FORMAT = "metarl-llm verifier"
FORMAT_VERSION = 1

LogFn = Callable[[dict, int], None]  # (metrics, step), as metarl_llm.tracking.Tracker.log


# ------------------------------------------------------------------------- model


class Verifier(nn.Module):
    """A causal-LM trunk with a linear scalar head: the logit of P(success).

    ``trunk`` is the base model of any transformers causal LM (``model.base_model``;
    a causal LM itself is accepted and its base model taken); ``tokenizer`` is kept for
    saving and must have the policy's vocabulary. The head starts at zero (P = 0.5).
    """

    def __init__(self, trunk: nn.Module, tokenizer):
        super().__init__()
        trunk = getattr(trunk, "base_model", trunk)
        if getattr(getattr(trunk, "config", None), "hidden_size", None) is None:
            raise ValueError(f"Verifier: the trunk {type(trunk).__name__} has no config.hidden_size (not a transformers model?)")
        self.trunk = trunk
        self.tokenizer = tokenizer
        self.head = nn.Linear(trunk.config.hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def pad_id(self) -> int:
        """Id used for padding (never read: padded keys are masked, padded queries unread)."""
        for tid in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if tid is not None:
                return int(tid)
        return 0

    def logits_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Logits [M] read at the M stream positions (rows[m], cols[m]) of one forward pass.

        ``input_ids``, ``attention_mask``: [B, L], right-padded (mask 1...1 0...0 per row).
        Each read position must hold a real token. Because the trunk is causal, the
        hidden state at position c depends on tokens 0..c only: reading c of a long
        stream equals reading the last token of the prefix of length c+1.
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"Verifier: input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [B, L]")
        if rows.shape != cols.shape or rows.dim() != 1:
            raise ValueError(f"Verifier: rows {tuple(rows.shape)} and cols {tuple(cols.shape)} must be 1-D of one length")
        b, length = input_ids.shape
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= b or int(cols.min()) < 0 or int(cols.max()) >= length):
            raise ValueError(f"Verifier: read positions out of range for input of shape [{b}, {length}]")
        if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ValueError("Verifier: attention_mask must be right-padded (1s then 0s in every row)")
        if rows.numel() and not bool(attention_mask[rows, cols].bool().all()):
            raise ValueError("Verifier: a read position falls on padding (attention_mask 0)")
        vocab = self.trunk.get_input_embeddings().num_embeddings
        if input_ids.numel() and (int(input_ids.max()) >= vocab or int(input_ids.min()) < 0):
            raise ValueError(f"Verifier: token ids must lie in [0, {vocab}) (the trunk's embedding size); got [{int(input_ids.min())}, {int(input_ids.max())}]")
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(hidden[rows, cols].to(self.head.weight.dtype)).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits of P(success) read at ``positions`` [B] (one per row) or [B, K] (K per row): [B] or [B, K]."""
        if positions.dim() not in (1, 2) or positions.shape[0] != input_ids.shape[0]:
            raise ValueError(f"Verifier: positions {tuple(positions.shape)} must be [B] or [B, K] with B = {input_ids.shape[0]}")
        positions = positions.to(input_ids.device)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        rows = rows if positions.dim() == 1 else rows[:, None].expand_as(positions)
        return self.logits_at(input_ids, attention_mask, rows.reshape(-1), positions.reshape(-1)).view(positions.shape)

    def save(self, directory: str | Path) -> Path:
        """Write the trunk (``save_pretrained``), the tokenizer, the head and ``verifier.json`` into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.trunk.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, directory / HEAD_FILE)
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "hidden_size": self.head.in_features,
                "label": f"outcome >= {SUCCESS_THRESHOLD}"}
        (directory / VERIFIER_FILE).write_text(json.dumps(meta, indent=1))
        return directory


def is_saved_verifier(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :meth:`Verifier.save`."""
    return (Path(path).expanduser() / VERIFIER_FILE).is_file()


def load_verifier(path: str | Path, device: str | torch.device | None = None, trust_remote_code: bool = False) -> Verifier:
    """A verifier saved by :meth:`Verifier.save`, in eval mode, on ``device`` (default cpu)."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"verifier path {path} does not exist")
    for name in (VERIFIER_FILE, HEAD_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a saved verifier: {path / name} not found")
    meta = json.loads((path / VERIFIER_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path / VERIFIER_FILE}: format {meta.get('format')!r} version {meta.get('version')!r}; expected {FORMAT!r} version {FORMAT_VERSION}")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    trunk = AutoModel.from_pretrained(path, dtype="auto", trust_remote_code=trust_remote_code)
    verifier = Verifier(trunk, tokenizer)
    head = load_file(path / HEAD_FILE)
    if head["weight"].shape != verifier.head.weight.shape:
        raise ValueError(f"{path / HEAD_FILE}: head weight {tuple(head['weight'].shape)} does not fit the trunk's hidden size {verifier.head.in_features}")
    verifier.head.load_state_dict(head)
    return verifier.to(device or "cpu").eval()


def check_same_vocabulary(verifier_tokenizer, policy_tokenizer) -> None:
    """ValueError unless both tokenizers map the same strings to the same ids (a verifier
    reads the policy's token ids as they are)."""
    a, b = verifier_tokenizer.get_vocab(), policy_tokenizer.get_vocab()
    if a != b:
        differ = sum(1 for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        raise ValueError(
            f"the verifier's tokenizer ({len(a)} entries) differs from the policy's ({len(b)} entries) on {differ} "
            "entries: a verifier reads the policy's token ids and needs the same vocabulary"
        )


def build_verifier(
    tokenizer,
    name_or_path: str | None = None,
    *,
    policy: nn.Module | None = None,
    tiny: TinyModelConfig | None = None,
    seed: int = 0,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> Verifier:
    """A fresh verifier over the policy's ``tokenizer``.

    ``name_or_path``: None builds a tiny Llama-style trunk from ``tiny`` (seeded by
    ``seed``); ``"policy"`` copies ``policy``'s trunk; anything else is a hub id or a
    local directory of a causal LM, whose tokenizer must match ``tokenizer``. The trunk
    gets ``dtype``; the head stays float32.
    """
    if name_or_path is None:
        lm = build_tiny_model(tiny or TinyModelConfig(), len(tokenizer), tokenizer.pad_token_id, seed)
        return Verifier(lm.base_model.to(resolve_dtype(dtype)), tokenizer)
    if name_or_path == "policy":
        if policy is None:
            raise ValueError("verifier.name_or_path='policy' needs the policy model")
        return Verifier(copy.deepcopy(policy.base_model).to(resolve_dtype(dtype)), tokenizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_same_vocabulary(AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code), tokenizer)
    # Loaded as a causal LM so that a bidirectional encoder cannot slip in: prefix scores
    # read from one pass are only valid for a causal trunk.
    lm = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
    return Verifier(lm.base_model, tokenizer)


# -------------------------------------------------------------------------- data


@dataclass(frozen=True)
class VerifierExamples:
    """M labelled read positions over S token streams (``len()`` is M).

    streams:  S lists of token ids, the trials' own ``ids`` (shared, not copied).
    stream:   [M] int64, the stream of each example.
    position: [M] int64, the stream position read: the last token of the prefix.
    label:    [M] float32, 1.0 if the trial's outcome >= 1.0 else 0.0.
    at_end:   [M] bool, True for the whole-trial example, False for a boundary prefix.
    pad_id:   id that pads batches (never read).
    """

    streams: list[list[int]]
    stream: np.ndarray
    position: np.ndarray
    label: np.ndarray
    at_end: np.ndarray
    pad_id: int

    def __len__(self) -> int:
        return len(self.stream)


def trial_label(trial: Trial) -> float:
    """1.0 if the trial succeeded (outcome >= 1.0), else 0.0 (partial credit is a failure)."""
    return float(trial.outcome >= SUCCESS_THRESHOLD)


def verifier_examples(trials: Sequence[Trial], codec: StreamCodec, prefixes: bool) -> VerifierExamples:
    """Examples from trials, token in: the trials' own ids, never re-tokenised.

    Per trial, in this order: with ``prefixes``, one example per boundary of
    ``bonus.boundary_prefixes`` (read at position end-1, the prefix's last token), then
    one end example (read at the stream's last token). All carry :func:`trial_label`.
    A prefix label is one Monte-Carlo sample of the *sampling policy's* eventual success
    from that prefix (module docstring): a verifier trained on it estimates V^pi, a
    J-like value under the sampling policy, not the meta-prover's J.
    ``codec`` is the policy's: its pad id pads batches.
    """
    if len(trials) == 0:
        raise ValueError("verifier_examples: no trials")
    streams, stream, position, label, at_end = [], [], [], [], []
    for i, t in enumerate(trials):
        if not t.ids:
            raise ValueError(f"verifier_examples: trial {i} (problem {t.problem_id}) has no tokens")
        if t.answer_episode < 0:
            raise ValueError(f"verifier_examples: trial {i} (problem {t.problem_id}) has no final answer (answer_episode=-1), so its outcome is no label")
        ends = boundary_prefixes(t) if prefixes else []
        if ends and ends[0] < 1:
            raise ValueError(f"verifier_examples: trial {i} (problem {t.problem_id}) has an empty prompt: no token to read J after the prompt at")
        reads = [e - 1 for e in ends] + [len(t.ids) - 1]
        streams.append(t.ids)
        stream += [i] * len(reads)
        position += reads
        label += [trial_label(t)] * len(reads)
        at_end += [False] * len(ends) + [True]
    return VerifierExamples(
        streams, np.array(stream, dtype=np.int64), np.array(position, dtype=np.int64),
        np.array(label, dtype=np.float32), np.array(at_end, dtype=bool), int(codec.pad_id),
    )


def _batch(streams: Sequence[list[int]], pad_id: int, stream: np.ndarray, position: np.ndarray, device) -> tuple:
    """One right-padded row per distinct stream, cut after its last read position.

    Returns input_ids [R, L], attention_mask [R, L], and the (row, col) [M] of each read.
    """
    uniq, row = np.unique(stream, return_inverse=True)
    lengths = np.zeros(len(uniq), dtype=np.int64)
    np.maximum.at(lengths, row, position + 1)
    width = int(lengths.max())
    ids = torch.full((len(uniq), width), pad_id, dtype=torch.long)
    for r, (s, n) in enumerate(zip(uniq, lengths)):
        ids[r, :n] = torch.as_tensor(streams[s][:n], dtype=torch.long)
    mask = (torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]).long()
    return ids.to(device), mask.to(device), torch.as_tensor(row, device=device), torch.as_tensor(position, device=device)


# ----------------------------------------------------------------------- metrics


def _pair(probs, labels, fn: str) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if p.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"{fn}: scores and labels must be 1-D of one length, got shapes {p.shape} and {y.shape}")
    if p.size == 0:
        raise ValueError(f"{fn}: no examples")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"{fn}: labels must be 0 or 1")
    if not np.isfinite(p).all():
        raise ValueError(f"{fn}: scores hold non-finite entries")
    return p, y


def _probs(probs, labels, fn: str) -> tuple[np.ndarray, np.ndarray]:
    p, y = _pair(probs, labels, fn)
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"{fn}: probabilities must lie in [0, 1], got [{p.min()}, {p.max()}]")
    return p, y


def brier(probs, labels) -> float:
    """Mean squared error of probabilities [n] against 0/1 labels [n]."""
    p, y = _probs(probs, labels, "brier")
    return float(np.mean((p - y) ** 2))


def expected_calibration_error(probs, labels, n_bins: int = ECE_BINS) -> float:
    """sum_b (n_b / n) |mean(y in b) - mean(p in b)| over ``n_bins`` equal-width bins of p;
    p goes to bin min(floor(n_bins p), n_bins - 1) (the last bin is closed); empty bins count 0."""
    p, y = _probs(probs, labels, "expected_calibration_error")
    if n_bins < 1:
        raise ValueError(f"expected_calibration_error: n_bins must be >= 1, got {n_bins}")
    b = np.minimum(np.floor(p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    gap = np.abs(np.bincount(b, weights=y, minlength=n_bins) - np.bincount(b, weights=p, minlength=n_bins))
    return float(gap.sum() / p.size)  # sum_b (n_b/n)|acc_b - conf_b| = sum_b |sum y - sum p|_b / n


def auroc(scores, labels) -> float:
    """Area under the ROC curve: P(s+ > s-) + 1/2 P(s+ = s-) over positive/negative pairs.

    From ranks (Mann-Whitney): with midranks r (tied scores share the mean of their
    ranks, which counts a tied pair as 1/2), AUROC = (sum_{y=1} r - n1(n1+1)/2) / (n1 n0).
    Any real scores (logits or probabilities). nan when one class is absent.
    """
    s, y = _pair(scores, labels, "auroc")
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ordered = s[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first index of each run of equal scores
    stops = np.r_[starts[1:], s.size]
    run = np.repeat(np.arange(starts.size), stops - starts)
    ranks = np.empty(s.size)
    ranks[order] = ((starts + 1 + stops) / 2.0)[run]  # 1-based ranks starts+1..stops, their mean
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) in float64 without overflow."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(logits, dtype=np.float64)))


def verifier_metrics(logits, labels) -> dict[str, float]:
    """Held-out figures of logits [n] against 0/1 labels [n] (module docstring)."""
    z, y = _pair(logits, labels, "verifier_metrics")
    p = sigmoid(z)
    return {
        "accuracy": float(np.mean((z >= 0) == (y == 1))),
        "bce": float(np.mean(np.logaddexp(0.0, z) - y * z)),
        "brier": brier(p, y),
        "ece": expected_calibration_error(p, y),
        "auroc": auroc(z, y),
        "positive_rate": float(y.mean()),
        "predicted_positive_rate": float(np.mean(z >= 0)),
        "mean_prob": float(p.mean()),
        "count": float(y.size),
    }


@torch.no_grad()
def example_logits(verifier: Verifier, examples: VerifierExamples, rows: int = 32) -> np.ndarray:
    """Logits [M] of every example, ``rows`` streams per forward pass (one pass per stream)."""
    if rows < 1:
        raise ValueError(f"example_logits: rows must be >= 1, got {rows}")
    was_training = verifier.training
    verifier.eval()
    out = np.empty(len(examples), dtype=np.float64)
    order = np.argsort(examples.stream, kind="stable")
    sorted_stream = examples.stream[order]
    uniq = np.unique(sorted_stream)
    for s in range(0, len(uniq), rows):
        lo = np.searchsorted(sorted_stream, uniq[s], "left")
        hi = np.searchsorted(sorted_stream, uniq[min(s + rows, len(uniq)) - 1], "right")
        sel = order[lo:hi]
        ids, mask, r, c = _batch(examples.streams, examples.pad_id, examples.stream[sel], examples.position[sel], verifier.device)
        out[sel] = verifier.logits_at(ids, mask, r, c).cpu().numpy()
    verifier.train(was_training)
    return out


def evaluate_verifier(verifier: Verifier, examples: VerifierExamples, rows: int = 32) -> dict[str, float]:
    """:func:`verifier_metrics` over all examples, and prefixed ``end/`` and ``prefix/`` over
    each kind (a kind with no examples is left out)."""
    z = example_logits(verifier, examples, rows)
    metrics = verifier_metrics(z, examples.label)
    for kind, sel in (("end", examples.at_end), ("prefix", ~examples.at_end)):
        if sel.any() and not sel.all():
            metrics.update({f"{kind}/{k}": v for k, v in verifier_metrics(z[sel], examples.label[sel]).items()})
    return metrics


# ---------------------------------------------------------------------- training


def train_verifier(
    verifier: Verifier,
    train_examples: VerifierExamples,
    heldout_examples: VerifierExamples | None,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    log: LogFn | None = None,
    *,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    eval_every: int = 0,
    log_every: int = 10,
    rows: int = 32,
    progress_bar: bool = False,
) -> dict[str, float]:
    """Train ``verifier`` in place with binary cross-entropy on the logits.

    1. Each step draws ``batch_size`` examples without replacement from a permutation of
       the training examples (a new permutation, from ``generator``, at each pass).
    2. The examples' streams form a right-padded batch, one row per distinct stream
       (several prefixes of one trial are read from one row: the trunk is causal).
    3. BCE-with-logits, AdamW (``lr``, ``weight_decay``), gradients clipped to norm
       ``max_grad_norm``.

    ``log(metrics, step)`` receives ``train/loss`` (mean over the last ``log_every``
    steps), ``train/grad_norm`` (before clipping) and, every ``eval_every`` steps
    (0: never) and after the last, ``heldout/...`` (:func:`evaluate_verifier`).
    Returns the last metrics: ``train/loss``, ``train/steps``, ``train/examples``,
    ``train/time_s`` and the ``heldout/...`` figures (when ``heldout_examples`` is given).
    """
    if len(train_examples) == 0:
        raise ValueError("train_verifier: no training examples")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every), ("rows", rows)):
        if v < (0 if name == "steps" else 1):
            raise ValueError(f"train_verifier: {name} must be >= {0 if name == 'steps' else 1}, got {v}")
    if eval_every < 0 or not lr > 0:
        raise ValueError(f"train_verifier: need eval_every >= 0 and lr > 0, got {eval_every} and {lr}")
    t0 = time.perf_counter()
    optimizer = torch.optim.AdamW(verifier.parameters(), lr=lr, weight_decay=weight_decay)
    device = verifier.device
    labels = torch.as_tensor(train_examples.label)
    m = len(train_examples)
    perm, cursor = torch.randperm(m, generator=generator), 0
    losses: list[float] = []
    metrics: dict[str, float] = {}

    def heldout(step: int) -> None:
        if heldout_examples is not None and len(heldout_examples):
            metrics.update({f"heldout/{k}": v for k, v in evaluate_verifier(verifier, heldout_examples, rows).items()})
            if log is not None:
                log({k: v for k, v in metrics.items() if k.startswith("heldout/")}, step)

    from tqdm.auto import tqdm

    verifier.train()
    for step in tqdm(range(1, steps + 1), desc="verifier", disable=not progress_bar, dynamic_ncols=True):
        take, got = [], 0
        while got < min(batch_size, m):
            if cursor == m:
                perm, cursor = torch.randperm(m, generator=generator), 0
            n = min(batch_size, m) - got
            n = min(n, m - cursor)
            take.append(perm[cursor : cursor + n])
            cursor, got = cursor + n, got + n
        idx = torch.cat(take).numpy()
        ids, mask, r, c = _batch(train_examples.streams, train_examples.pad_id, train_examples.stream[idx], train_examples.position[idx], device)
        loss = F.binary_cross_entropy_with_logits(verifier.logits_at(ids, mask, r, c), labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(verifier.parameters(), max_grad_norm))
        optimizer.step()
        losses.append(loss.detach().item())
        if step % log_every == 0 or step == steps:
            metrics["train/loss"] = float(np.mean(losses[-log_every:]))
            if log is not None:
                log({"train/loss": metrics["train/loss"], "train/grad_norm": grad_norm}, step)
        if eval_every and step % eval_every == 0 and step != steps:
            heldout(step)
            verifier.train()
    verifier.eval()
    heldout(steps)
    metrics.update({"train/steps": float(steps), "train/examples": float(m), "train/time_s": time.perf_counter() - t0})
    return metrics


# ----------------------------------------------------------------------- scoring


@torch.no_grad()
def _score_reads(verifier: Verifier, trials: Sequence[Trial], reads: list[list[int]], rows: int) -> list[np.ndarray]:
    """P(success) at the stream positions ``reads[i]`` of each trial, ``rows`` trials per forward pass."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    stream = np.repeat(np.arange(len(trials)), [len(r) for r in reads])
    position = np.array([p for r in reads for p in r], dtype=np.int64)
    examples = VerifierExamples([t.ids for t in trials], stream, position, np.zeros(len(stream), np.float32),
                                np.zeros(len(stream), bool), verifier.pad_id)
    probs = sigmoid(example_logits(verifier, examples, rows))
    return list(np.split(probs, np.cumsum([len(r) for r in reads])[:-1]))


def _check_trials(trials: Sequence[Trial], fn: str) -> None:
    if len(trials) == 0:
        raise ValueError(f"{fn}: no trials")
    for i, t in enumerate(trials):
        if not t.ids:
            raise ValueError(f"{fn}: trial {i} (problem {t.problem_id}) has no tokens")


def score_trials(verifier: Verifier, trials: Sequence[Trial], rows: int = 32) -> np.ndarray:
    """P(success) [N] of each whole trial, read at its last token (the outcome-model score)."""
    _check_trials(trials, "score_trials")
    return np.concatenate(_score_reads(verifier, trials, [[len(t.ids) - 1] for t in trials], rows))


def score_prefixes(verifier: Verifier, trials: Sequence[Trial], rows: int = 32) -> list[np.ndarray]:
    """P(success) at every boundary of every trial (``bonus.boundary_prefixes`` order): one
    array [m_i] per trial. All boundaries of a trial come from one forward pass of its
    stream, read at each boundary's last token (valid because the trunk is causal)."""
    _check_trials(trials, "score_prefixes")
    reads = []
    for i, t in enumerate(trials):
        ends = boundary_prefixes(t)
        if ends[0] < 1:
            raise ValueError(f"score_prefixes: trial {i} (problem {t.problem_id}) has an empty prompt")
        reads.append([e - 1 for e in ends])
    return _score_reads(verifier, trials, reads, rows)


@functools.lru_cache(maxsize=2)
def _cached_verifier(path: str, device: str, mtime: float) -> Verifier:
    return load_verifier(path, device)


def trained_verifier_estimator(model: nn.Module, codec: StreamCodec, trials: list[Trial], opts: JOptions) -> list[np.ndarray]:
    """The ``verifier`` estimator of J with a trained verifier (``Estimator`` signature of
    :mod:`metarl_llm.bonus`): ``opts.verifier`` is the directory of a saved verifier,
    loaded once (cached per path, device and file time) onto the policy's device;
    ``opts.rows`` trials per forward pass. The policy itself is not run.

    The values estimate V^pi of the policy that sampled the verifier's training data
    (module docstring), not the meta-prover's J.
    """
    path = Path(opts.verifier).expanduser()
    if not is_saved_verifier(path):
        raise FileNotFoundError(f"bonus.verifier={opts.verifier!r} is not a saved verifier directory ({path / VERIFIER_FILE} not found)")
    device = next(model.parameters()).device
    verifier = _cached_verifier(str(path.resolve()), str(device), (path / HEAD_FILE).stat().st_mtime)
    check_same_vocabulary(verifier.tokenizer, codec.tokenizer)
    return score_prefixes(verifier, trials, rows=opts.rows)


# -------------------------------------------------------------------- best-of-N


def best_of_n(
    scores,
    outcomes,
    n_values: Sequence[int],
    answers=None,
    answer_scores=None,
    tokens=None,
) -> dict[str, list]:
    """Best-of-N, maj@N and pass@N over the first N trials of each problem.

    ``scores``, ``outcomes`` [P, N_max]: the verifier score and the outcome of trial n of
    problem p (trials in sampling order). For each N in ``n_values`` (1 <= N <= N_max),
    over trials 0..N-1 of every problem, averaged over problems:

    - ``best_of_n``: outcome of the trial with the highest score (ties: the first);
    - ``pass_at_n``: the best outcome (the share of problems solved for 0/1 outcomes,
      as evaluate's pass@k); an oracle verifier reaches it, so pass_at_n >= best_of_n;
    - ``mean_outcome``: mean outcome (the success of one trial picked at random);
    - ``maj_at_n`` (with ``answers`` [P, N_max] of str/None): the most frequent
      answer (whitespace-stripped; ties: the first seen; None and "" do not vote) scores
      ``answer_scores`` of the first trial that gave it (default: its outcome; pass
      env.score(answer) to match evaluate's maj@k); no vote scores 0;
    - ``tokens`` (with ``tokens`` [P, N_max]): total policy tokens of the N trials.

    Returns JSON-ready lists aligned with ``n``.
    """
    s = np.asarray(scores, dtype=np.float64)
    o = np.asarray(outcomes, dtype=np.float64)
    if s.ndim != 2 or s.shape != o.shape or s.size == 0:
        raise ValueError(f"best_of_n: scores and outcomes must be non-empty [P, N] arrays of one shape, got {s.shape} and {o.shape}")
    if not (np.isfinite(s).all() and np.isfinite(o).all()):
        raise ValueError("best_of_n: scores and outcomes must be finite")
    n_max = s.shape[1]
    ns = list(n_values)
    if not ns or any(isinstance(n, bool) or int(n) != n or not 1 <= n <= n_max for n in ns):
        raise ValueError(f"best_of_n: n_values must be integers in [1, {n_max}], got {ns}")
    extra = {}
    for name, a in (("answers", answers), ("answer_scores", answer_scores), ("tokens", tokens)):
        if a is not None:
            extra[name] = np.asarray(a, dtype=object if name == "answers" else np.float64)
            if extra[name].shape != s.shape:
                raise ValueError(f"best_of_n: {name} must have the shape of scores {s.shape}, got {extra[name].shape}")
    rows = np.arange(s.shape[0])
    out: dict[str, list] = {"n": [int(n) for n in ns], "best_of_n": [], "pass_at_n": [], "mean_outcome": []}
    if answers is not None:
        out["maj_at_n"] = []
    if tokens is not None:
        out["tokens"] = []
    vote_scores = extra.get("answer_scores", o)
    for n in out["n"]:
        out["best_of_n"].append(float(o[rows, np.argmax(s[:, :n], axis=1)].mean()))  # argmax keeps the first of ties
        out["pass_at_n"].append(float(o[:, :n].max(1).mean()))
        out["mean_outcome"].append(float(o[:, :n].mean()))
        if answers is not None:
            out["maj_at_n"].append(float(np.mean([_majority_score(extra["answers"][p, :n], vote_scores[p, :n]) for p in rows])))
        if tokens is not None:
            out["tokens"].append(float(extra["tokens"][:, :n].sum(1).mean()))
    return out


def _majority_score(answers: np.ndarray, scores: np.ndarray) -> float:
    votes: dict[str, list] = {}  # answer -> [count, index of the first trial that gave it]
    for i, a in enumerate(answers):
        a = (a or "").strip()
        if a:
            votes.setdefault(a, [0, i])[0] += 1
    if not votes:
        return 0.0
    _, (_, first) = max(votes.items(), key=lambda kv: kv[1][0])  # max keeps the first of equal counts
    return float(scores[first])


def answer_scores_of(trials: Sequence[Trial]) -> np.ndarray:
    """env.score(answer) [N] of each trial's stripped answer (0 without one), while each
    ``trial.env`` still holds the trial's problem (once per distinct answer of a problem)."""
    cache: dict[tuple[int, str], float] = {}
    out = np.zeros(len(trials))
    for i, t in enumerate(trials):
        answer = (t.answer or "").strip()
        if not answer:
            continue
        if t.env is None:
            raise ValueError(f"answer_scores_of: trial {i} (problem {t.problem_id}) has no environment to score its answer")
        key = (t.group, answer)
        if key not in cache:
            cache[key] = float(t.env.score(answer))
        out[i] = cache[key]
    return out


def best_of_n_trials(scores, trials: Sequence[Trial], n_values: Sequence[int], answer_scores=None) -> dict[str, list]:
    """:func:`best_of_n` over trials: ``scores`` [len(trials)] (e.g. :func:`score_trials`),
    trials grouped by ``group`` (first-seen order), each group the same size N_max, its
    trials in list order. maj@N votes with ``answer_scores`` [len(trials)] (default
    :func:`answer_scores_of`, env.score of each answer, as evaluate's maj@k)."""
    if len(trials) == 0:
        raise ValueError("best_of_n_trials: no trials")
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (len(trials),):
        raise ValueError(f"best_of_n_trials: scores must have shape ({len(trials)},), got {s.shape}")
    a = answer_scores_of(trials) if answer_scores is None else np.asarray(answer_scores, dtype=np.float64)
    if a.shape != (len(trials),):
        raise ValueError(f"best_of_n_trials: answer_scores must have shape ({len(trials)},), got {a.shape}")
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(trials):
        groups.setdefault(t.group, []).append(i)
    sizes = {len(g) for g in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"best_of_n_trials: every problem needs the same number of trials, got sizes {sorted(sizes)}")
    idx = np.array(list(groups.values()))  # [P, N_max]
    answers = np.empty(idx.shape, dtype=object)
    answers[...] = [[trials[i].answer for i in g] for g in idx]
    outcomes = np.array([[trials[i].outcome for i in g] for g in idx])
    tokens = np.array([[trials[i].policy_tokens for i in g] for g in idx])
    return best_of_n(s[idx], outcomes, n_values, answers=answers, answer_scores=a[idx], tokens=tokens)


def plot_best_of_n(result: dict[str, list], path: str | Path, title: str = "") -> None:
    """Best-of-N, maj@N, pass@N and mean outcome against N (log2) and against total tokens. PNG at ``path``."""
    from metarl_llm.evaluate import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if "tokens" in result else 1, figsize=(10 if "tokens" in result else 5.5, 3.8), squeeze=False)
    curves = [("best_of_n", "best-of-N (verifier)"), ("maj_at_n", "maj@N"), ("pass_at_n", "pass@N"), ("mean_outcome", "mean outcome")]
    for ax, xkey, xlabel in zip(axes[0], ("n", "tokens"), ("N (trials per problem)", "policy tokens per problem")):
        for key, label in curves:
            if key in result:
                ax.plot(result[xkey], result[key], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------- entry point


def play_trials(
    policy: nn.Module, codec: StreamCodec, make_env: Callable[[str], object], split: str, resets: list[dict],
    groups: list[int], budget: BudgetConfig, generator: torch.Generator, rows: int,
) -> tuple[list[Trial], np.ndarray]:
    """:func:`rollout.run_trials` in rounds of ``rows`` trials over a pool of ``rows``
    environments of ``split``. Returns the trials and :func:`answer_scores_of` them,
    taken while the pool still holds their problems; after that the pool is reused, so
    ``trial.env`` is set to None on every trial (it would hold another problem)."""
    envs = [make_env(split) for _ in range(min(rows, len(resets)))]
    trials, scores = [], []
    for s in range(0, len(resets), rows):
        batch = run_trials(policy, codec, envs[: len(resets[s : s + rows])], resets[s : s + rows], groups[s : s + rows], budget, generator)
        scores.append(answer_scores_of(batch))
        for t in batch:
            t.env = None
        trials += batch
    return trials, np.concatenate(scores)


def run_verifier_training(
    policy: nn.Module,
    codec: StreamCodec,
    make_env: Callable[[str], object],
    verifier: Verifier,
    budget: BudgetConfig,
    cfg: VerifierConfig,
    generator: torch.Generator,
    run_dir: str | Path,
    log: LogFn | None = None,
    progress_bar: bool = False,
) -> dict:
    """``algo=verifier``: train a verifier on a base policy's trials and measure best-of-N.

    1. Sample ``cfg.samples_per_problem`` trials on each of ``cfg.num_train_problems``
       training-split problems (problem seeds drawn from ``generator``), and max(n_values)
       trials on each of ``cfg.num_heldout_problems`` held-out problems
       (``evaluate.heldout_resets``), from ``policy`` under ``budget``.
    2. Label them (:func:`verifier_examples`, prefixes per ``cfg.prefixes``).
    3. :func:`train_verifier`; held-out metrics on the held-out trials' examples.
    4. Save the verifier to ``run_dir/verifier`` (usable as ``bonus.verifier``).
    5. Best-of-N against maj@N and pass@N on the held-out trials; ``run_dir/best_of_n.png``.

    ``make_env(split)`` makes one environment (as ``trainer.env_factory``). ``log`` gets
    the training metrics (steps 1..steps) and then the base policy's success and the
    best-of-N figures (``best_of_n/...``, at step ``cfg.steps``). Returns a summary dict
    (JSON-ready): every last metric, the best-of-N table and the paths written.
    """
    if cfg.num_train_problems < 1 or cfg.samples_per_problem < 1 or cfg.num_heldout_problems < 1:
        raise ValueError("verifier: num_train_problems, samples_per_problem and num_heldout_problems must be >= 1")
    if not cfg.n_values or min(cfg.n_values) < 1:
        raise ValueError(f"verifier.n_values must be a non-empty list of integers >= 1, got {cfg.n_values}")
    check_same_vocabulary(verifier.tokenizer, codec.tokenizer)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    was_training = policy.training
    policy.eval()

    # 1. sample
    seeds = torch.randint(0, 2**31 - 1, (cfg.num_train_problems,), generator=generator).tolist()
    resets = [{"seed": int(sd)} for sd in seeds for _ in range(cfg.samples_per_problem)]
    groups = [p for p in range(cfg.num_train_problems) for _ in range(cfg.samples_per_problem)]
    train_trials, _ = play_trials(policy, codec, make_env, "train", resets, groups, budget, generator, cfg.rollout_rows)
    n_max = max(cfg.n_values)
    split_size = make_env("test").unwrapped.num_problems
    num_heldout = min(cfg.num_heldout_problems, split_size) if split_size is not None else cfg.num_heldout_problems
    resets, groups = heldout_resets(num_heldout, n_max)
    heldout_trials, answer_scores = play_trials(policy, codec, make_env, "test", resets, groups, budget, generator, cfg.rollout_rows)
    policy.train(was_training)
    t_sample = time.perf_counter() - t0

    # 2-3. label and train
    train_ex = verifier_examples(train_trials, codec, cfg.prefixes)
    heldout_ex = verifier_examples(heldout_trials, codec, cfg.prefixes)
    metrics = train_verifier(
        verifier, train_ex, heldout_ex, cfg.steps, cfg.batch_size, cfg.lr, generator, log,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, eval_every=cfg.eval_every,
        log_every=cfg.log_every, rows=cfg.rows, progress_bar=progress_bar,
    )

    # 4. save
    verifier_dir = verifier.save(run_dir / "verifier")

    # 5. best-of-N on the held-out trials
    bon = best_of_n_trials(score_trials(verifier, heldout_trials, cfg.rows), heldout_trials, cfg.n_values, answer_scores)
    plot_path = run_dir / "best_of_n.png"
    plot_best_of_n(bon, plot_path, title=f"best-of-N on {num_heldout} held-out problems")
    base = {
        "base/train_success": float(np.mean([t.outcome for t in train_trials])),
        "base/heldout_success": float(np.mean([t.outcome for t in heldout_trials])),
        "base/tokens_per_trial": float(np.mean([t.policy_tokens for t in heldout_trials])),
    }
    scalars = dict(base)
    for i, n in enumerate(bon["n"]):
        for key in ("best_of_n", "maj_at_n", "pass_at_n", "mean_outcome", "tokens"):
            scalars[f"best_of_n/{key}@{n}"] = bon[key][i]
    if log is not None:
        log(scalars, cfg.steps)
    summary = {
        **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in {**metrics, **scalars}.items()},
        "best_of_n": bon,
        "train_trials": len(train_trials),
        "heldout_trials": len(heldout_trials),
        "train_examples": len(train_ex),
        "heldout_examples": len(heldout_ex),
        "sample_time_s": t_sample,
        "wall_time_s": time.perf_counter() - t0,
        "verifier_dir": str(verifier_dir),
        "best_of_n_plot": str(plot_path),
    }
    (run_dir / "verifier_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary
