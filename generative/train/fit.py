"""The one training loop, :func:`fit`: device, AMP, seeds, checkpoints, resume, early stopping.

Every model trains through it, each as a :class:`Task`: the UNet, VAE and CGCNN trainers
(:mod:`crystaloop.generative.train.run`), the CGCNN fine-tune on weighted samples
(:mod:`~crystaloop.generative.train.finetune`), the lattice head
(:mod:`~crystaloop.generative.train.lattice_head`) and the GPU trainer over shards
(:mod:`~crystaloop.generative.train.gpu`). It runs by epochs, or by optimiser steps (``steps``)
over a loader it draws from again and again. It needs torch and numpy alone (the GPU trainer's
machine has nothing else); the progress bar and ``best.pt`` bring in the rest when used.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from crystaloop.generative.device import resolve_device

if TYPE_CHECKING:
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


class SampleCounting(Protocol):
    """A task whose epoch loss is the mean over samples, not over batches."""

    def batch_size(self, batch: Any) -> int:
        """Samples in ``batch``."""


@dataclass
class TrainState:
    """Progress that survives a restart.

    ``epoch`` counts the checkpoints (an epoch, or ``max_batches_per_epoch`` steps in step mode),
    ``step`` the optimiser steps, ``last_parts`` the loss parts of the last step.
    """

    epoch: int = 0
    best: float = math.inf
    bad_epochs: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    finished: bool = False
    step: int = 0
    best_epoch: int = 0
    last_parts: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds third-party code using the global RNG
    torch.manual_seed(seed)


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when available (or asked for), else CPU using every core (or ``OMP_NUM_THREADS``)."""
    if resolve_device(requested) == "cuda":
        return torch.device("cuda")
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(
        int(threads) if threads.isdigit() and int(threads) > 0 else max(1, os.cpu_count() or 1)
    )
    return torch.device("cpu")


def _scheduler(optimizer: torch.optim.Optimizer, optim, total: int, final_lr_divisor: float = 100.0):
    """Learning-rate schedule over ``total`` scheduler steps (a constant one is a no-op with a
    state to checkpoint); cosine decays to the rate over ``final_lr_divisor`` (inf: to 0)."""
    if optim.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, total), eta_min=optim.lr / final_lr_divisor
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _stretch_cosine(scheduler, optim, total: int) -> None:
    """Give a resumed cosine schedule the length ``total`` (a run resumed with more epochs).

    The rate jumps to the cosine's value at the current step of the longer schedule (a warm
    restart below the peak) and decays to the floor at the new last step.
    """
    total = max(1, total)
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


class _Display:
    """The progress bar with ETA (``show``), or nothing at all."""

    def __init__(self, show: bool, label: str, total: int, done: int, console) -> None:
        self.progress, self.bar = None, None
        if show:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = (
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4g}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.progress = Progress(*columns, console=console, transient=False)
            self.bar = self.progress.add_task(label, total=total, loss=float("nan"))
            self.progress.update(self.bar, completed=done)

    def __enter__(self) -> _Display:
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def advance(self, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.bar, advance=1, loss=loss)

    def print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, highlight=False)

    @property
    def quiet_terminal(self) -> bool:
        """A bar whose output is not a terminal: it notes the progress in lines instead."""
        return self.progress is not None and not self.progress.console.is_terminal

    def remaining(self) -> float | None:
        return self.progress.tasks[0].time_remaining if self.progress is not None else None


def fit(
    task: Task,
    train_loader,
    val_loader,
    optim: OptimConfig,
    run_dir: Path | None = None,
    *,
    device: torch.device,
    resume: bool = False,
    label: str = "train",
    extra: dict[str, Any] | None = None,
    console=None,
    steps: int | None = None,
    optimizer: Literal["adam", "adamw"] = "adam",
    schedule_unit: Literal["step", "epoch"] = "step",
    final_lr_divisor: float = 100.0,
    amp_dtype: Literal["float16", "bfloat16"] = "float16",
    progress: bool = True,
    on_epoch: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Train ``task`` until ``optim.epochs`` (or ``steps``) or early stopping.

    Parameters
    ----------
    task
        The model-specific :class:`Task`. Sample weights live in its batches and its loss (as in
        the CGCNN fine-tune); a task with a ``batch_size(batch)`` method reports its epoch loss
        per sample.
    train_loader, val_loader
        Batches: a DataLoader or any sized iterable; a ``generator`` attribute (a
        ``torch.Generator``) is checkpointed, so a resumed run draws the batches a straight run
        would. ``val_loader`` ``None``: no validation, no early stopping and no ``best.pt``.
    optim
        An :class:`~crystaloop.generative.train.config.OptimConfig`, or any object with its
        attributes (the GPU trainer has no pydantic).
    run_dir
        Where ``last.pt`` (everything needed to resume after a kill: the RNGs included) and
        ``best.pt`` (the best model by validation loss, with ``extra`` and its metrics) go.
        ``None``: nothing is written, and with validation the best weights are restored in
        memory at the end.
    steps
        Step mode: train exactly this many optimiser steps, drawing ``optim.max_batches_per_epoch``
        batches (else one pass of the loader) between checkpoints, and validations.
    optimizer
        ``adam`` or ``adamw`` (decoupled weight decay).
    schedule_unit, final_lr_divisor
        The cosine schedule (``optim.schedule``) steps per batch or per epoch, down to the
        learning rate over ``final_lr_divisor`` (inf: to 0).
    amp_dtype
        Autocast type on CUDA; ``float16`` scales the gradients, ``bfloat16`` needs no scaling.
    progress
        Show the progress bar and the per-epoch lines (on ``console``).
    on_epoch
        Called with the state after each epoch (step mode: each checkpoint).

    Returns
    -------
    TrainState
        The state at the end (``finished`` is true unless an exception stopped the run).
    """
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        last, best = run_dir / "last.pt", run_dir / "best.pt"
    amp = device.type == "cuda"
    dtype = torch.bfloat16 if amp_dtype == "bfloat16" else torch.float16
    params = [p for p in task.trainable() if p.requires_grad]
    optimizer_class = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    opt = optimizer_class(params, lr=optim.lr, weight_decay=optim.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dtype is torch.float16)
    per_epoch = len(train_loader)
    if optim.max_batches_per_epoch:
        per_epoch = min(per_epoch, optim.max_batches_per_epoch)
    epochs = optim.epochs if steps is None else math.ceil(steps / max(per_epoch, 1))
    total_steps = steps if steps is not None else epochs * per_epoch
    scheduler = _scheduler(opt, optim, total_steps if schedule_unit == "step" else epochs, final_lr_divisor)
    state = TrainState()
    seed_everything(optim.seed)
    shuffle = getattr(train_loader, "generator", None)
    counts_samples = hasattr(task, "batch_size")

    def done(state: TrainState) -> bool:
        reached = state.epoch >= epochs if steps is None else state.step >= steps
        return reached or state.bad_epochs >= optim.patience

    if resume and run_dir is not None and last.is_file():
        saved = torch.load(last, map_location=device, weights_only=False)
        for name, module in task.modules().items():
            module.load_state_dict(saved["modules"][name])
        opt.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        if "scheduler" in saved:
            scheduler.load_state_dict(saved["scheduler"])
            _stretch_cosine(scheduler, optim, total_steps if schedule_unit == "step" else epochs)
        state = TrainState(**saved["state"])
        torch.set_rng_state(saved["rng"]["torch"].cpu())  # map_location moved the RNG states too
        np.random.set_state(saved["rng"]["numpy"])  # noqa: NPY002
        random.setstate(saved["rng"]["python"])
        if shuffle is not None and "loader" in saved["rng"]:
            shuffle.set_state(saved["rng"]["loader"].cpu())
        if device.type == "cuda" and saved["rng"].get("cuda"):
            torch.cuda.set_rng_state_all([s.cpu() for s in saved["rng"]["cuda"]])
        # a resumed run may be given more epochs or more patience than it had
        state.finished = done(state)
    if state.finished:
        return state

    best_state = None
    display = _Display(
        progress, label, total_steps, state.step if steps else state.epoch * per_epoch, console
    )
    with display:
        last_note = time.time()
        while not state.finished:
            for module in task.modules().values():
                module.train()
            started, total, count, batches = time.time(), 0.0, 0, 0
            if steps is None:
                batches_of_epoch = _limited(train_loader, optim.max_batches_per_epoch)
            else:  # exactly the steps left: an endless loader is not drawn from beyond them
                batches_of_epoch = itertools.islice(train_loader, min(per_epoch, steps - state.step))
            for batch in batches_of_epoch:
                autocast = torch.autocast(device_type=device.type, dtype=dtype) if amp else nullcontext()
                with autocast:
                    loss, parts = task.train_step(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{label}: loss became {loss.item()} at epoch {state.epoch}")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if optim.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
                scaler.step(opt)
                scaler.update()
                if schedule_unit == "step":
                    scheduler.step()
                n = task.batch_size(batch) if counts_samples else 1
                total, count, batches = total + float(loss.detach()) * n, count + n, batches + 1
                state.step += 1
                state.last_parts = {k: float(v) for k, v in parts.items()}
                display.advance(total / count)
                if display.quiet_terminal and time.time() - last_note > 60:
                    last_note = time.time()
                    remaining = display.remaining()
                    display.print(
                        f"{label} epoch {state.epoch + 1} step {batches}/{per_epoch} loss {total / count:.4g}"
                        f" ETA {remaining / 60 if remaining else float('nan'):.0f} min"
                    )
            if schedule_unit == "epoch":
                scheduler.step()
            for module in task.modules().values():
                module.eval()
            metrics = {}
            if val_loader is not None:
                with torch.no_grad():
                    metrics = task.evaluate(val_loader)
            state.epoch += 1
            row = {"epoch": state.epoch, "step": state.step, "train_loss": total / max(count, 1), **metrics}
            row["seconds"] = time.time() - started
            state.history.append(row)
            improved = bool(metrics) and metrics["loss"] < state.best - optim.min_delta
            if improved:
                state.best, state.bad_epochs, state.best_metrics = metrics["loss"], 0, dict(metrics)
                state.best_epoch = state.epoch
                if run_dir is not None:
                    from crystaloop.generative.models.checkpoint import save_model

                    save_model(task.final_model(), best, **(extra or {}), metrics=dict(metrics))
                else:
                    best_state = {n: copy.deepcopy(m.state_dict()) for n, m in task.modules().items()}
            elif metrics:
                state.bad_epochs += 1
            display.print(
                f"{label} epoch {state.epoch}: train {row['train_loss']:.4g}  val "
                + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                + ("  *" if improved else "")
            )
            state.finished = done(state)
            if run_dir is not None:
                _save_last(last, task, opt, scaler, scheduler, state, shuffle, device)
            if on_epoch is not None:
                on_epoch(state)
    if best_state is not None:
        for name, module in task.modules().items():
            module.load_state_dict(best_state[name])
    return state


def _save_last(path: Path, task: Task, opt, scaler, scheduler, state: TrainState, shuffle, device) -> None:
    """Write ``last.pt`` atomically: modules, optimiser, scaler, schedule, state and every RNG."""
    torch.save(
        {
            "modules": {n: m.state_dict() for n, m in task.modules().items()},
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": asdict(state),
            "step": state.step,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),  # noqa: NPY002
                "python": random.getstate(),
                **({"loader": shuffle.get_state()} if shuffle is not None else {}),
                **({"cuda": torch.cuda.get_rng_state_all()} if device.type == "cuda" else {}),
            },
        },
        path.with_suffix(".tmp"),
    )
    path.with_suffix(".tmp").replace(path)
