"""Where a worker computes (its device) and the few collective operations the loop needs, written so that a
single process (world size 1) needs none."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dist2.errors import UserError


def resolve_device(name: str) -> torch.device:
    """train.device (auto | cpu | cuda) -> the device this process computes on."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: 'cuda' asked for but no CUDA device is visible (use 'auto' or 'cpu')")
    return torch.device(name)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def shard(batches: list) -> list:
    """This worker's share of a list of whole batches, dealt out in turn: every batch exactly once over all
    workers (a DistributedSampler would pad with repeats, and a repeated image would count twice in COCO
    evaluation)."""
    return batches[rank()::world_size()]


def gather(items: list) -> list:
    """Concatenate every worker's list, in rank order (on every worker)."""
    if world_size() == 1:
        return items
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def from_rank_zero(obj: Any) -> Any:
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_worker(flag: bool, device: torch.device) -> bool:
    """True on every worker when `flag` is true on any: workers must take the same branch before a collective."""
    if world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sync_buffers(module: torch.nn.Module) -> None:
    """Give every worker rank 0's buffers (BatchNorm running statistics). DDP broadcasts them before each training
    forward, so after the last step each worker holds its own update; evaluation must use the saved ones."""
    if world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
