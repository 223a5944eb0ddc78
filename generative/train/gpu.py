"""Train the Cond-DFC-VAE from precomputed shards on one GPU: a task of the one training loop,
:func:`crystaloop.generative.train.fit.fit`, in its step mode. It needs torch and numpy alone.

The GPU machine has neither pymatgen nor the project's other dependencies: install crystaloop
there without them (``pip install --no-deps --no-build-isolation .`` from a checkout, or a wheel
built here), then::

    python -m crystaloop.generative.train.gpu --shards SHARDS --out RUN --steps 6000 --batch-size 512

(``python generative/train/gpu.py ...`` from the checkout runs the same.) ``SHARDS`` is a
directory of ``shard-*.npz`` files and ``manifest.json``: the output of
``crystaloop data shards`` (eq. 1 density, the paper's representation) or of
``crystaloop train site-shards`` (site channels). The representation and grid are read from the
manifest. Site shards that carry ``species`` train the species head too (cross-entropy at the
site voxels, ``--species-weight``; ``--species-weight 0`` trains without the head), and after
training a Gaussian mixture is fitted to the posterior means of the shard structures and stored
as the latent prior of random samples (``--prior-components``). Training uses automatic mixed
precision (bfloat16 autocast on CUDA), random cube rotations, a cosine learning-rate schedule to
0, and writes ``RUN/last.pt`` every ``--save-every`` steps (resumable with ``--resume``: it holds
the batch and rotation generator and the torch RNGs too, so a resumed run draws the batches a
straight run would; resuming a finished run writes ``RUN/vae.pt`` again) and ``RUN/vae.pt`` in
the checkpoint format of :mod:`crystaloop.generative.models.checkpoint`; register it on the CPU
side with ``crystaloop models register RUN/vae.pt --version NAME``.

The decile condition is fitted on the shard labels of the condition property, like
``crystaloop train vae`` does on its training split; the shards hold only training structures
when they were written from one (``--split train``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from crystaloop.generative.device import resolve_device
from crystaloop.generative.grid import coordinate_channels, cube_rotations
from crystaloop.generative.models.checkpoint import save_model
from crystaloop.generative.models.condition import DecileCondition
from crystaloop.generative.models.vae import CondDFCVAE, VAELossWeights, vae_loss
from crystaloop.generative.train.fit import fit


def load_shards(directory: Path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Manifest, voxel channels (N, C, g, g, g; float16), lattices (N, 3, 3), labels (N, P) and the
    per-voxel species targets (N, g, g, g; int16), or None where the shards carry none."""
    manifest = json.loads((directory / "manifest.json").read_text())
    channels, lattices, labels, species = [], [], [], []
    for shard in manifest["shards"]:
        with np.load(directory / shard["file"]) as data:
            values = data["sites"] if "sites" in data.files else data["density"][:, None]
            channels.append(values.astype(np.float16))
            lattices.append(data["lattice"].astype(np.float32))
            labels.append(data["labels"].astype(np.float32))
            species.append(data["species"].astype(np.int16) if "species" in data.files else None)
    targets = None if any(s is None for s in species) else np.concatenate(species)
    return manifest, np.concatenate(channels), np.concatenate(lattices), np.concatenate(labels), targets


def standard_lattice(lattices: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) lattices re-expressed in pymatgen's ``Lattice.from_parameters`` orientation.

    c along z, a in the xz plane: the orientation of the stored (shard) lattices and of every
    lattice the CPU trainer's augmentation yields (``_rotated_lattice``), so the coordinate
    channels stay in one frame whatever the rotation; only the lengths and angles change.
    """
    m = lattices.double()
    va, vb, vc = m.unbind(1)
    a, b, c = m.norm(dim=-1).unbind(-1)
    cos_alpha = ((vb * vc).sum(-1) / (b * c)).clamp(-1, 1)
    cos_beta = ((va * vc).sum(-1) / (a * c)).clamp(-1, 1)
    cos_gamma = ((va * vb).sum(-1) / (a * b)).clamp(-1, 1)
    sin_alpha, sin_beta = (1 - cos_alpha**2).sqrt(), (1 - cos_beta**2).sqrt()
    val = ((cos_alpha * cos_beta - cos_gamma) / (sin_alpha * sin_beta)).clamp(-1, 1)  # cos(gamma*)
    zero = torch.zeros_like(a)
    out = torch.stack(
        [
            torch.stack([a * sin_beta, zero, a * cos_beta], -1),
            torch.stack([-b * sin_alpha * val, b * sin_alpha * (1 - val**2).sqrt(), b * cos_alpha], -1),
            torch.stack([zero, zero, c], -1),
        ],
        dim=1,
    )
    return out.to(lattices.dtype)


_ROTATION_TABLES: dict = {}


def _rotation_tables(grid: int, device: torch.device):
    """Voxel gather indices (24, g^3), lattice row permutations (24, 3) and signs (24, 3) of
    :func:`cube_rotations`, built once per grid and device."""
    key = (grid, str(device))
    if key not in _ROTATION_TABLES:
        base = torch.arange(grid**3).reshape(grid, grid, grid)
        voxels, perms, signs = [], [], []
        for perm, sign in cube_rotations():
            flips = [r for r in range(3) if sign[r] < 0]
            moved = base.permute(*perm)
            voxels.append((torch.flip(moved, dims=flips) if flips else moved).reshape(-1))
            perms.append(perm)
            signs.append(sign)
        _ROTATION_TABLES[key] = (
            torch.stack(voxels).to(device),
            torch.tensor(perms, dtype=torch.long, device=device),
            torch.tensor(signs, dtype=torch.float32, device=device),
        )
    return _ROTATION_TABLES[key]


def rotate(channels: torch.Tensor, lattices: torch.Tensor, generator: torch.Generator):
    """One random proper cube rotation per sample of the channels (B, C, g, g, g) and lattices (B, 3, 3).

    As the CPU trainer's augmentation (``_rotate_array`` and ``_rotated_lattice``): grid axis
    ``r`` of the result is axis ``perm[r]`` of the input, reversed where ``signs[r]`` is -1, and
    lattice vector ``r`` is ``signs[r]`` times vector ``perm[r]``, re-expressed in the standard
    orientation (:func:`standard_lattice`). Cubic cells (the prior's) map onto themselves; the
    coordinate channels are rebuilt from the new lattice by the caller. One gather for the batch.
    """
    batch, n_channels, grid = channels.shape[0], channels.shape[1], channels.shape[-1]
    voxels, perms, signs = _rotation_tables(grid, channels.device)
    which = torch.randint(len(perms), (batch,), generator=generator).to(channels.device)
    index = voxels[which][:, None, :].expand(batch, n_channels, -1)
    out = torch.gather(channels.reshape(batch, n_channels, -1), 2, index).reshape(channels.shape)
    rows = torch.arange(batch, device=lattices.device)[:, None]
    lat = lattices[rows, perms[which]] * signs[which][:, :, None].to(lattices.dtype)
    return out, standard_lattice(lat)


@torch.no_grad()
def posterior_means(vae, channels, lattices, deciles, grid: int, representation: str, batch_size: int = 256):
    """Encoder means (N, latent_dim) of every shard structure, unrotated: what the prior is fitted to."""
    device = next(vae.parameters()).device
    means = []
    for start in range(0, len(channels), batch_size):
        x_vox = channels[start : start + batch_size].to(device).float()
        coords = coordinate_channels(lattices[start : start + batch_size].to(device), grid)
        cond = torch.nn.functional.one_hot(deciles[start : start + batch_size], 10).float().to(device)
        x = vae.to_input(x_vox if representation == "sites" else x_vox[:, 0], coords)
        means.append(vae.encode(x, cond)[0].float().cpu())
    return torch.cat(means)


class RandomBatches:
    """Endless batches of ``batch_size`` random shard indices (with replacement), drawn by
    ``generator``; a pass (:func:`len`) is ``per_pass`` batches, the steps between two saves."""

    def __init__(self, n: int, batch_size: int, per_pass: int, generator: torch.Generator, device) -> None:
        self.n, self.batch_size, self.per_pass = n, batch_size, per_pass
        self.generator, self.device = generator, device

    def __len__(self) -> int:
        return self.per_pass

    def __iter__(self):
        while True:
            yield torch.randint(self.n, (self.batch_size,), generator=self.generator).to(self.device)


class ShardVAETask:
    """A task of :func:`~crystaloop.generative.train.fit.fit`: the VAE loss of a batch of shard
    rows, rotated by a random cube rotation each (:func:`rotate`) and with their coordinate
    channels rebuilt from the rotated lattices.

    The shard arrays stay on ``data_device`` (the GPU when training there: a batch is gathered in
    place instead of copied over each step); ``generator`` draws the rotations.
    """

    def __init__(self, vae, weights, data: dict, generator: torch.Generator, device: torch.device) -> None:
        self.vae, self.weights, self.generator, self.device = vae, weights, generator, device
        self.channels, self.lattices = data["channels"], data["lattices"]
        self.deciles, self.species = data["deciles"], data["species"]
        self.grid, self.representation = vae.grid, vae.representation

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.vae}

    def trainable(self):
        return self.vae.parameters()

    def train_step(self, index: torch.Tensor):
        x_vox = self.channels[index].to(self.device, non_blocking=True).float()
        if self.species is not None:  # rotated with the channels, as one more channel
            x_vox = torch.cat([x_vox, self.species[index].to(self.device)[:, None].float()], dim=1)
        lat = self.lattices[index].to(self.device)
        x_vox, lat = rotate(x_vox, lat, self.generator)
        site_classes = None
        if self.species is not None:
            site_classes = self.vae.species_classes(x_vox[:, -1].round().long())
            x_vox = x_vox[:, :-1]
        coords = coordinate_channels(lat, self.grid)
        cond = torch.nn.functional.one_hot(self.deciles[index.cpu()], 10).float().to(self.device)
        x = self.vae.to_input(x_vox if self.representation == "sites" else x_vox[:, 0], coords)
        output = self.vae(x, cond)
        # the loss in full precision, as the network's outputs come from the autocast region
        with torch.autocast(device_type=self.device.type, enabled=False):
            return vae_loss(output, x, self.weights, site_classes=site_classes)

    def evaluate(self, batches) -> dict[str, float]:
        return {}

    def final_model(self) -> torch.nn.Module:
        return self.vae


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, required=True, help="Directory with manifest.json.")
    parser.add_argument("--out", type=Path, required=True, help="Run directory for checkpoints.")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=512, help="512 fits 80 GB at grid 32.")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--widths", type=str, default="16,32,64", help="Encoder widths, comma separated.")
    parser.add_argument("--beta", type=float, default=0.002, help="KLD weight.")
    parser.add_argument(
        "--species-weight", type=float, default=0.1, help="Species head cross-entropy weight (0: no head)."
    )
    parser.add_argument(
        "--prior-components", type=int, default=16, help="Latent prior mixture size (0: z ~ N(0, I))."
    )
    parser.add_argument("--condition-property", default="formation_energy_per_atom")
    parser.add_argument("--save-every", type=int, default=500, help="Steps between last.pt saves.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    device = torch.device(resolve_device(args.device))
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    manifest, channels, lattices, labels, species = load_shards(args.shards)
    grid = int(manifest["grid"])
    representation = manifest.get("representation", "density")
    key = manifest["properties"].index(args.condition_property)
    present = np.isfinite(labels[:, key])
    channels, lattices, labels = channels[present], lattices[present], labels[present, key]
    head = representation == "sites" and species is not None and args.species_weight > 0
    if head:
        species = species[present]
        vocabulary = manifest.get("elements") or sorted(int(z) for z in np.unique(species) if z > 0)
    else:
        species, vocabulary = None, []
    condition = DecileCondition.fit(labels, args.condition_property)
    widths = [int(w) for w in args.widths.split(",")]
    vae = CondDFCVAE(
        grid=grid,
        latent_dim=args.latent_dim,
        widths=widths,
        circular=True,
        condition=condition.to_dict(),
        coord_scale=1.0,
        density_scale=0.25 if representation == "sites" else 1.0,
        representation=representation,
        species=vocabulary,
    ).to(device)
    weights = VAELossWeights(alpha=0.0, beta=args.beta, species_weight=args.species_weight)
    deciles = torch.as_tensor(condition.index(labels), dtype=torch.long)
    # the shards are small next to GPU memory (8,571 site maps at 16^3: 0.35 GB with the species
    # targets): held there, a batch is gathered on the device instead of copied over each step
    data_device = device if device.type == "cuda" else torch.device("cpu")
    data = {
        "channels": torch.from_numpy(channels).to(data_device),
        "lattices": torch.from_numpy(lattices).to(data_device),
        "deciles": deciles,
        "species": torch.from_numpy(species).to(data_device) if species is not None else None,
    }
    # fit reads these OptimConfig attributes; pydantic is not at hand on the GPU machine
    optim = SimpleNamespace(
        epochs=1,
        lr=args.lr,
        weight_decay=0.0,
        patience=sys.maxsize,
        min_delta=0.0,
        max_batches_per_epoch=None,
        seed=args.seed,
        grad_clip=10.0,
        schedule="cosine",
    )
    use_amp = device.type == "cuda"
    started = {"time": time.perf_counter(), "step": None}

    def report(state) -> None:
        if started["step"] is None:  # the first save of this process: the step it resumed at
            started["step"] = state.history[-2]["step"] if len(state.history) > 1 else 0
        parts = state.last_parts
        rate = (state.step - started["step"]) / (time.perf_counter() - started["time"])
        print(
            f"step {state.step}/{args.steps} loss {parts['loss']:.4f} mse {parts['mse']:.4f} kld {parts['kld']:.2f} "
            f"species_ce {parts.get('species_ce', float('nan')):.3f} ({rate:.1f} steps/s)",
            flush=True,
        )

    state = fit(
        ShardVAETask(vae, weights, data, generator, device),
        RandomBatches(len(channels), args.batch_size, args.save_every, generator, data_device),
        None,
        optim,
        args.out,
        device=device,
        resume=args.resume,
        label="vae",
        steps=args.steps,
        optimizer="adamw",
        final_lr_divisor=float("inf"),
        amp_dtype="bfloat16",
        progress=False,
        on_epoch=report,
    )
    vae.eval()
    if args.prior_components:
        vae.fit_latent_prior(
            posterior_means(vae, data["channels"], data["lattices"], deciles, grid, representation),
            args.prior_components,
        )
    config = {
        "kind": "vae",
        # "data" is read back as crystaloop's DataConfig (held-out split of evaluate, lattice-head),
        # which takes no other keys: the shard folder is recorded beside it
        "shards": str(args.shards),
        "data": {
            "grid": grid,
            "max_sites": 40,
            "test_fraction": 0.2,
            "split_seed": 0,
        },
        "optim": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "amp": use_amp,
            "schedule": "cosine",
        },
        "model": {
            "latent_dim": args.latent_dim,
            "widths": widths,
            "representation": representation,
            "species_head": bool(vocabulary),
        },
        "beta": args.beta,
        "species_weight": args.species_weight,
        "latent_prior_components": args.prior_components,
        "condition_property": args.condition_property,
        "trainer": "crystaloop.generative.train.gpu",
    }
    path = save_model(
        vae,
        args.out / "vae.pt",
        config=config,
        dataset_hash=manifest.get("dataset_hash"),
        metrics={k: state.last_parts[k] for k in ("loss", "mse", "kld") if k in state.last_parts},
        command="python -m crystaloop.generative.train.gpu "
        + " ".join(sys.argv[1:] if argv is None else argv),
        elements=manifest.get("elements") or list(vocabulary),
    )
    print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
