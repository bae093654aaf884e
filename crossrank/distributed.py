"""One process per GPU under torchrun, as nanoGPT does it with the public API: train.py and infer.py share this.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them (or with one process) nothing is initialised and
the single process uses the first GPU, else the CPU. NCCL on CUDA, gloo on CPU (how the tests run 2 processes).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from crossrank.errors import CrossrankError


@dataclasses.dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """The process that logs and writes (rank 0)."""
        return self.rank == 0


def setup_distributed(timeout: datetime.timedelta | None = None) -> Distributed:
    """This process's rank, world size and device; joins the process group when torchrun started several.
    `timeout` bounds how long a collective waits for the slowest rank (re-ranking shards may be unbalanced)."""
    cuda = torch.cuda.is_available()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible not in ("", "-1") and not cuda:  # -g 0 on a machine without a GPU must not quietly use the CPU
        raise CrossrankError(f"CUDA_VISIBLE_DEVICES={visible} (-g): no CUDA GPU is usable here "
                             f"(expected GPUs {visible}; use -g cpu to run on the CPU)")
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed(device=torch.device("cuda" if cuda else "cpu"))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        extra = {"device_id": device} if cuda else {}
        dist.init_process_group("nccl" if cuda else "gloo", **extra, **({"timeout": timeout} if timeout else {}))
    return Distributed(rank, world, device)


def lock_outputs(held: contextlib.ExitStack, paths: list, ddp: Distributed) -> None:
    """Take the output locks of `paths` (`crossrank.data.outputs.output_lock`) into `held` on rank 0 only, and tell
    every rank whether that worked: the ranks of one job never block each other, and when another job writes
    an output, all ranks stop with the same CrossrankError (rank 0 reports it)."""
    from crossrank.data.outputs import output_lock

    error = None
    if ddp.is_main:
        try:
            for path in paths:
                held.enter_context(output_lock(path))
        except CrossrankError as e:
            error = str(e)
    if ddp.world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CrossrankError(error)
