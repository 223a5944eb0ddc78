"""A small, generic training loop: device, AMP, seeds, per-epoch checkpoints, resume, early stop."""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from crystaloop.generative.models.checkpoint import save_model
from crystaloop.generative.train.config import OptimConfig


class Task(Protocol):
    """What the loop needs from a model-specific task."""

    def modules(self) -> dict[str, nn.Module]:
        """Every module whose state is checkpointed."""

    def trainable(self) -> Iterable[nn.Parameter]:
        """Parameters the optimiser updates."""

    def train_step(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch (with grad) and its parts."""

    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        """Held-out metrics; must include ``loss`` (lower is better)."""

    def final_model(self) -> nn.Module:
        """The model saved as ``best.pt``."""


@dataclass
class TrainState:
    """Progress that survives a restart."""

    epoch: int = 0
    best: float = math.inf
    bad_epochs: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    finished: bool = False


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds third-party code using the global RNG
    torch.manual_seed(seed)


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when available (or asked for), else CPU using every core (or ``OMP_NUM_THREADS``)."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(
        int(threads) if threads.isdigit() and int(threads) > 0 else max(1, os.cpu_count() or 1)
    )
    return torch.device("cpu")


def _scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, steps_per_epoch: int):
    """Per-step learning-rate schedule (a constant one is a no-op with a state to checkpoint)."""
    if optim.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, optim.epochs * steps_per_epoch), eta_min=optim.lr / 100
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _stretch_cosine(scheduler, optim: OptimConfig, steps_per_epoch: int) -> None:
    """Give a resumed cosine schedule the length of ``optim.epochs`` (a run resumed with more epochs).

    The rate jumps to the cosine's value at the current step of the longer schedule (a warm
    restart below the peak) and decays to lr/100 at the new last step.
    """
    total = max(1, optim.epochs * steps_per_epoch)
    if optim.schedule != "cosine" or getattr(scheduler, "T_max", total) == total:
        return
    scheduler.T_max = total
    step = min(scheduler.last_epoch, total)
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = (
            scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * step / total)) / 2
        )
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _limited(loader: Iterable, limit: int | None) -> Iterator:
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            return
        yield batch


def fit(
    task: Task,
    train_loader,
    val_loader,
    optim: OptimConfig,
    run_dir: Path,
    *,
    device: torch.device,
    resume: bool = False,
    label: str = "train",
    extra: dict[str, Any] | None = None,
    console=None,
) -> TrainState:
    """Train ``task`` until ``optim.epochs`` or early stopping; checkpoints go to ``run_dir``.

    ``last.pt`` holds everything needed to resume after a kill (the RNGs included, and the
    shuffle generator of ``train_loader`` when it has one, so a resumed run draws the batches
    a straight run would); ``best.pt`` holds the best model by held-out loss (with ``extra``
    metadata and its metrics).
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    run_dir.mkdir(parents=True, exist_ok=True)
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    amp = device.type == "cuda"
    params = [p for p in task.trainable() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    steps = len(train_loader)
    if optim.max_batches_per_epoch:
        steps = min(steps, optim.max_batches_per_epoch)
    scheduler = _scheduler(optimizer, optim, steps)
    state = TrainState()
    seed_everything(optim.seed)
    shuffle = getattr(train_loader, "generator", None)
    if resume and last.is_file():
        saved = torch.load(last, map_location=device, weights_only=False)
        for name, module in task.modules().items():
            module.load_state_dict(saved["modules"][name])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        if "scheduler" in saved:
            scheduler.load_state_dict(saved["scheduler"])
            _stretch_cosine(scheduler, optim, steps)
        state = TrainState(**saved["state"])
        torch.set_rng_state(saved["rng"]["torch"].cpu())  # map_location moved the RNG states too
        np.random.set_state(saved["rng"]["numpy"])  # noqa: NPY002
        random.setstate(saved["rng"]["python"])
        if shuffle is not None and "loader" in saved["rng"]:
            shuffle.set_state(saved["rng"]["loader"].cpu())
        # a resumed run may be given more epochs or more patience than it had
        state.finished = state.epoch >= optim.epochs or state.bad_epochs >= optim.patience
    if state.finished:
        return state

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4g}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(label, total=optim.epochs * steps, loss=float("nan"))
        progress.update(bar, completed=state.epoch * steps)
        last_note = time.time()
        while state.epoch < optim.epochs:
            for module in task.modules().values():
                module.train()
            started, total, count = time.time(), 0.0, 0
            for batch in _limited(train_loader, optim.max_batches_per_epoch):
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                    loss, _ = task.train_step(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{label}: loss became {loss.item()} at epoch {state.epoch}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if optim.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total, count = total + float(loss.detach()), count + 1
                progress.update(bar, advance=1, loss=total / count)
                if not progress.console.is_terminal and time.time() - last_note > 60:
                    last_note = time.time()
                    remaining = progress.tasks[0].time_remaining
                    progress.console.print(
                        f"{label} epoch {state.epoch + 1} step {count}/{steps} loss {total / count:.4g}"
                        f" ETA {remaining / 60 if remaining else float('nan'):.0f} min",
                        highlight=False,
                    )
            for module in task.modules().values():
                module.eval()
            with torch.no_grad():
                metrics = task.evaluate(val_loader)
            state.epoch += 1
            row = {"epoch": state.epoch, "train_loss": total / max(count, 1), **metrics}
            row["seconds"] = time.time() - started
            state.history.append(row)
            improved = metrics["loss"] < state.best - optim.min_delta
            if improved:
                state.best, state.bad_epochs, state.best_metrics = metrics["loss"], 0, dict(metrics)
                save_model(task.final_model(), best, **(extra or {}), metrics=dict(metrics))
            else:
                state.bad_epochs += 1
            progress.console.print(
                f"{label} epoch {state.epoch}: train {row['train_loss']:.4g}  val "
                + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                + ("  *" if improved else ""),
                highlight=False,
            )
            state.finished = state.epoch >= optim.epochs or state.bad_epochs >= optim.patience
            torch.save(
                {
                    "modules": {n: m.state_dict() for n, m in task.modules().items()},
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "state": asdict(state),
                    "rng": {
                        "torch": torch.get_rng_state(),
                        "numpy": np.random.get_state(),  # noqa: NPY002
                        "python": random.getstate(),
                        **({"loader": shuffle.get_state()} if shuffle is not None else {}),
                    },
                },
                last.with_suffix(".tmp"),
            )
            last.with_suffix(".tmp").replace(last)
            if state.finished:
                break
    return state
