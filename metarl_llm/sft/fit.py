"""Supervised fine-tuning on token streams: :func:`sft_fit` fits records ``{"input_ids",
"completion_mask"}`` with trl's SFTTrainer, the loss on ``completion_mask == 1`` tokens only
(the policy's episodes; prompt and inserted observations are context), computed with the LM head
at those tokens only, in chunks (no [B, T, V] logits).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from dataclasses import dataclass

import torch
from transformers import PrinterCallback, TrainerCallback

from metarl_llm.models import causal_lm_scores
from metarl_llm.runtime.progress import Progress

log = logging.getLogger(__name__)


@functools.cache
def chunked_loss_trainer() -> type:
    """trl's SFTTrainer with its loss computed by :func:`metarl_llm.models.causal_lm_scores` (built on
    first use: trl loads only when an SFT runs)."""
    from trl import SFTTrainer  # deferred: start-up cost (trl loads only when an SFT runs)

    class ChunkedLossSFT(SFTTrainer):
        """trl's SFTTrainer with the loss from :func:`metarl_llm.models.causal_lm_scores`: the LM
        head at the completion tokens only, in chunks. trl's own fused head scores every position
        on devices without Triton (the prompt and observations too); the loss is the same token
        mean (``num_items_in_batch``, or this batch's completion tokens)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            ids = inputs["input_ids"]
            am = inputs.get("attention_mask")
            am = torch.ones_like(ids) if am is None else am
            scored = labels != -100  # token t is predicted from position t - 1 (labels are not shifted)
            scored[:, 0] = False
            out = causal_lm_scores(self.accelerator.unwrap_model(model), ids, am, scored)
            n = scored.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -out.logprobs.sum() / torch.as_tensor(n, device=ids.device).clamp(min=1)
            return (loss, out) if return_outputs else loss

    return ChunkedLossSFT


def sft_fit(
    model,
    tokenizer,
    records: list[dict],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    schedule: str = "cosine",
    checkpointing: bool = False,
    desc: str = "sft",
) -> list[float]:
    """Fine-tune ``model`` in place on ``records`` for ``steps`` optimiser steps of
    ``batch_size`` records (AdamW at ``lr``, warm-up over 5% of the steps then
    ``schedule``), loss on completion tokens only. Returns the logged training losses
    (ten, each the mean over a tenth of the steps)."""
    return fit_records(model, tokenizer, records, steps, batch_size, lr, seed, schedule, checkpointing, desc=desc).losses


@dataclass
class FitResult:
    losses: list[float]  # the logged training losses, each the mean over its logging window
    steps: int  # optimiser steps run


def fit_records(
    model,
    tokenizer,
    records: list[dict],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    schedule: str = "cosine",
    checkpointing: bool = False,
    stop_below: float | None = None,
    min_steps: int = 0,
    warmup_steps: int | None = None,
    desc: str = "sft",
    progress_bar: bool = True,
) -> FitResult:
    """:func:`sft_fit`, with early stopping: ``stop_below`` ends training, after at least
    ``min_steps`` steps, at the first logged loss below this level (losses are then
    logged every min(10, ``min_steps``) steps; ``steps`` is the bound). ``warmup_steps``:
    the warm-up (default 5% of ``steps``). Progress (steps, rate, ETA, the latest loss) is shown
    as ``desc`` (:class:`metarl_llm.runtime.progress.Progress`; ``progress_bar``: a bar on a terminal)."""
    from datasets import Dataset  # deferred: start-up cost (datasets loads only when it is needed)
    from trl import SFTConfig as TrlSFTConfig  # deferred: start-up cost (trl loads only when an SFT runs)

    class ShowProgress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            progress.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                progress.values["loss"] = float(logs["loss"])

    class StopBelow(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and state.global_step >= min_steps and logs["loss"] < stop_below:
                control.should_training_stop = True

    if not records:
        raise ValueError("sft_fit: no records to fit")
    for i, r in enumerate(records):
        if len(r["input_ids"]) != len(r["completion_mask"]) or not any(r["completion_mask"]):
            raise ValueError(f"sft_fit: record {i} has mismatched lengths or no completion token")
    with tempfile.TemporaryDirectory() as tmp:
        args = TrlSFTConfig(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            lr_scheduler_type=schedule,
            warmup_steps=max(1, steps // 20) if warmup_steps is None else warmup_steps,
            weight_decay=0.0,
            logging_steps=max(1, min(10, min_steps)) if stop_below is not None else max(1, steps // 10),
            save_strategy="no",
            report_to=[],
            completion_only_loss=True,
            max_length=None,
            dataloader_num_workers=0,
            seed=seed,
            data_seed=seed,
            use_cpu=not torch.cuda.is_available(),
            # trl 1.x turns bf16 autocast on by default; on a CPU without bf16 matrix units that
            # runs the slow reference GEMM (measured: tens of times slower than float32 here).
            bf16=bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
            fp16=False,
            disable_tqdm=True,
            # trl turns checkpointing on by default; on small models it only costs time.
            activation_checkpointing=checkpointing,
        )
        trainer = chunked_loss_trainer()(
            model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer
        )
        trainer.remove_callback(PrinterCallback)  # losses go to our log, not stdout
        if stop_below is not None:
            trainer.add_callback(StopBelow())
        trainer.add_callback(ShowProgress())
        with Progress(steps, desc, unit="step", bar=progress_bar) as progress:
            trainer.train()
        return FitResult([h["loss"] for h in trainer.state.log_history if "loss" in h], trainer.state.global_step)


def clean_model(model):
    """A fresh copy of a model trained by a transformers Trainer, through save/load.

    The Trainer leaves wrappers on the trained object (accelerate's autocast and fp32
    output conversion bound to ``forward``, trl's fused LM head, gradient-checkpointing
    hooks), which slow generation down several times and would follow the object into
    any deepcopy. Returns the reloaded model in eval mode with the KV cache on, on the
    original device and dtype."""
    param = next(model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        clean = type(model).from_pretrained(tmp, dtype=param.dtype)
    clean.config.use_cache = True
    return clean.to(param.device).eval()
