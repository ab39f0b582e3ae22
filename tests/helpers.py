"""Small helpers shared by the tests (imported as ``from helpers import ...``; pytest puts tests/ on sys.path)."""

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN (floats) or -7 (ints) so elements a kernel never writes show up."""
    return t.fill_(float("nan") if t.is_floating_point() else -7)
