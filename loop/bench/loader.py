"""Throughput of the two ways of serving voxel samples, against a training step's consumption."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset


@dataclass
class Throughput:
    """Samples per second of one configuration."""

    name: str
    samples: int
    seconds: float

    @property
    def per_second(self) -> float:
        """Samples per second."""
        return self.samples / self.seconds


def loader_throughput(
    name: str, dataset: Dataset, *, batch_size: int, num_workers: int, batches: int, sampler=None
) -> Throughput:
    """Time ``batches`` steady-state batches from a DataLoader over ``dataset``."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        sampler=sampler,
        shuffle=sampler is None,
        persistent_workers=False,
    )
    it = iter(loader)
    # Skip the batches workers prefetch before timing starts (2 per worker), plus one warm-up.
    for _ in range(2 * num_workers + 1):
        next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        n += int(batch["density"].shape[0])
    return Throughput(name, n, time.perf_counter() - start)


def train_step_throughput(*, grid: int = 32, batch_size: int = 10, steps: int = 3) -> Throughput:
    """Samples per second consumed by UNet3D training steps (forward, loss, backward, Adam) on the CPU."""
    import torch.nn.functional as F

    from crystaloop.generative.models.unet import UNet3D

    model = UNet3D(list(range(1, 84)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch_size, 1, grid, grid, grid)
    target = torch.randint(0, model.n_classes, (batch_size, grid, grid, grid))

    def step() -> None:
        out = model(x)
        loss = F.cross_entropy(out.species_logits, target) + out.mask_logits.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return Throughput(
        f"UNet3D train step (batch {batch_size}, grid {grid})",
        steps * batch_size,
        time.perf_counter() - start,
    )


def measure_loaders(records, *, batch_size: int, batches: int) -> tuple[list[Throughput], float]:
    """Samples/s of on-the-fly voxelisation and of shards (0 and 2 workers each), and of UNet
    training steps; and the shards' size on disk (bytes per structure).

    ``records`` are :class:`~crystaloop.generative.train.data.LabelledStructure` (a prior file's).
    """
    import tempfile
    from pathlib import Path

    from crystaloop.generative.data.dataset import VoxelDataset
    from crystaloop.generative.data.shards import ShardDataset, ShardOrderSampler, write_shards
    from crystaloop.properties import LABEL_NAMES

    results = []
    fly = VoxelDataset(records, LABEL_NAMES, augment=True)
    for workers in (0, 2):
        results.append(
            loader_throughput(
                f"on the fly, {workers} workers",
                fly,
                batch_size=batch_size,
                num_workers=workers,
                batches=batches,
            )
        )
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_shards(records, Path(tmp), LABEL_NAMES, shard_size=128)
        size = sum(f.stat().st_size for f in Path(tmp).glob("shard-*.npz"))
        shard_set = ShardDataset(manifest, augment=True)
        for workers in (0, 2):
            results.append(
                loader_throughput(
                    f"shards, {workers} workers",
                    shard_set,
                    batch_size=batch_size,
                    num_workers=workers,
                    batches=batches,
                    sampler=ShardOrderSampler(shard_set),
                )
            )
    results.append(train_step_throughput(batch_size=batch_size))
    return results, size / len(records)
