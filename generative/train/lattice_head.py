"""Post-hoc lattice head: regress the lattice from a trained VAE's latent space.

The VAE stays frozen. Its encoder's posterior (mu, log-variance) of every training and validation
crystal is computed once and cached in the run folder (``posterior.npz``, with the SHA-256 of the
VAE checkpoint it came from, so a rerun on the same VAE resumes there); the head then learns
(z, condition) -> lattice on z drawn from each posterior, so it also serves sampled z. The
validation split picks the epoch and reports the lattice MAE of the head beside the
least-squares fit of the decoded coordinate channels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crystaloop.generative.models.vae import CondDFCVAE, LatticeHead


@dataclass
class Posterior:
    """Encoder outputs and true lattices of a split.

    Attributes
    ----------
    mu, logvar : numpy.ndarray
        (n, latent_dim) posterior means and log-variances.
    condition : numpy.ndarray
        (n, 10) decile one-hots.
    lattice : numpy.ndarray
        (n, 6) true a, b, c (Angstrom) and alpha, beta, gamma (degrees).
    fitted : numpy.ndarray
        (n, 6) the same parameters fitted to the coordinate channels decoded at z = mu.
    """

    mu: np.ndarray
    logvar: np.ndarray
    condition: np.ndarray
    lattice: np.ndarray
    fitted: np.ndarray

    def save(self, path: Path, prefix: str) -> dict[str, np.ndarray]:
        """Arrays keyed ``<prefix>_<field>`` (for one ``np.savez`` of several splits)."""
        return {f"{prefix}_{k}": v for k, v in self.__dict__.items()}

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> Posterior:
        """The split ``prefix`` of a loaded ``.npz``."""
        return cls(*(np.asarray(arrays[f"{prefix}_{k}"]) for k in cls.__dataclass_fields__))


@torch.no_grad()
def posterior_of(
    vae: CondDFCVAE,
    records: Sequence,
    *,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> Posterior:
    """Encode ``records`` (unrotated) with ``vae`` and fit the lattice of their decodings at mu."""
    from crystaloop.generative.representation import lattice_from_coordinates
    from crystaloop.generative.train.data import VoxelDataset

    vae.eval()
    key = vae.condition.property_name
    dataset = VoxelDataset(records, [key], grid=vae.grid, representation=vae.representation)
    mus, logvars, conditions, fitted = [], [], [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        channels = torch.stack([item["density"] for item in items])
        coords = torch.stack([item["coords"] for item in items])
        condition = vae.condition.one_hot([float(item["labels"][0]) for item in items])
        mu, logvar = vae.encode(vae.to_input(channels, coords), condition)
        _, decoded_coords = vae.split_output(vae.decode(mu, condition)[:, : vae.in_channels])
        for row in decoded_coords.float().numpy():
            try:
                lattice = lattice_from_coordinates(row)
                fitted.append([*lattice.abc, *lattice.angles])
            except (ValueError, np.linalg.LinAlgError):
                fitted.append([np.nan] * 6)
        mus.append(mu.numpy())
        logvars.append(logvar.numpy())
        conditions.append(condition.numpy())
        if progress is not None:
            progress(min(start + batch_size, len(dataset)), len(dataset))
    truth = np.array([[*r.structure.lattice.abc, *r.structure.lattice.angles] for r in records])
    return Posterior(
        np.concatenate(mus),
        np.concatenate(logvars),
        np.concatenate(conditions),
        truth.astype(np.float64),
        np.asarray(fitted, dtype=np.float64),
    )


def lattice_errors(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """MAE of a, b, c (Angstrom; the reconstruction metric) and of the angles (degrees)."""
    ok = np.all(np.isfinite(predicted), axis=1)
    return {
        "lattice_mae_angstrom": float(np.abs(predicted[ok, :3] - truth[ok, :3]).mean()),
        "lattice_bias_angstrom": float((predicted[ok, :3] - truth[ok, :3]).mean()),
        "angle_mae_degrees": float(np.abs(predicted[ok, 3:] - truth[ok, 3:]).mean()),
    }


@torch.no_grad()
def head_parameters(head: LatticeHead, posterior: Posterior) -> np.ndarray:
    """(n, 6) lattice parameters the head gives at z = mu."""
    head.eval()
    z = torch.from_numpy(posterior.mu).float()
    condition = torch.from_numpy(posterior.condition).float()
    return head.parameters_of(z, condition).double().numpy()


class PosteriorBatches:
    """Row indices of the training posteriors, reshuffled by ``generator`` at each pass."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator)
        for start in range(0, self.n, self.batch_size):
            yield order[start : start + self.batch_size]


class LatticeHeadTask:
    """A task of :func:`~crystaloop.generative.train.fit.fit`: MSE of the head's standardised
    lattice targets at z drawn from each training posterior; validated by the lattice MAE at mu.

    Each step draws z = mu + ``noise`` * sigma * eps with ``generator`` (the batches' own).
    """

    def __init__(self, head: LatticeHead, train: Posterior, val: Posterior, noise: float, generator) -> None:
        self.head, self.val, self.noise, self.generator = head, val, noise, generator
        targets = LatticeHead.targets(torch.from_numpy(train.lattice))
        head.target_mean.copy_(targets.mean(dim=0))
        head.target_std.copy_(targets.std(dim=0).clamp_min(1e-6))
        self.standardised = (targets - head.target_mean) / head.target_std
        self.mu = torch.from_numpy(train.mu).float()
        self.sigma = torch.exp(0.5 * torch.from_numpy(train.logvar).float())
        self.condition = torch.from_numpy(train.condition).float()

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"lattice_head": self.head}

    def trainable(self):
        return self.head.parameters()

    def train_step(self, rows: torch.Tensor):
        eps = torch.randn(len(rows), self.mu.shape[1], generator=self.generator)
        z = self.mu[rows] + self.noise * self.sigma[rows] * eps
        loss = torch.nn.functional.mse_loss(self.head(z, self.condition[rows]), self.standardised[rows])
        return loss, {}

    def evaluate(self, batches) -> dict[str, float]:
        metrics = lattice_errors(head_parameters(self.head, self.val), self.val.lattice)
        return {"loss": metrics["lattice_mae_angstrom"], **metrics}

    def final_model(self) -> torch.nn.Module:
        return self.head


def train_lattice_head(
    train: Posterior,
    val: Posterior,
    *,
    hidden: int = 128,
    epochs: int = 300,
    batch_size: int = 256,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    noise: float = 1.0,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[LatticeHead, dict[str, float]]:
    """Train a :class:`LatticeHead` with MSE on standardised targets; the best validation epoch wins.

    Runs through :func:`~crystaloop.generative.train.fit.fit` (AdamW, a per-epoch cosine down to
    lr/50, no checkpoint files). Each step draws z = mu + ``noise`` * sigma * eps from the
    training posteriors. Returns the head and its validation metrics (:func:`lattice_errors` at
    z = mu, plus ``epoch``).
    """
    from crystaloop.generative.train.config import OptimConfig
    from crystaloop.generative.train.fit import fit

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = LatticeHead(train.mu.shape[1], hidden)
    task = LatticeHeadTask(head, train, val, noise, generator)
    optim = OptimConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        patience=epochs,  # no early stop: every epoch is validated, the best one is kept
        seed=seed,
        grad_clip=None,
        schedule="cosine",
    )
    state = fit(
        task,
        PosteriorBatches(len(task.mu), batch_size, generator),
        [],
        optim,
        device=torch.device("cpu"),
        optimizer="adamw",
        schedule_unit="epoch",
        final_lr_divisor=50,
        progress=False,
        on_epoch=(lambda s: progress(s.epoch, epochs)) if progress is not None else None,
    )
    head.eval()
    best = {k: v for k, v in state.best_metrics.items() if k != "loss"}
    return head, {**best, "epoch": state.best_epoch}


def checkpoint_sha256(path: Path) -> str:
    """Hex SHA-256 of the checkpoint file at ``path`` (what identifies the VAE a cache came from)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lattice_head_run(
    database,
    vae: str | None,
    run_dir: Path,
    *,
    hidden: int = 128,
    epochs: int = 300,
    noise: float = 1.0,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> tuple[Path, dict, dict[str, float]]:
    """Train a lattice head on the VAE ``vae`` (version, path or None: the default) into ``run_dir``.

    The VAE's own data config gives the training and validation splits (the held-out formulas
    stay out). The posteriors are cached in ``run_dir/posterior.npz`` with the SHA-256 of the VAE
    checkpoint; a rerun on the same checkpoint reads them back, a rerun on another one encodes
    again (and says so through ``note``). Returns the checkpoint (the VAE with the head), its
    extra metadata and the validation metrics.
    """
    from crystaloop.errors import UserError
    from crystaloop.generative.models.checkpoint import load_model, save_model
    from crystaloop.generative.train.config import DataConfig
    from crystaloop.generative.train.data import composition_split, load_records
    from crystaloop.generative.train.run import resolve_checkpoint

    source = resolve_checkpoint(vae, "vae", database)
    model, extra = load_model(source)
    if not isinstance(model, CondDFCVAE):
        raise UserError(f"{source} is not a VAE checkpoint; pass --vae with a VAE version")
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = run_dir / "posterior.npz"
    source_sha256 = checkpoint_sha256(source)
    cached_sha256 = None
    if cache.is_file():
        arrays = np.load(cache)
        cached_sha256 = str(arrays["source_sha256"]) if "source_sha256" in arrays else None
        if cached_sha256 != source_sha256 and note is not None:
            note(f"{cache} holds the posteriors of another VAE checkpoint than {source}; encoding again")
    if cached_sha256 == source_sha256:
        train, val = Posterior.from_arrays(arrays, "train"), Posterior.from_arrays(arrays, "val")
    else:
        data = DataConfig.model_validate(extra["config"]["data"])
        key = model.condition.property_name
        records = [r for r in load_records(database, data) if r.labels.get(key) is not None]
        train_records, _ = composition_split(records, data.test_fraction, data.split_seed)
        train_records, val_records = composition_split(train_records, data.val_fraction, data.split_seed + 1)
        splits = {}
        for name, subset in (("val", val_records), ("train", train_records)):
            report = (
                (lambda done, total, name=name: progress(f"encode {name}", done, total)) if progress else None
            )
            splits[name] = posterior_of(model, subset, progress=report)
        train, val = splits["train"], splits["val"]
        tmp = run_dir / "posterior.tmp.npz"
        np.savez(
            tmp, **train.save(cache, "train"), **val.save(cache, "val"), source_sha256=np.array(source_sha256)
        )
        tmp.replace(cache)
    report = (lambda done, total: progress("train head", done, total)) if progress else None
    head, head_metrics = train_lattice_head(
        train, val, hidden=hidden, epochs=epochs, noise=noise, seed=seed, progress=report
    )
    fit_metrics = lattice_errors(val.fitted, val.lattice)
    metrics = {
        "lattice_head_val_lattice_mae_angstrom": head_metrics["lattice_mae_angstrom"],
        "lattice_head_val_lattice_bias_angstrom": head_metrics["lattice_bias_angstrom"],
        "lattice_head_val_angle_mae_degrees": head_metrics["angle_mae_degrees"],
        "lattice_head_epoch": float(head_metrics["epoch"]),
        "fit_val_lattice_mae_angstrom": fit_metrics["lattice_mae_angstrom"],
        "fit_val_lattice_bias_angstrom": fit_metrics["lattice_bias_angstrom"],
        "fit_val_angle_mae_degrees": fit_metrics["angle_mae_degrees"],
    }
    model.attach_lattice_head(head)
    extra = {
        **extra,
        "lattice_head": {
            "source": str(source),
            "source_sha256": source_sha256,
            "hidden": hidden,
            "epochs": epochs,
            "noise": noise,
            "seed": seed,
            "n_train": len(train.mu),
            "n_val": len(val.mu),
            "validation": metrics,
        },
    }
    path = save_model(model, run_dir / "best.pt", **extra)
    return path, extra, metrics
