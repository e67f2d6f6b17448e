"""Data-parallel training through accelerate: one process per device (or CPU slot).

    accelerate launch --multi_gpu --num_processes 2 train.py device=cpu   # 2 CPU processes (gloo; accelerate's --cpu form starts one)
    accelerate launch --config_file ddp.yaml train.py ...           # GPUs: DDP, FSDP or DeepSpeed configs

What is split and what is shared (``world`` processes, ``rank`` this one):

- every process draws the same global random numbers (problem seeds, the trials'
  sampling keys, the minibatch order) from the same seeded generators, so the global
  batch is the one a single process would build;
- problems are sharded: process ``rank`` plays the trials of problems
  ``[rank * P / world, (rank + 1) * P / world)`` (``algo.problems_per_iter`` divisible by
  the world size), so the groups of GRPO/RLOO never straddle processes;
- the rollout batches are then all-gathered, so every process holds the global batch
  and takes its strided share of every minibatch; the gradients are averaged by the
  wrapped model (DDP) and the loss is normalised by the *global* token count, so one
  update equals the single-process update of the same global batch (up to float
  reduction order);
- only the main process writes: the run directory, checkpoints, metrics.jsonl and the
  W&B run. Evaluation runs on the main process while the others wait.

A single process (no launcher) gets ``world == 1`` and every method is the identity.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

RUN_TIME_ENV = "METARL_RUN_TIME"  # the launch time every process names the run directory by


def launched_world_size() -> int:
    """Processes of this launch, from the launcher's environment (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Dist:
    """The process group as the trainer uses it (accelerate's ``PartialState``).

    ``cpu``: gloo CPU processes (None: when no CUDA device is present)."""

    def __init__(self, cpu: bool | None = None):
        self.world = launched_world_size()
        self.state = None
        if self.world > 1:
            from accelerate import PartialState  # deferred: start-up cost (accelerate loads only under a multi-process launcher)

            if cpu is None:
                cpu = not torch.cuda.is_available()
            # accelerate keeps one process state; the first Dist of a process fixes CPU or GPU.
            self.state = PartialState(
                cpu=bool(cpu), timeout=timedelta(minutes=60)
            )  # bounded waits (evaluation on the main process)
            self.world = self.state.num_processes
        self.rank = self.state.process_index if self.state is not None else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        return self.state.device if self.state is not None else None

    def shard(self, n: int, what: str = "items") -> range:
        """This process's contiguous share of ``n`` items (``n`` divisible by the world size)."""
        if n % self.world:
            raise ValueError(f"{what}={n} is not divisible by the {self.world} processes of this launch")
        per = n // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over processes (a copy; ``x`` is left alone)."""
        if self.world == 1:
            return x
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    def all_gather_objects(self, obj) -> list:
        """Every process's ``obj``, in rank order (pickled; for small host-side values)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """The main process's ``obj`` on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def agree_on_run_time(cpu: bool | None = None) -> float:
    """The launch time shared by all processes (the main process's clock), also exported
    as ``$METARL_RUN_TIME`` so that the run directory resolves the same everywhere."""
    if RUN_TIME_ENV in os.environ:
        return float(os.environ[RUN_TIME_ENV])
    stamp = time.time()
    if launched_world_size() > 1:
        stamp = Dist(cpu).broadcast_object(stamp)
    os.environ[RUN_TIME_ENV] = repr(stamp)
    return stamp


def run_time(fmt: str) -> str:
    """OmegaConf resolver ``${run_time:%H-%M-%S}``: the launch time formatted; the same in
    every process of a launch and at every call within one process."""
    stamp = float(os.environ[RUN_TIME_ENV]) if RUN_TIME_ENV in os.environ else agree_on_run_time()
    return time.strftime(fmt, time.localtime(stamp))


def gather_batch(d: Dist, batch):
    """The global rollout batch: every process's ``RolloutBatch`` (CPU tensors), padded
    to the longest stream and concatenated in rank order, on every process."""
    if d.world == 1:
        return batch
    parts = d.all_gather_objects(batch)
    width = max(p.input_ids.shape[1] for p in parts)
    fields = []
    for name in type(batch)._fields:
        pad = -1 if name == "episode_index" else 0
        cols = [getattr(p, name) for p in parts]
        if cols[0].dim() == 2:
            cols = [torch.nn.functional.pad(c, (0, width - c.shape[1]), value=pad) for c in cols]
        fields.append(torch.cat(cols))
    return type(batch)(*fields)


def prepare_data_parallel(d: Dist, module: torch.nn.Module, optimizer, use_critic: bool):
    """(wrapped module, optimizer) through ``accelerate.Accelerator.prepare``: DDP here,
    or FSDP / DeepSpeed as the launch's accelerate config says. The update then calls the
    wrapped module's ``forward`` (``ActorCritic.forward``), so gradients are averaged over
    processes. Parameters outside the loss (the value head when the advantage needs no
    critic) are frozen first: DDP requires every trainable parameter to get a gradient."""
    from accelerate import Accelerator  # deferred: start-up cost (accelerate loads only under a multi-process launcher)

    if not use_critic:
        for p in module.critic_parameters():
            p.requires_grad_(False)
    accelerator = Accelerator(cpu=d.device is not None and d.device.type == "cpu")
    wrapped, optimizer = accelerator.prepare(module, optimizer)
    return wrapped, optimizer
