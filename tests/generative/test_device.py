"""The one device picker."""

from __future__ import annotations

import torch

from crystaloop.generative.device import resolve_device


def test_auto_takes_the_gpu_only_when_torch_sees_one(monkeypatch):
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"


def test_settings_and_the_training_loop_pick_through_it(monkeypatch):
    from crystaloop.generative.train.fit import pick_device
    from crystaloop.settings import CrystaloopSettings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert CrystaloopSettings(device="auto").resolve_device() == "cpu"
    threads = torch.get_num_threads()
    try:
        assert pick_device("auto") == torch.device("cpu")  # it also sets the CPU threads
    finally:
        torch.set_num_threads(threads)
