"""Training configurations (YAML under ``configs/train/``), validated with pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from crystaloop.errors import ConfigError, read_yaml
from crystaloop.properties import LABEL_NAMES


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_properties(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in LABEL_NAMES]
    if unknown:
        raise ValueError(f"unknown properties {unknown}; allowed: {', '.join(LABEL_NAMES)}")
    return names


def _check_pooled(name: str, size: int, poolings: int, widths: str) -> None:
    """``size`` voxels halve ``poolings`` times without a remainder, else a ValueError naming the fix."""
    step = 2**poolings
    if size % step:
        nearest = sorted({max(step, size // step * step), (size // step + 1) * step})
        raise ValueError(
            f"{name} {size} must be a multiple of {step} ({poolings} poolings, one per {widths}); "
            f"set {name} to {' or '.join(map(str, nearest))}, or use fewer model.widths"
        )


class DataConfig(_Config):
    """Which labelled structures to train on and how to split them."""

    dataset: str | None = Field(None, description="training_structures 'dataset' name; None: all.")
    material_classes: list[Literal["binary", "perovskite", "heusler", "other"]] | None = None
    mix: dict[str, int] = Field(
        default_factory=dict,
        description="Other datasets mixed into 'dataset', each as a random subset (fixed seed) of at most "
        "this many records, e.g. {prior-v1: 1500}: a stated share of another set, not all of it.",
    )
    limit: int | None = Field(None, ge=2, description="Random subset (fixed seed) of the records.")

    @model_validator(mode="after")
    def _mix_needs_a_dataset(self) -> DataConfig:
        if self.mix and not self.dataset:
            raise ValueError("data.mix needs data.dataset (without it every dataset is already loaded)")
        for name, most in self.mix.items():
            if name == self.dataset or most < 1:
                raise ValueError(f"data.mix: {name}: {most} must name another dataset and at least 1 record")
        return self

    max_sites: int = Field(40, ge=1, description="Skip larger cells (the paper used <= 40 atoms).")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Held-out share, by composition.")
    split_seed: int = 0
    val_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of the training formulas kept aside for early stopping and the ensemble's "
        "variance calibration (0: use the held-out split, as older runs did).",
    )
    grid: int = Field(32, ge=8, description="Voxels per cell edge (voxel models).")
    augment: bool = Field(True, description="Random cube rotations of training samples.")
    val_limit: int | None = Field(None, ge=1, description="Validate on at most this many samples.")
    num_workers: int = Field(0, ge=0, description="DataLoader workers that voxelise on the fly.")
    crop: int | None = Field(
        None, ge=4, description="UNet only: train on random periodic crops of this many voxels per edge."
    )


class OptimConfig(_Config):
    """Optimiser and schedule (Adam, as in the paper)."""

    epochs: int = Field(50, ge=1)
    batch_size: int = Field(20, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(10, ge=1, description="Early stopping: epochs without improvement.")
    min_delta: float = Field(0.0, ge=0)
    max_batches_per_epoch: int | None = Field(None, ge=1, description="Cap on steps per epoch.")
    seed: int = 0
    grad_clip: float | None = Field(10.0, gt=0)
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="Learning rate: constant, or cosine decay to lr/100 over all epochs."
    )


class UNetModelConfig(_Config):
    """3-D UNet options."""

    widths: list[int] = Field(default_factory=lambda: [16, 32, 64], min_length=2)
    circular: bool = False
    input_transform: Literal["log1p", "none"] = Field(
        "log1p", description="Density transform before the first convolution."
    )
    spacing: bool = Field(True, description="Feed the voxel edge lengths (Angstrom) as input channels.")


class UNetTrainConfig(_Config):
    """``crystaloop train unet``."""

    kind: Literal["unet"] = "unet"
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=3e-6, batch_size=10))
    model: UNetModelConfig = Field(default_factory=UNetModelConfig)
    class_count_samples: int = Field(200, ge=1, description="Structures voxelised to count classes.")

    @model_validator(mode="after")
    def _poolable(self) -> UNetTrainConfig:
        poolings = len(self.model.widths) - 1
        _check_pooled("data.grid", self.data.grid, poolings, "model.widths entry after the first")
        if self.data.crop is not None and self.data.crop < self.data.grid:  # a larger crop is the grid
            _check_pooled("data.crop", self.data.crop, poolings, "model.widths entry after the first")
        return self


class VAEModelConfig(_Config):
    """Cond-DFC-VAE options."""

    latent_dim: int = Field(256, ge=2)
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128, 256], min_length=1)
    circular: bool = False
    properties: list[str] = Field(default_factory=list, description="FTCP joint regression head.")
    property_hidden: int = Field(128, ge=1)
    density_scale: float = Field(1.0, gt=0)
    representation: Literal["density", "sites"] = Field(
        "density", description="density: eq. 1 (the paper); sites: site-centre heatmap + element descriptors."
    )
    coord_scale: float = Field(
        1.0,
        gt=0,
        description="Angstrom per model unit of the coordinate channels. At 1 they weigh enough in the "
        "loss for the decoder to learn them (the lattice is read from them); at 10 a CPU run decoded "
        "flat coordinates.",
    )
    species_head: bool = Field(
        False,
        description="sites only: per-voxel element logits from the decoder, trained with cross-entropy at "
        "the site voxels; species are then read back by classification, not nearest descriptor.",
    )

    @field_validator("properties")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return _check_properties(value)


class VAETrainConfig(_Config):
    """``crystaloop train vae``."""

    kind: Literal["vae"] = "vae"
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-4, batch_size=20))
    model: VAEModelConfig = Field(default_factory=VAEModelConfig)
    condition_property: str = "formation_energy_per_atom"
    alpha: float = Field(1.0, ge=0, description="Perceptual (DFC) loss weight.")
    beta: float = Field(0.0005, ge=0, description="KLD weight.")
    gamma: float = Field(0.1, ge=0, description="Segmentation loss weight in joint mode.")
    property_weight: float = Field(1.0, ge=0)
    species_weight: float = Field(1.0, ge=0, description="Weight of the species head's cross-entropy.")
    latent_prior_components: int = Field(
        0,
        ge=0,
        description="After training, fit a Gaussian mixture of this many components to the training "
        "posterior means and store it for random sampling (0: random samples draw z ~ N(0, I)).",
    )
    unet: str | None = Field(
        None,
        description="Perceptual UNet: checkpoint path or registry version; None: registry default.",
    )
    joint_unet: bool = Field(False, description="Train the UNet jointly (Hoffmann et al.).")

    @field_validator("condition_property")
    @classmethod
    def _known(cls, value: str) -> str:
        return _check_properties([value])[0]

    @model_validator(mode="after")
    def _poolable(self) -> VAETrainConfig:
        _check_pooled("data.grid", self.data.grid, len(self.model.widths), "model.widths entry")
        return self


class TransferConfig(_Config):
    """Transfer learning from a pretrained CGCNN (SI 2.6)."""

    base: str = Field(description="Checkpoint path or registry version of the pretrained model.")
    head_epochs: int = Field(120, ge=0, description="Stage 2: frozen base, train heads.")
    finetune_epochs: int = Field(10, ge=0, description="Stage 3: all layers, BN frozen.")
    finetune_lr_factor: float = Field(0.01, gt=0)


class GeometryNoise(_Config):
    """Perturbed copies of the training structures that keep their relaxed labels.

    The ensemble screens decoded cells, which are neither relaxed nor symmetric; each copy maps
    such a cell to the relaxed structure's labels (initial structure to relaxed energy, as in
    OC20's IS2RE task). Validation stays unperturbed.
    """

    copies: int = Field(0, ge=0, description="Perturbed copies per training structure; 0: off.")
    volume: tuple[float, float] = Field(
        (0.55, 1.8), description="Range of the volume factor, drawn log-uniformly."
    )
    strain: float = Field(0.05, ge=0, description="Std of the symmetric random strain's components.")
    displacement: float = Field(0.1, ge=0, description="Std of the Cartesian site displacements (Å).")

    @field_validator("volume")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError("give 0 < low <= high")
        return value


class CGCNNModelConfig(_Config):
    """CGCNN options."""

    hidden: int = Field(64, ge=1)
    n_conv: int = Field(1, ge=1)
    fc_hidden: int = Field(128, ge=1)
    radius: float = Field(8.0, gt=0)
    max_neighbors: int = Field(12, ge=1)


class CGCNNTrainConfig(_Config):
    """``crystaloop train cgcnn``."""

    kind: Literal["cgcnn"] = "cgcnn"
    data: DataConfig = Field(default_factory=lambda: DataConfig(max_sites=200))
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-3, batch_size=256))
    model: CGCNNModelConfig = Field(default_factory=CGCNNModelConfig)
    properties: list[str] = Field(default_factory=lambda: ["formation_energy_per_atom"])
    ensemble_size: int = Field(5, ge=1)
    bootstrap: bool = True
    transfer: TransferConfig | None = None
    init: str | None = Field(
        None,
        description=(
            "Continue training this CGCNN ensemble (registry version or checkpoint): each member keeps "
            "its weights, architecture and label normalisation; `model` is then not used."
        ),
    )
    geometry_noise: GeometryNoise = Field(default_factory=GeometryNoise)

    @field_validator("properties")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one property")
        return _check_properties(value)


TrainConfig = Annotated[UNetTrainConfig | VAETrainConfig | CGCNNTrainConfig, Field(discriminator="kind")]
_BY_KIND = {"unet": UNetTrainConfig, "vae": VAETrainConfig, "cgcnn": CGCNNTrainConfig}


def load_train_config(path: str | Path, kind: str) -> UNetTrainConfig | VAETrainConfig | CGCNNTrainConfig:
    """Read and validate a training YAML for ``kind``.

    Raises
    ------
    ConfigError
        If the file is missing, not YAML, of another kind, or invalid (one line per problem).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config {path} not found; pass an existing YAML file")
    data = read_yaml(path, what="training config") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of key: value")
    found = data.setdefault("kind", kind)
    if found != kind:
        raise ConfigError(f"{path} is a '{found}' config; use `crystaloop train {found}`")
    try:
        return _BY_KIND[kind].model_validate(data)
    except ValidationError as exc:
        lines = [
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors()
        ]
        raise ConfigError(f"{path} is not a valid {kind} training config", lines) from None
