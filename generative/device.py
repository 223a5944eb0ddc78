"""The one device picker: which torch device a model runs on.

It needs torch alone, imported when first asked (the GPU trainer's machine has nothing else).
"""

from __future__ import annotations


def resolve_device(requested: str = "auto") -> str:
    """``requested`` as is, or under ``auto`` ``cuda`` when torch sees a GPU and ``cpu`` otherwise.

    >>> resolve_device("cpu")
    'cpu'
    """
    if str(requested) != "auto":
        return str(requested)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
