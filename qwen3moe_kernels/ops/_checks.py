"""Argument checks shared by the op wrappers, their fakes and their Triton registrations.

One exception type per kind of mistake, here and in the C++ kernels (``TORCH_CHECK_TYPE`` / ``TORCH_CHECK_VALUE``):

* ``TypeError``: a tensor of a dtype the op does not take (the message names the argument and the dtypes it takes);
* ``ValueError``: a wrong shape, stride, device or value (an expert id out of range, ``eps <= 0``, ``top_k > E``).

Plain ``raise`` statements rather than ``torch._check*``: the wrappers are traced by ``torch.compile`` (dynamo), which
cannot trace a ``torch._check`` message closure over tensors, and a failed shape check is the same error there.
Valid inputs that no kernel takes (another dtype or device that the reference computes) are not errors: the op
runs the reference and says so (``qwen3moe_kernels.recorder.fallback``).
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int32: "int32",
          torch.int64: "int64"}


def dtype_names(dtypes) -> str:
    return "/".join(_NAMES.get(d, str(d)) for d in dtypes)


def check_dtype(op: str, name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be {dtype_names(dtypes)}, got {t.dtype}")


def check_like(op: str, name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    """``t`` has ``like``'s dtype (TypeError) and device (ValueError)."""
    if t.dtype != like.dtype:
        raise TypeError(f"{op}: {name} must have {like_name}'s dtype {like.dtype}, got {t.dtype}")
    check_device(op, name, t, like.device, like_name)


def check_device(op: str, name: str, t: torch.Tensor, device: torch.device, like_name: str = "x") -> None:
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {like_name}'s device {device}")


def check(op: str, cond, message) -> None:
    """A shape or value rule (``message``: a string, or a callable giving one): ValueError naming ``op``."""
    if not cond:
        raise ValueError(f"{op}: {message() if callable(message) else message}")
