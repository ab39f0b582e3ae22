"""Small helpers shared by the tests (imported as ``from helpers import ...``; pytest puts tests/ on sys.path)."""

import torch

from qwen3moe_kernels import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN (floats) or -7 (ints) so elements a kernel never writes show up."""
    return t.fill_(float("nan") if t.is_floating_point() else -7)


def experts_inputs(T, H, I, E, k, dtype, seed=0):
    """Random experts inputs ``(x [T, H], ids [T, k], weights [T, k], w_gate_up [E, 2I, H], w_down [E, H, I])``:
    weights scaled by 1/sqrt(fan-in), routing from random logits (``reference.router_topk``, renormalised)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    wgu = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    wd = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    w, ids = reference.router_topk(torch.randn(T, E, generator=g), k, True)
    return x, ids, w, wgu, wd
