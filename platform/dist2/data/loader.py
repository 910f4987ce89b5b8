"""The training loader: built once per run, sharded over workers, optionally grouped by aspect ratio; and the
batches inference reads (`same_size_batches`).

Two guarantees, whatever the settings:
- every worker draws the same number of batches per epoch (DDP hangs otherwise), and
- an epoch's batches and augmentation depend on (seed, epoch) alone, so that a resumed run draws exactly what an
  unbroken one would. With loader processes (`data.num_workers` > 0) the processes persist across epochs and keep
  their random state, so each sample carries its own seed, drawn from (seed, epoch, index), and reseeds the
  augmentation before it is drawn; without them the main process's RNG, seeded per epoch by the loop, draws it.

Aspect-ratio grouping (`data.group_aspect_ratio`, as torchvision's detection references): an image with width >=
height is only batched with others of its kind, so a batch of mixed 4:3 and 3:4 images is not padded to a square.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler

from dist2.config import DataConfig
from dist2.data.coco import CocoDetection, collate


def aspect_groups(dataset: CocoDetection) -> list[int]:
    """0 for an image at least as wide as it is high, 1 for a taller one (from the annotation file's sizes)."""
    return [int(dataset.coco.imgs[i]["width"] < dataset.coco.imgs[i]["height"]) for i in dataset.ids]


def same_size_batches(dataset: CocoDetection, batch_size: int, indices: Iterable[int] | None = None) -> list[list[int]]:
    """The dataset's indices (or `indices`) in batches of images of one size (the annotation file's width and
    height), in their order within each size, sizes in order of first appearance.

    Why: the detector pads a batch to its largest image, and the padding is context its convolutions see, so an
    image's detections depend on what it is batched with (the quick FCOS teacher scored 53.6 mAP at batch 1 and
    61.2 at batch 8 on the same checkpoint). Images of one size pad alike, alone or together: inference on these
    batches gives every image the detections it gets alone, whatever the batch size or the number of workers, as
    torchvision's detection reference (which evaluates at batch 1) does."""
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index in range(len(dataset)) if indices is None else indices:
        info = dataset.coco.imgs[dataset.ids[index]]
        by_size[info["width"], info["height"]].append(index)
    return [group[i:i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)]


class GroupedBatchSampler(BatchSampler):
    """Batches of one group each, in the order the sampler yields their indices (torchvision references'
    GroupedBatchSampler). Exactly len(sampler) // batch_size batches (at least one): leftovers of a group are
    topped up with that group's own earlier indices, so every shard of a DistributedSampler gets the same count."""

    def __init__(self, sampler: Sampler, group_ids: list[int], batch_size: int):
        super().__init__(sampler, batch_size, drop_last=False)
        self.group_ids = group_ids

    def __iter__(self):
        buffers, seen = defaultdict(list), defaultdict(list)
        emitted = 0
        for index in self.sampler:
            group = self.group_ids[index]
            buffers[group].append(index)
            seen[group].append(index)
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
                emitted += 1
                if emitted == len(self):
                    return
        # The rest: the fullest leftover groups first, each topped up from its own indices of this epoch.
        for group, rest in sorted(buffers.items(), key=lambda kv: -len(kv[1])):
            if emitted == len(self):
                return
            yield (rest + list(itertools.islice(itertools.cycle(seen[group]), self.batch_size - len(rest))))
            emitted += 1

    def __len__(self) -> int:
        return max(1, len(self.sampler) // self.batch_size)


class SeededBatches(Sampler):
    """(index, seed) batches: each sample's augmentation seed from (seed, epoch, index), for loader processes that
    outlive an epoch (CocoDetection reseeds from it before drawing)."""

    def __init__(self, batches: BatchSampler, seed: int):
        self.batches, self.seed, self.epoch = batches, seed, 0

    def __iter__(self):
        for batch in self.batches:
            yield [(i, ((self.seed * 100_003 + self.epoch) * 1_000_003 + i) % 2**63) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class TrainLoader:
    """This worker's shard of the training set, batched; `epoch(e)` iterates epoch e's batches."""

    def __init__(self, dataset: CocoDetection, cfg: DataConfig, batch_size: int, seed: int, world: int, rank: int,
                 pin_memory: bool):
        self.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        if cfg.group_aspect_ratio:
            batches = GroupedBatchSampler(self.sampler, aspect_groups(dataset), batch_size)
        else:
            batches = BatchSampler(self.sampler, batch_size, drop_last=False)
        self.seeded = SeededBatches(batches, seed) if cfg.num_workers > 0 else None
        # Kept processes draw their base seed once, from a generator of their own: not from the global RNG, which
        # the loop seeds per epoch (a resumed run must not be one draw off an unbroken one). Without processes the
        # loader draws from the global RNG once per epoch, as it always has: their runs keep their numbers.
        generator = torch.Generator().manual_seed(seed) if self.seeded is not None else None
        self.loader = DataLoader(dataset, batch_sampler=batches if self.seeded is None else self.seeded,
                                 collate_fn=collate, num_workers=cfg.num_workers,
                                 persistent_workers=cfg.num_workers > 0, pin_memory=pin_memory, generator=generator)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        if self.seeded is not None:
            self.seeded.epoch = epoch
        return self.loader
