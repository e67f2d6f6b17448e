"""Checkpoints that a crash cannot corrupt, and exact resume.

Layout of ``<run_dir>/checkpoints/``::

    iter_000020/            one complete checkpoint
        policy/             the policy's weights (LoRA: merged) and tokenizer: what
                            ``load_policy`` and ``python -m metarl_llm.evaluate`` read
        adapter/            LoRA only: the adapter alone (peft format)
        trainer_state.pt    value head, critic trunk, optimiser, iteration, every random
                            generator, counters, the W&B run id, the warm-start cache key,
                            the number of metrics.jsonl rows written before it (a resume
                            keeps exactly those)
        COMPLETE            written last: a checkpoint without it is partial and ignored
    latest                  the name of the newest complete checkpoint

A checkpoint is written under a temporary name (``.tmp_iter_...``), marked COMPLETE,
renamed into place, and only then is ``latest`` replaced (write a temporary file,
``os.replace``). A process killed at any moment leaves ``latest`` at a complete
checkpoint. Older checkpoints beyond ``keep`` are deleted after the pointer moved.

Resume (:func:`find_checkpoint`) takes the checkpoint ``latest`` names when it is
complete, else the newest complete one (a partial or corrupted one is skipped with a
warning).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from metarl_llm.models import save_policy

log = logging.getLogger(__name__)


COMPLETE = "COMPLETE"
_NAME = re.compile(r"^iter_(\d{6,})$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path, iteration: int, actor_critic, tokenizer, optimizer, extra: dict | None = None, keep: int = 0
) -> Path:
    """Write ``checkpoints/iter_XXXXXX`` atomically and point ``latest`` at it.

    ``extra`` (random generator states, counters, ...) goes into ``trainer_state.pt``
    beside the value head, critic trunk, optimiser state and iteration. ``keep`` > 0
    deletes the oldest complete checkpoints beyond that number (never the newest).
    """

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".tmp_iter_{iteration:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_policy(actor_critic, tmp)
    tokenizer.save_pretrained(tmp / "policy")
    state = {
        "value_head": actor_critic.value_head.state_dict(),
        "critic_trunk": actor_critic.critic_trunk.state_dict() if actor_critic.critic_trunk is not None else None,
        "optimizer": optimizer.state_dict(),
        "iteration": iteration,
        **(extra or {}),
    }
    torch.save(state, tmp / "trainer_state.pt")
    (tmp / COMPLETE).write_text(f"{iteration}\n")
    _fsync_dir(tmp)
    if final.exists():  # an unreferenced leftover of a run killed after its rename (never what `latest` names)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    if keep > 0:
        for old in complete_checkpoints(root)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(path: Path) -> bool:
    """A checkpoint directory with its COMPLETE marker, policy weights and trainer state."""
    return (path / COMPLETE).is_file() and (path / "trainer_state.pt").is_file() and (path / "policy").is_dir()


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete ``iter_*`` checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint to resume from: ``path`` is a run directory (its ``latest`` if that
    is complete, else its newest complete checkpoint, else None) or a checkpoint
    directory (which must be complete)."""
    path = Path(path).expanduser()
    if _NAME.match(path.name):
        if not is_complete(path):
            raise ValueError(f"resume: checkpoint {path} is incomplete (no {COMPLETE} marker, trainer_state.pt or policy/)")
        return path
    root = path / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            return named
        log.warning("resume: %s names %s, which is incomplete; using the newest complete checkpoint", pointer, named.name)
    found = complete_checkpoints(root)
    partial = [p.name for p in root.iterdir() if p.name.startswith(".tmp_iter_")] if root.is_dir() else []
    if partial:
        log.warning("resume: ignoring partial checkpoint(s) %s", partial)
    return found[-1] if found else None


def remove_partial(root: Path) -> list[str]:
    """Delete the ``.tmp_iter_*`` directories a killed save left under ``root``; their names."""
    gone = []
    for p in sorted(root.glob(".tmp_iter_*")) if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p.name)
    return gone


def load_trainer_state(checkpoint: Path) -> dict:
    """``trainer_state.pt`` of a complete checkpoint (CPU tensors)."""
    return torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)


def rng_states(generator: torch.Generator, problem_rng: np.random.Generator) -> dict:
    """Every random generator a training run draws from."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generator": generator.get_state(),
        "problem_rng": problem_rng.bit_generator.state,
    }


def restore_rng_states(states: dict, generator: torch.Generator, problem_rng: np.random.Generator) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    generator.set_state(states["generator"])
    problem_rng.bit_generator.state = states["problem_rng"]


def load_model_weights(actor_critic, checkpoint: Path, state: dict) -> None:
    """Put a checkpoint's trained weights into a freshly built ``actor_critic`` (the same
    config): the full policy from ``policy/`` or, with LoRA, the adapter from
    ``adapter/``; the value head and the critic trunk from ``state``."""

    if getattr(actor_critic, "adapter", None) is not None:
        from peft import set_peft_model_state_dict  # deferred: start-up cost (peft loads only when LoRA is on)

        files = sorted((checkpoint / "adapter").glob("*.safetensors"))
        if not files:
            raise ValueError(f"resume: {checkpoint} has no adapter/ weights, but model.lora.r > 0")
        set_peft_model_state_dict(actor_critic.adapter, load_file(str(files[0])))
    else:
        files = sorted((checkpoint / "policy").glob("*.safetensors"))
        if not files:
            raise ValueError(f"resume: {checkpoint}/policy has no safetensors weights")
        weights = {}
        for f in files:
            weights.update(load_file(str(f)))
        missing, unexpected = actor_critic.policy.load_state_dict(weights, strict=False)
        # Tied embeddings are saved once; anything else missing is an error.
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"resume: {checkpoint} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    actor_critic.value_head.load_state_dict(state["value_head"])
    if actor_critic.critic_trunk is not None:
        actor_critic.critic_trunk.load_state_dict(state["critic_trunk"])
