"""An expert-parallel call's arguments, checked on every rank against every rank's, so that a bad one never hangs.

Each rank encodes its arguments' shapes, dtypes, devices and flags as int64 fields (:class:`Schema`); the dispatch's
first all-to-all carries them beside the split sizes. After that one exchange every rank holds every rank's fields
and runs the same checks on them, so a bad argument on any rank raises the same exception on every rank (the
lowest failing rank's), before any exchange whose sizes depend on the arguments. TypeError for a dtype, ValueError
for a shape, size, device or value, as everywhere in the package.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from .. import reference
from ..ops._checks import dtype_names

# dtype <-> int code (unknown dtypes encode as len(_DTYPES))
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.int16,
           torch.int8, torch.uint8, torch.bool)
_DEVICES = ("cpu", "cuda")
_IDS = (torch.int32, torch.int64)


@dataclass(frozen=True)
class TensorInfo:
    """What the checks know of one rank's tensor: its dims, shape, dtype, device and whether it wants a gradient."""

    dim: int
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    device: tuple[int, int]  # (type code, index)
    grad: bool

    def __str__(self) -> str:
        return str(list(self.shape)) if len(self.shape) == self.dim else f"a {self.dim}-D tensor"


class Schema:
    """The fields of one call: ``tensors`` (name, dims recorded) and ``scalars`` (names of ints)."""

    DYNAMIC = ("ids_min", "ids_max")  # appended by the dispatch from the device (no host read of the ids)

    def __init__(self, tensors: tuple[tuple[str, int], ...], scalars: tuple[str, ...]):
        self.tensors, self.scalars = tensors, scalars

    def encode(self, tensors: dict[str, torch.Tensor], scalars: dict[str, int]) -> list[int]:
        """This rank's fields. Never raises: a non-tensor encodes as ``dim = -1`` and a non-int scalar as
        :data:`NOT_AN_INT`, which the checks report on every rank (raising here, before the first exchange, would
        leave the other ranks waiting in it)."""
        out = []
        for name, ndim in self.tensors:
            t = tensors[name]
            if not isinstance(t, torch.Tensor):
                out += [-1, *[-1] * ndim, len(_DTYPES), len(_DEVICES), -1, 0]
                continue
            shape = list(t.shape[:ndim]) + [-1] * (ndim - min(t.dim(), ndim))
            code = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else len(_DTYPES)
            dev = _DEVICES.index(t.device.type) if t.device.type in _DEVICES else len(_DEVICES)
            out += [t.dim(), *shape, code, dev, -1 if t.device.index is None else t.device.index,
                    int(t.requires_grad and torch.is_grad_enabled())]
        return out + [_int_field(scalars[s]) for s in self.scalars]  # then the DYNAMIC fields

    def decode(self, values: list[int]) -> dict:
        out, i = {}, 0
        for name, ndim in self.tensors:
            dim, shape = values[i], tuple(values[i + 1 : i + 1 + ndim])
            code, dev, index, grad = values[i + 1 + ndim : i + 5 + ndim]
            out[name] = TensorInfo(dim, shape[: max(0, min(dim, ndim))],
                                   _DTYPES[code] if code < len(_DTYPES) else None, (dev, index), bool(grad))
            i += ndim + 5
        for s in self.scalars + self.DYNAMIC:
            out[s] = values[i]
            i += 1
        return out

    def size(self) -> int:
        return sum(ndim + 5 for _, ndim in self.tensors) + len(self.scalars) + len(self.DYNAMIC)


NOT_AN_INT = -(2**62)  # a scalar field that was not an int (or an activation that is not a name)


def _int_field(v) -> int:
    try:
        return operator.index(v)  # ints and bools; not floats or None
    except TypeError:
        return NOT_AN_INT


def activation_code(activation) -> int:
    """The ``activation`` field: the index of a name in ``reference.ACTIVATIONS``, ``len(ACTIVATIONS)`` for a
    callable (which the ranks cannot compare: only that each passed one), :data:`NOT_AN_INT` for anything else."""
    names = list(reference.ACTIVATIONS)
    if isinstance(activation, str) and activation in names:
        return names.index(activation)
    return len(names) if callable(activation) else NOT_AN_INT


def _activation_name(code: int) -> str:
    names = list(reference.ACTIVATIONS)
    return repr(names[code]) if 0 <= code < len(names) else "a callable" if code == len(names) else "invalid"


def _not_tensors(f: dict, names) -> Exception | None:
    for name in names:
        if f[name].dim < 0:
            return TypeError(f"{name} must be a torch.Tensor")
    return None


def _dt(info: TensorInfo) -> str:
    return str(info.dtype) if info.dtype is not None else "an unsupported dtype"


def _device_type(info: TensorInfo) -> str:
    return _DEVICES[info.device[0]] if info.device[0] < len(_DEVICES) else "another device type"


def _same_device(a: TensorInfo, b: TensorInfo) -> bool:
    return a.device == b.device


# -------------------------------------------------------------------------------------------- dispatch

DISPATCH = Schema((("x", 2), ("ids", 2), ("weights", 2)), ("num_experts",))


def dispatch_problem(f: dict, world: int) -> Exception | None:
    """The first thing wrong with one rank's ``dispatch`` arguments, or None."""
    x, ids, w, E = f["x"], f["ids"], f["weights"], f["num_experts"]
    err = _not_tensors(f, ("x", "ids", "weights"))
    if err is not None:
        return err
    if E == NOT_AN_INT:
        return TypeError("num_experts must be an int")
    if x.dtype is None or not x.dtype.is_floating_point:
        return TypeError(f"x must be a floating-point tensor, got {_dt(x)}")
    if ids.dtype not in _IDS:
        return TypeError(f"ids must be {dtype_names(_IDS)}, got {_dt(ids)}")
    if w.dtype is None or not w.dtype.is_floating_point:
        return TypeError(f"weights must be a floating-point tensor, got {_dt(w)}")
    if x.dim != 2:
        return ValueError(f"x must be [T, H], got {x}")
    T = x.shape[0]
    if ids.dim != 2 or ids.shape[0] != T or ids.shape[1] < 1:
        return ValueError(f"ids must be [T={T}, k] with k >= 1, got {ids}")
    if w.dim != 2 or w.shape != ids.shape:
        return ValueError(f"weights must have ids' shape {list(ids.shape)}, got {w}")
    for name, t in (("ids", ids), ("weights", w)):
        if not _same_device(t, x):
            return ValueError(f"{name} is on another device than x")
    if E < 1 or E % world:
        return ValueError(f"num_experts={E} cannot be shared evenly by the {world} ranks of ep_group "
                          f"(E % world = {E % world if E >= 1 else E})")
    if ids.shape[0] * ids.shape[1] and (f["ids_min"] < 0 or f["ids_max"] >= E):
        return ValueError(f"ids must be expert ids in [0, num_experts={E}), got values in "
                          f"[{f['ids_min']}, {f['ids_max']}]")
    return None


def check_dispatch(fields: list[dict]) -> None:
    _raise_first("dispatch", fields, dispatch_problem)
    _agree("dispatch", fields, (("x's dtype", lambda f: f["x"].dtype),), TypeError)
    _agree("dispatch", fields, (("H (x.shape[1])", lambda f: f["x"].shape[1]),
                                ("num_experts", lambda f: f["num_experts"]),
                                ("x's device type", lambda f: _device_type(f["x"])),
                                ("whether x needs a gradient", lambda f: f["x"].grad),
                                ("whether weights need a gradient", lambda f: f["weights"].grad)))


# ------------------------------------------------------------------------------------------ fused_moe

FUSED_MOE = Schema((("x", 2), ("router_weight", 2), ("w_gate_up", 3), ("w_down", 3)),
                   ("top_k", "renormalize", "activation"))


def fused_moe_problem(f: dict, world: int) -> Exception | None:
    """The first thing wrong with one rank's ``fused_moe(..., ep_group=)`` arguments, or None."""
    x, r, gu, dn, k = f["x"], f["router_weight"], f["w_gate_up"], f["w_down"], f["top_k"]
    err = _not_tensors(f, ("x", "router_weight", "w_gate_up", "w_down"))
    if err is not None:
        return err
    if k == NOT_AN_INT:
        return TypeError("top_k must be an int")
    if f["activation"] == NOT_AN_INT:
        return ValueError(f"activation must be one of {tuple(reference.ACTIVATIONS)} or a callable")
    if x.dtype is None or not x.dtype.is_floating_point:
        return TypeError(f"x must be a floating-point tensor, got {_dt(x)}")
    for name, t in (("router_weight", r), ("w_gate_up", gu), ("w_down", dn)):
        if t.dtype != x.dtype:
            return TypeError(f"{name} must have x's dtype {x.dtype}, got {_dt(t)}")
        if not _same_device(t, x):
            return ValueError(f"{name} is on another device than x")
    if x.dim != 2:
        return ValueError(f"x must be [T, H], got {x}")
    H = x.shape[1]
    if r.dim != 2 or r.shape[1] != H:
        return ValueError(f"router_weight must be the full router [E, H={H}], the same on every rank, got {r}")
    E = r.shape[0]
    if E < 1 or E % world:
        return ValueError(f"the router's E={E} experts cannot be shared evenly by the {world} ranks of ep_group "
                          f"(E % world = {E % world if E >= 1 else E}): expert parallelism needs E % world == 0")
    El = E // world
    if gu.dim != 3 or gu.shape[0] != El or gu.shape[2] != H or gu.shape[1] % 2 or gu.shape[1] == 0:
        hint = ""
        if gu.dim == 3 and gu.shape[0] != El and gu.shape[0] > 0 and E % gu.shape[0] == 0:
            hint = (f"; a shard of {gu.shape[0]} experts is what a group of {E // gu.shape[0]} ranks holds: the "
                    f"weights were sharded for another group")
        return ValueError(f"w_gate_up must be this rank's shard [E/world = {E}/{world} = {El}, 2I, H={H}], "
                          f"got {gu}{hint}")
    I = gu.shape[1] // 2
    if dn.dim != 3 or dn.shape != (El, H, I):
        return ValueError(f"w_down must be this rank's shard [E/world = {El}, H={H}, I={I}], got {dn}")
    if not 1 <= k <= E:
        return ValueError(f"top_k must be in [1, E={E}], got {k}")
    return None


def check_fused_moe(fields: list[dict]) -> None:
    _raise_first("fused_moe", fields, fused_moe_problem)
    _agree("fused_moe", fields, (("x's dtype", lambda f: f["x"].dtype),), TypeError)
    _agree("fused_moe", fields, (
        ("H (x.shape[1])", lambda f: f["x"].shape[1]),
        ("E (router_weight.shape[0])", lambda f: f["router_weight"].shape[0]),
        ("2I (w_gate_up.shape[1])", lambda f: f["w_gate_up"].shape[1]),
        ("top_k", lambda f: f["top_k"]),
        ("renormalize", lambda f: bool(f["renormalize"])),
        ("activation", lambda f: _activation_name(f["activation"])),
        ("x's device type", lambda f: _device_type(f["x"])),
        ("whether x needs a gradient", lambda f: f["x"].grad),
        ("whether router_weight needs a gradient", lambda f: f["router_weight"].grad),
        ("whether w_gate_up needs a gradient", lambda f: f["w_gate_up"].grad),
        ("whether w_down needs a gradient", lambda f: f["w_down"].grad)))


# --------------------------------------------------------------------------------------------- shared


def _raise_first(op: str, fields: list[dict], problem) -> None:
    world = len(fields)
    for rank, f in enumerate(fields):
        err = problem(f, world)
        if err is not None:
            raise type(err)(f"{op} (ep_group of {world} ranks): rank {rank}: {err}")


def _agree(op: str, fields: list[dict], rules, exc=ValueError) -> None:
    for label, get in rules:
        values = [get(f) for f in fields]
        if any(v != values[0] for v in values):
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise exc(f"{op} (ep_group of {len(fields)} ranks): the ranks disagree on {label} ({per_rank}); every "
                      f"rank must pass the same shapes, dtypes and flags (only T, the token count, may differ)")


_CODES = (TypeError, ValueError, RuntimeError)  # what the other ranks raise; RuntimeError for any other kind


def raise_together(check, group, what: str, agree: dict[str, int] | None = None) -> None:
    """Run ``check()`` on every rank of ``group`` and raise on every rank if it failed on any, or if the ranks
    disagree on the ``agree`` values: the failing rank raises its own exception, the others the same type naming
    it. One small all-gather (and host read) per call."""
    from .comm import gather_ints, rank_world

    rank, world = rank_world(group)
    err = None
    try:
        check()
    except Exception as e:  # noqa: BLE001: whatever it is, the other ranks must not wait in the next collective
        err = e
    code = 0 if err is None else next((i for i, c in enumerate(_CODES, 1) if isinstance(err, c)), len(_CODES))
    names = list(agree or {})
    rows = gather_ints([code] + [_int_field(agree[n]) for n in names], group)
    for r, row in enumerate(rows):
        if row[0]:
            if r == rank:
                raise err
            raise _CODES[row[0] - 1](f"{what}: rank {r} of the {world} ranks of ep_group rejected its arguments "
                                     f"(that rank's error says why); every rank stops here")
    for i, name in enumerate(names, 1):
        values = [row[i] for row in rows]
        if any(v != values[0] for v in values):
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"{what}: the ranks of ep_group disagree on {name} ({per_rank}); under expert "
                             f"parallelism every rank must make the same calls")
