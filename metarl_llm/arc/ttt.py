"""Test-time training (TTT) for ARC: a per-problem LoRA fitted on the problem's own
demonstrations (Akyuerek et al. 2024, "The Surprising Effectiveness of Test-Time
Training for Abstract Reasoning").

Data (:func:`leave_one_out_tasks`): a task with n >= 2 demonstrations gives n
leave-one-out (LOO) tasks, demonstration i held out as the query (its output is the
target) and the other demonstrations as context; they are expanded with random
invertible transforms (:mod:`metarl_llm.arc.augment`: dihedral group, colour
permutations) and random reorderings of the context. The task's test pairs are never
read, so the real answer cannot leak into training.

Each example is the ARC environment's episode format::

    prompt = task_prompt(context_pairs, query_input)   # "in>out" lines, "query>", "\n"
    target = "Answer: " + format_grid(query_output)      # then the EOS token

tokenised as ``encode(prompt, add_special_tokens=True) + encode(target) + [eos]`` (the
prompt as the rollout tokenises it, the target as the tokens the policy would
generate); the loss is the mean cross-entropy over the target and EOS tokens only.

Training (:class:`TestTimeTrainer`): the base causal LM is wrapped once with a peft
LoRA adapter; ``adapt(task)`` resets the adapter (lora_B = 0, so the model computes
exactly the base model's outputs) and fits the LoRA parameters only, with AdamW, for
``epochs`` passes over the LOO examples in minibatches. After ``adapt`` the trainer's
``model`` is the adapted policy (generate with it, e.g.
:func:`metarl_llm.arc.vote.predict_with_voting`). The *control* of the TTT
experiments (adapting on another problem's demonstrations) is ``adapt(other_task)``
followed by prediction on the problem of interest.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import zlib
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from envs.arc_grids import ArcTask, Grid, task_prompt
from metarl_llm.arc.augment import IDENTITY, Transform, permute_pairs, random_transforms, single_row
from metarl_llm.arc.vote import ANSWER_MARKER, answer_text
from metarl_llm.config import TTTConfig  # noqa: F401  (re-exported)
from metarl_llm.core.batch import pad_rows
from metarl_llm.models import causal_lm_scores, inject_lora, seeded

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ LOO data


class LooSplit(NamedTuple):
    """One leave-one-out task, in the (possibly transformed) frame of ``transform``.

    context:   the demonstration pairs shown (input, output), never the held-out pair.
    query:     the held-out demonstration's input.
    target:    its output (the training target).
    held_out:  index of the held-out demonstration in ``task.train``.
    transform: the transform applied to every grid (identity for the un-augmented task).
    """

    context: tuple[tuple[Grid, Grid], ...]
    query: Grid
    target: Grid
    held_out: int
    transform: Transform


def leave_one_out_splits(
    task: ArcTask, rng: np.random.Generator, num_augmentations: int, max_tasks: int, colours: bool = True
) -> list[LooSplit]:
    """The augmented leave-one-out tasks of ``task`` (only ``task.train`` is read).

    Un-augmented: for each distinct demonstration i (a pair equal to an earlier one is
    not held out again), the context is every other demonstration in the task's order,
    *minus any pair identical to the held-out one*, so the held-out pair never appears
    in its own context even when the task repeats a pair (a different input with the
    same output is a legitimate demonstration and is kept). A held-out pair left with
    no context (every demonstration identical) is skipped.

    Augmented: ``num_augmentations`` random transforms (:func:`random_transforms`; for a
    task of 1-row grids only the row-preserving ones, identity and fliplr,
    ``colours`` as given), each applied to every un-augmented LOO task with its context
    in a random order.

    At most ``max_tasks`` splits are returned: the un-augmented ones first (a random
    subset of them if there are more than ``max_tasks``), then a random subset of the
    augmented ones, each part in generation order.
    """
    if not isinstance(task, ArcTask):
        raise ValueError(f"leave_one_out: task must be an ArcTask, got {type(task).__name__}")
    if len(task.train) < 2:
        raise ValueError(f"leave_one_out: task {task.task_id} has {len(task.train)} demonstration(s); needs at least 2")
    if num_augmentations < 0:
        raise ValueError(f"leave_one_out: num_augmentations must be >= 0, got {num_augmentations}")
    if max_tasks < 1:
        raise ValueError(f"leave_one_out: max_tasks must be >= 1, got {max_tasks}")
    pairs = task.train
    base: list[LooSplit] = []
    for i, held in enumerate(pairs):
        if held in pairs[:i]:
            continue  # an identical pair was already held out
        context = tuple(p for j, p in enumerate(pairs) if j != i and p != held)
        if context:
            base.append(LooSplit(context, held[0], held[1], i, IDENTITY))
    if not base:
        raise ValueError(f"leave_one_out: task {task.task_id} has no two distinct demonstrations")
    augmented: list[LooSplit] = []
    for t in random_transforms(rng, num_augmentations + 1, colours, rows_only=single_row(task))[1:]:
        for s in base:
            ctx = t.apply_pairs(permute_pairs(s.context, rng))
            augmented.append(LooSplit(ctx, t.apply(s.query), t.apply(s.target), s.held_out, t))
    if len(base) >= max_tasks:
        return [base[int(k)] for k in np.sort(rng.choice(len(base), max_tasks, replace=False))]
    room = min(max_tasks - len(base), len(augmented))
    return base + [augmented[int(k)] for k in np.sort(rng.choice(len(augmented), room, replace=False))]


def loo_example(split: LooSplit, marker: str = ANSWER_MARKER) -> tuple[str, str]:
    """(prompt_text, target_text) of a split: ``task_prompt(context, query)`` and
    ``"Answer: <target grid>"`` (the EOS token is appended at tokenisation)."""
    return task_prompt(split.context, split.query), answer_text(split.target, marker)


def leave_one_out_tasks(
    task: ArcTask, rng: np.random.Generator, num_augmentations: int, max_tasks: int, colours: bool = True
) -> list[tuple[str, str]]:
    """(prompt_text, target_text) pairs of :func:`leave_one_out_splits` (see
    :func:`loo_example` for the format)."""
    return [loo_example(s) for s in leave_one_out_splits(task, rng, num_augmentations, max_tasks, colours)]


def task_rng(task_id: str, seed: int) -> np.random.Generator:
    """A generator seeded by (seed, a stable hash of the task id): different problems get
    different augmentations, the same problem the same ones on every run."""
    return np.random.default_rng([int(seed), zlib.crc32(task_id.encode("utf-8"))])


# ------------------------------------------------------------------ training


class Encoded(NamedTuple):
    """A tokenised example: ids (prompt + target + EOS) and the loss mask (1 on target+EOS)."""

    ids: list[int]
    mask: list[int]


def encode_examples(tokenizer, examples: Sequence[tuple[str, str]]) -> list[Encoded]:
    """Tokenise (prompt, target) pairs: ``encode(prompt, add_special_tokens=True) +
    encode(target) + [eos]``, mask 0 on the prompt and 1 on the rest."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("encode_examples: the tokenizer has no EOS token")
    out = []
    for prompt, target in examples:
        p = tokenizer.encode(prompt, add_special_tokens=True)
        t = tokenizer.encode(target, add_special_tokens=False) + [eos]
        out.append(Encoded(p + t, [0] * len(p) + [1] * len(t)))
    return out


def _collate(batch: Sequence[Encoded], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and loss mask, each [B, T]."""
    ids, attn = pad_rows([e.ids for e in batch], pad_id)
    loss_mask = pad_rows([e.mask for e in batch], 0.0, width=ids.shape[1], dtype=torch.float32)[0]
    return ids.to(device), attn.to(device), loss_mask.to(device)


def _masked_loss(model, ids: torch.Tensor, attn: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies on loss_mask positions, number of such tokens)."""
    lp = causal_lm_scores(model, ids, attn, loss_mask > 0).logprobs  # the LM head at the loss positions only
    m = loss_mask * attn
    m[:, 0] = 0  # the first token has no prediction
    return -(lp * m).sum(), m.sum()


class TestTimeTrainer:
    """Per-problem LoRA test-time training of a causal LM.

    ``TestTimeTrainer(model, tokenizer, cfg)`` wraps ``model`` once with a LoRA adapter
    (``peft.get_peft_model``; LoRA A initialised from ``cfg.seed``, B zero). This
    **modifies ``model`` in place**: LoRA layers are injected into its target modules
    and its own parameters are frozen (``requires_grad=False``); no copy of the base
    weights is made. Use :attr:`model` (the ``PeftModel``) from then on.

    - :meth:`reset` restores the initial adapter (B = 0: outputs exactly the base model's).
    - :meth:`adapt` ``(task)``: reset, then fit the LoRA parameters on the task's LOO
      examples; returns the per-step losses. ``adapt(other_task)`` is the control.
    - :meth:`fit` ``(examples)``: reset-free fitting of given (prompt, target) pairs.
    - :meth:`loss` ``(examples)``: the mean target-token loss of the current model.
    - :meth:`base_model` (a context manager): run with the adapter disabled.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, model: torch.nn.Module, tokenizer, cfg: TTTConfig | None = None):
        self.cfg = cfg if cfg is not None else TTTConfig()
        self.cfg.validate()
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError("TestTimeTrainer: the tokenizer has no EOS token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.device = next(model.parameters()).device
        c = self.cfg
        self.model = inject_lora(model, c.r, c.alpha, c.dropout, c.target_modules, c.seed, option="ttt")
        self.params = [p for _, p in self.model.named_parameters() if p.requires_grad]
        self._lora_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self._initial = [p.detach().clone() for p in self.params]
        self.model.eval()

    @property
    def num_parameters(self) -> int:
        """Trainable (LoRA) parameters."""
        return sum(p.numel() for p in self.params)

    @torch.no_grad()
    def reset(self) -> None:
        """Restore the initial adapter in place: LoRA A as initialised, B zero, so the
        model's outputs equal the base model's exactly. The base model is untouched."""
        for p, p0 in zip(self.params, self._initial):
            p.copy_(p0)
        self.model.eval()

    def examples(self, task: ArcTask, seed: int | None = None) -> list[tuple[str, str]]:
        """The LOO (prompt, target) pairs :meth:`adapt` trains on, seeded by
        (``seed`` or ``cfg.seed``, the task id)."""
        rng = task_rng(task.task_id, self.cfg.seed if seed is None else seed)
        return leave_one_out_tasks(task, rng, self.cfg.num_augmentations, self.cfg.max_tasks, self.cfg.colour_augment)

    def adapt(self, task: ArcTask, seed: int | None = None) -> list[float]:
        """Reset the adapter, then fit it on ``task``'s LOO examples (demonstrations only;
        the test pairs are never read). ``task`` may be another problem than the one
        predicted next (the control). Returns the loss of every optimiser step."""
        self.reset()
        return self.fit(self.examples(task, seed), seed)

    def _encode(self, examples: Sequence[tuple[str, str]]) -> list[Encoded]:
        enc = encode_examples(self.tokenizer, examples)
        if self.cfg.max_length is not None:
            kept = [e for e in enc if len(e.ids) <= self.cfg.max_length]
            if len(kept) < len(enc):
                log.info(
                    "ttt: dropped %d of %d examples longer than max_length=%d",
                    len(enc) - len(kept),
                    len(enc),
                    self.cfg.max_length,
                )
            enc = kept
        if not enc:
            raise ValueError(f"ttt: no example fits ttt.max_length={self.cfg.max_length}")
        return enc

    def fit(self, examples: Sequence[tuple[str, str]], seed: int | None = None) -> list[float]:
        """Fit the LoRA parameters (from their current values, with a fresh AdamW) on
        (prompt, target) pairs: ``cfg.epochs`` passes in shuffled minibatches of
        ``cfg.batch_size``, loss on target+EOS tokens. Returns the per-step losses (the
        mean token loss of each minibatch). Leaves the model in eval mode."""
        if not examples:
            raise ValueError("ttt.fit: no examples")
        cfg = self.cfg
        seed = cfg.seed if seed is None else seed
        enc = self._encode(examples)
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        order_rng = np.random.default_rng([int(seed), len(enc)])
        losses: list[float] = []
        self.model.train()
        try:
            with seeded(seed, self.device):
                for _ in range(cfg.epochs):
                    order = order_rng.permutation(len(enc))
                    for s in range(0, len(enc), cfg.batch_size):
                        ids, attn, mask = _collate([enc[k] for k in order[s : s + cfg.batch_size]], self.pad_id, self.device)
                        total, count = _masked_loss(self.model, ids, attn, mask)
                        loss = total / count
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        if cfg.max_grad_norm > 0:
                            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                        opt.step()
                        losses.append(float(loss.detach()))
        finally:
            self.model.eval()
            opt.zero_grad(set_to_none=True)
        return losses

    @torch.no_grad()
    def loss(self, examples: Sequence[tuple[str, str]], batch_size: int | None = None) -> float:
        """Mean cross-entropy per target token (target + EOS) of the current model on
        (prompt, target) pairs, in eval mode."""
        if not examples:
            raise ValueError("ttt.loss: no examples")
        enc = self._encode(examples)
        bs = batch_size or self.cfg.batch_size
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0.0
        try:
            for s in range(0, len(enc), bs):
                t, c = _masked_loss(self.model, *_collate(enc[s : s + bs], self.pad_id, self.device))
                total, count = total + float(t), count + float(c)
        finally:
            self.model.train(was_training)
        return total / count

    @contextlib.contextmanager
    def base_model(self) -> Iterator[torch.nn.Module]:
        """Context manager: inside it :attr:`model` (yielded) runs without the adapter,
        i.e. as the base model; the adapter is re-enabled on exit."""
        with self.model.disable_adapter():
            yield self.model


def problem_adapter(policy: torch.nn.Module, tokenizer, cfg: TTTConfig):
    """``adapt=ttt`` for :func:`metarl_llm.evaluation.heldout.evaluate`: a callable that, given an
    ARC environment reset to a problem (it must expose ``task``, an ArcTask), fits a
    fresh LoRA on that problem's leave-one-out tasks and returns the adapted model.

    The trainer wraps a *copy* of ``policy`` (peft injects its layers in place), so the
    policy being trained is never touched; the copy's adapter is reset before each
    problem, so problems never see each other's adaptation."""

    cfg.validate()
    trainer = TestTimeTrainer(copy.deepcopy(policy), tokenizer, cfg)

    def adapt(env) -> torch.nn.Module:
        task = getattr(env, "task", None)
        if not isinstance(task, ArcTask):
            raise ValueError(
                f"adapt=ttt needs an environment whose problems are ARC tasks (env.task); {type(env).__name__} has none"
            )
        trainer.adapt(task)
        return trainer.model

    return adapt
