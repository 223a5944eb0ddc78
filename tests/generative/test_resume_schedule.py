"""A run resumed with more epochs continues its cosine schedule over the new length."""

from __future__ import annotations

import math

import torch

from crystaloop.generative.train.config import OptimConfig
from crystaloop.generative.train.fit import _scheduler, _stretch_cosine


def _run(optimizer, scheduler, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates + [optimizer.param_groups[0]["lr"]]


def test_a_cosine_resumed_with_twice_the_epochs_follows_the_longer_cosine():
    weight = torch.nn.Parameter(torch.zeros(1))
    first = torch.optim.Adam([weight], lr=1.0)
    short = _scheduler(first, OptimConfig(epochs=1, lr=1.0, schedule="cosine"), 10)
    assert _run(first, short, 10)[-1] == 1.0 / 100

    longer = OptimConfig(epochs=2, lr=1.0, schedule="cosine")
    second = torch.optim.Adam([weight], lr=1.0)
    resumed = _scheduler(second, longer, 20)  # 2 epochs of 10 steps
    second.load_state_dict(first.state_dict())
    resumed.load_state_dict(short.state_dict())
    _stretch_cosine(resumed, longer, 20)
    expected = [0.01 + 0.99 * (1 + math.cos(math.pi * t / 20)) / 2 for t in range(10, 21)]
    assert all(
        math.isclose(a, b, rel_tol=1e-6) for a, b in zip(_run(second, resumed, 10), expected, strict=True)
    )


def test_a_resumed_schedule_of_the_same_length_is_left_alone():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([weight], lr=1.0)
    optim = OptimConfig(epochs=1, lr=1.0, schedule="cosine")
    scheduler = _scheduler(optimizer, optim, 10)
    _run(optimizer, scheduler, 4)
    before = optimizer.param_groups[0]["lr"]
    _stretch_cosine(scheduler, optim, 10)
    assert optimizer.param_groups[0]["lr"] == before and scheduler.T_max == 10
