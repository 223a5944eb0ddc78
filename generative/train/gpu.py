"""Train the Cond-DFC-VAE from precomputed shards on one GPU: torch and numpy only.

Run as a script from the repository root, with or without crystaloop installed (the GPU machine
has neither pymatgen nor the project's other dependencies)::

    python generative/train/gpu.py --shards SHARDS --out RUN --steps 6000 --batch-size 512

``SHARDS`` is a directory of ``shard-*.npz`` files and ``manifest.json``: the output of
``crystaloop data shards`` (eq. 1 density, the paper's representation) or of
``crystaloop train site-shards`` (site channels). The representation and grid are read from the
manifest. Site shards that carry ``species`` train the species head too (cross-entropy at the
site voxels, ``--species-weight``; ``--species-weight 0`` trains without the head), and after
training a Gaussian mixture is fitted to the posterior means of the shard structures and stored
as the latent prior of random samples (``--prior-components``). Training uses automatic mixed precision (bfloat16 autocast on CUDA), random cube
rotations, a cosine learning-rate schedule, and writes ``RUN/last.pt`` (resumable with
``--resume``: it holds the batch and rotation generator and the torch RNGs too, so a resumed
run draws the batches a straight run would; resuming a finished run writes ``RUN/vae.pt``
again) and ``RUN/vae.pt`` in the checkpoint format of
:mod:`crystaloop.generative.models.checkpoint`; register it on the CPU side with
``crystaloop models register RUN/vae.pt --version NAME``.

The decile condition is fitted on the shard labels of the condition property, like
``crystaloop train vae`` does on its training split; the shards hold only training structures
when they were written from one (``--split train``).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

_REPO = Path(__file__).resolve().parents[2]


def _import_models():
    """``CondDFCVAE``, ``vae_loss``, ``VAELossWeights``, ``DecileCondition`` and ``save_model``.

    With crystaloop installed they are imported normally; otherwise the package directories of
    this checkout are mapped by hand (as pyproject's package-dir does) without running the
    package ``__init__`` files, which import pymatgen.
    """
    if importlib.util.find_spec("crystaloop") is None:
        for name, folder in (
            ("crystaloop", _REPO / "crystaloop"),
            ("crystaloop.generative", _REPO / "generative"),
            ("crystaloop.generative.models", _REPO / "generative" / "models"),
        ):
            module = types.ModuleType(name)
            module.__path__ = [str(folder)]
            sys.modules[name] = module
    from crystaloop.generative.models.condition import DecileCondition
    from crystaloop.generative.models.vae import CondDFCVAE, VAELossWeights, vae_loss

    return CondDFCVAE, vae_loss, VAELossWeights, DecileCondition


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


def coordinate_channels(lattices: torch.Tensor, grid: int) -> torch.Tensor:
    """Cartesian voxel-centre coordinates (B, 3, g, g, g; Angstrom) of (B, 3, 3) lattices."""
    t = (torch.arange(grid, dtype=lattices.dtype, device=lattices.device) + 0.5) / grid
    fi, fj, fk = torch.meshgrid(t, t, t, indexing="ij")
    frac = torch.stack([fi, fj, fk], dim=-1)  # (g, g, g, 3)
    return torch.einsum("xyzi,bij->bjxyz", frac, lattices)


def cube_rotations() -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The 24 proper cube rotations as ``(axis permutation, axis signs)``, identity first.

    The same list, in the same order, as ``crystaloop.generative.representation.cube_rotations``
    (not imported here: that module needs pymatgen).
    """
    rotations = []
    for perm in itertools.permutations(range(3)):
        inversions = sum(perm[i] > perm[j] for i in range(3) for j in range(i + 1, 3))
        for signs in itertools.product((1, -1), repeat=3):
            if (-1) ** inversions * math.prod(signs) == 1:
                rotations.append((perm, signs))
    return rotations


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

    CondDFCVAE, vae_loss, VAELossWeights, DecileCondition = _import_models()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
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
    hparams = dict(
        grid=grid,
        latent_dim=args.latent_dim,
        widths=widths,
        circular=True,
        condition=condition.to_dict(),
        coord_scale=1.0,
        density_scale=0.25 if representation == "sites" else 1.0,
        representation=representation,
        species=vocabulary,
    )
    vae = CondDFCVAE(**hparams).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))
    )
    weights = VAELossWeights(alpha=0.0, beta=args.beta, species_weight=args.species_weight)
    args.out.mkdir(parents=True, exist_ok=True)
    last = args.out / "last.pt"
    step, parts = 0, {}
    if args.resume and last.is_file():
        state = torch.load(last, map_location=device, weights_only=False)
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, parts = state["step"], state.get("parts", {})
        if "rng" in state:  # older last.pt files hold none: their batches restart from the seed
            generator.set_state(state["rng"]["generator"].cpu())  # map_location moved it
            torch.set_rng_state(state["rng"]["torch"].cpu())
            if device.type == "cuda" and state["rng"].get("cuda"):
                torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    deciles = torch.as_tensor(condition.index(labels), dtype=torch.long)
    channels_t = torch.from_numpy(channels)
    lattices_t = torch.from_numpy(lattices)
    species_t = torch.from_numpy(species) if species is not None else None
    use_amp = device.type == "cuda"
    # the shards are small next to GPU memory (8,571 site maps at 16^3: 0.35 GB with the species
    # targets): held there, a batch is gathered on the device instead of copied over each step
    data_device = device if device.type == "cuda" else torch.device("cpu")
    channels_t, lattices_t = channels_t.to(data_device), lattices_t.to(data_device)
    species_t = species_t.to(data_device) if species_t is not None else None
    start, first_step = time.perf_counter(), step
    vae.train()
    while step < args.steps:
        index = torch.randint(len(channels_t), (args.batch_size,), generator=generator).to(data_device)
        x_vox = channels_t[index].to(device, non_blocking=True).float()
        if species_t is not None:  # rotated with the channels, as one more channel
            x_vox = torch.cat([x_vox, species_t[index].to(device)[:, None].float()], dim=1)
        lat = lattices_t[index].to(device)
        x_vox, lat = rotate(x_vox, lat, generator)
        site_classes = None
        if species_t is not None:
            site_classes = vae.species_classes(x_vox[:, -1].round().long())
            x_vox = x_vox[:, :-1]
        coords = coordinate_channels(lat, grid)
        cond = torch.nn.functional.one_hot(deciles[index.cpu()], 10).float().to(device)
        x = vae.to_input(x_vox if representation == "sites" else x_vox[:, 0], coords)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            output = vae(x, cond)
        loss, parts = vae_loss(output, x, weights, site_classes=site_classes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 10.0)
        optimizer.step()
        schedule.step()
        step += 1
        if step % args.save_every == 0 or step == args.steps:
            torch.save(
                {
                    "vae": vae.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "step": step,
                    "parts": parts,
                    "rng": {
                        "generator": generator.get_state(),
                        "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                    },
                },
                last.with_suffix(".tmp"),
            )
            last.with_suffix(".tmp").replace(last)
            rate = (step - first_step) / (time.perf_counter() - start)
            print(
                f"step {step}/{args.steps} loss {parts['loss']:.4f} mse {parts['mse']:.4f} kld {parts['kld']:.2f} species_ce {parts.get('species_ce', float('nan')):.3f} ({rate:.1f} steps/s)",
                flush=True,
            )
    vae.eval()
    if args.prior_components:
        vae.fit_latent_prior(
            posterior_means(vae, channels_t, lattices_t, deciles, grid, representation), args.prior_components
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
        "trainer": "generative/train/gpu.py",
    }
    payload = {
        "kind": "vae",
        "hparams": dict(vae.hparams),
        "state_dict": {k: v.detach().cpu() for k, v in vae.state_dict().items()},
        "extra": {
            "config": config,
            "dataset_hash": manifest.get("dataset_hash"),
            "metrics": {k: parts[k] for k in ("loss", "mse", "kld") if k in parts},
            "command": "python generative/train/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        },
        "torch_version": torch.__version__,
    }
    path = args.out / "vae.pt"
    torch.save(payload, path)
    print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
