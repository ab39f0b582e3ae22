"""The grouped-GEMM SwiGLU ops (``qwen3moe::grouped_swiglu_*``): CPU implementations against the reference,
``torch.library.opcheck``, argument errors; the Triton kernels under the interpreter (a subprocess, so
TRITON_INTERPRET=1 is set before triton is imported) in fp32, fp16 and bf16 (through tests/triton_interp.py),
the interpreter's bf16 dot defect that makes the shim necessary; and the kernels' compile specs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3moe_kernels import reference
from qwen3moe_kernels.kernels import grouped_swiglu
from qwen3moe_kernels.ops import grouped_swiglu as ops  # noqa: F401  (registers the ops)
from helpers import DEVICES
from tolerances import tol

HERE = Path(__file__).parent
OPS = torch.ops.qwen3moe


def _interp(*args):
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(HERE / "_grouped_swiglu_interp.py"), *args], env=env,
                       capture_output=True, text=True, timeout=900)
    return r.returncode, r.stdout + r.stderr


def test_interpreter_fp32_fp16_forward_backward():
    rc, out = _interp("fp32", "fp16")
    assert rc == 0 and "OK" in out, out[-4000:]


@pytest.fixture(scope="module")
def bf16_run():
    return _interp("bf16", "--shim")


def test_interpreter_bf16_with_shim(bf16_run):
    rc, out = bf16_run
    assert rc == 0 and "OK" in out, out[-4000:]


def test_interpreter_bf16_dot_defect_still_present(bf16_run):
    """Documents why tests/triton_interp.py exists. When this fails, triton's interpreter computes bf16 tl.dot
    correctly: delete the shim (tests/triton_interp.py and its --shim use) and run bf16 directly."""
    rc, out = bf16_run
    assert "bf16 dot defect present:" in out, out[-4000:]
    assert "bf16 dot defect present: True" in out, (
        "triton's interpreter now computes bf16 tl.dot correctly: drop the test-only shim tests/triton_interp.py")


def test_compile_specs_cover_kernels_and_dtypes():
    specs = grouped_swiglu.compile_specs()
    kernels = {s.kernel for s in specs}
    assert kernels == {"grouped_swiglu_gate_up_kernel", "grouped_swiglu_down_kernel", "grouped_swiglu_down_bwd_kernel",
                       "grouped_swiglu_dx_kernel", "grouped_swiglu_wgrad_kernel"}
    for k in kernels:
        labels = [s.label for s in specs if s.kernel == k]
        for want in ("30B-A3B decode", "30B-A3B prefill", "235B-A22B decode", "235B-A22B prefill"):
            for dt in ("bf16", "fp16", "fp32"):
                assert any(lab.startswith(f"{want} {dt}") for lab in labels), (k, want, dt)
    assert all(s.gemm for s in specs)


def test_default_config_phases():
    dec, pre = grouped_swiglu.default_config(8), grouped_swiglu.default_config(8 * 4096, "down")
    assert dec["BLOCK_M"] == 16 and pre["BLOCK_M"] == 128 and pre["BLOCK_N"] == 128
    with pytest.raises(ValueError, match="unknown kernel"):
        grouped_swiglu.default_config(8, "nope")


# ----------------------------------------------------------------------------------------- CPU ops


def _inputs(T, H, I, E, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    wgu = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    wd = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    w, ids = reference.router_topk(torch.randn(T, E, generator=g), k, True)
    return x, ids, w, wgu, wd


def _ref_gate_up(x, wgu, ids):
    k = ids.shape[1]
    gu = torch.einsum("sh,sih->si", x.double().repeat_interleave(k, 0), wgu.double()[ids.reshape(-1).long()])
    return reference.swiglu(gu), gu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_ops_match_reference(dtype):
    x, ids, w, wgu, wd = _inputs(29, 40, 24, 7, 3, dtype)
    h, gu = OPS.grouped_swiglu_gate_up(x, wgu, ids, True)
    h_ref, gu_ref = _ref_gate_up(x, wgu, ids)
    t = tol("gemm", dtype)
    torch.testing.assert_close(gu.double(), gu_ref, **t)
    torch.testing.assert_close(h.double(), h_ref, atol=2 * t["atol"], rtol=2 * t["rtol"])
    h2, empty = OPS.grouped_swiglu_gate_up(x, wgu, ids, False)
    assert torch.equal(h, h2) and empty.shape == (0, 48)
    out = OPS.grouped_swiglu_down(h, wd, ids, w)
    y = torch.einsum("si,shi->sh", h.double(), wd.double()[ids.reshape(-1).long()]).view(29, 3, 40)
    torch.testing.assert_close(out.double(), (y * w.double()[:, :, None]).sum(1), **t)


def test_cpu_backward_ops_match_autograd():
    """down_backward and gate_up_backward against autograd of the same math in float64."""
    x, ids, w, wgu, wd = _inputs(31, 36, 20, 6, 2, torch.float32, seed=3)
    h, gu = OPS.grouped_swiglu_gate_up(x, wgu, ids, True)
    dout = torch.randn(31, 36, generator=torch.Generator().manual_seed(4))
    dgu, dwd, drw = OPS.grouped_swiglu_down_backward(dout, h, gu, wd, ids, w)
    dx, dwgu = OPS.grouped_swiglu_gate_up_backward(dgu, x, wgu, ids)
    r = [t.double().requires_grad_() for t in (x, w, wgu, wd)]
    ref = reference.moe_experts(r[0], ids, r[1], r[2], r[3])
    ref.backward(dout.double())
    for got, want in ((dx, r[0].grad), (drw, r[1].grad), (dwgu, r[2].grad), (dwd, r[3].grad)):
        torch.testing.assert_close(got.double(), want, **tol("gemm", torch.float32))
    unused = torch.ones(6, dtype=torch.bool)
    unused[ids.reshape(-1).long()] = False
    assert (dwd[unused] == 0).all() and (dwgu[unused] == 0).all()  # experts without tokens: zero gradient


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, ids, w, wgu, wd = (t.to(device) for t in _inputs(9, 32, 16, 5, 2, torch.float32, seed=5))
    h, gu = OPS.grouped_swiglu_gate_up(x, wgu, ids, True)
    dout = torch.randn(9, 32, device=device)
    dgu = torch.randn(18, 32, device=device)
    samples = [
        (OPS.grouped_swiglu_gate_up, (x, wgu, ids, True)),
        (OPS.grouped_swiglu_gate_up, (x, wgu, ids.long(), False)),
        (OPS.grouped_swiglu_gate_up, (x[:0], wgu, ids[:0], True)),
        (OPS.grouped_swiglu_down, (h, wd, ids, w)),
        (OPS.grouped_swiglu_down_backward, (dout, h, gu, wd, ids, w)),
        (OPS.grouped_swiglu_gate_up_backward, (dgu, x, wgu, ids)),
        (OPS.grouped_swiglu_down_backward, (dout, h, gu, wd, ids, w, False)),
        (OPS.grouped_swiglu_gate_up_backward, (dgu, x, wgu, ids, False)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_op_errors_name_the_argument():
    x, ids, w, wgu, wd = _inputs(4, 32, 16, 5, 2, torch.float32)
    h, gu = OPS.grouped_swiglu_gate_up(x, wgu, ids, True)
    cases = [
        (lambda: OPS.grouped_swiglu_gate_up(x.int(), wgu, ids, False), "x must be fp32/fp16/bf16"),
        (lambda: OPS.grouped_swiglu_gate_up(x, wgu.half(), ids, False), "w_gate_up must be torch.float32"),
        (lambda: OPS.grouped_swiglu_gate_up(x, wgu[:, :, :8], ids, False), r"w_gate_up must be \[E, 2I, H=32\]"),
        (lambda: OPS.grouped_swiglu_gate_up(x, wgu.to("meta"), ids, False), "w_gate_up is on meta, expected cpu"),
        (lambda: OPS.grouped_swiglu_down(h, wd, ids.to("meta"), w), "ids is on meta, expected cpu"),
        (lambda: OPS.grouped_swiglu_gate_up(x, wgu, ids.float(), False), "ids must be int32 or int64"),
        (lambda: OPS.grouped_swiglu_gate_up(x, wgu, ids[:3], False), r"ids must be \[T=4, top_k\]"),
        (lambda: OPS.grouped_swiglu_gate_up(x, wgu, torch.zeros(4, 6, dtype=torch.int32), False),
         "top_k .* exceeds the number of experts E = 5"),
        (lambda: OPS.grouped_swiglu_gate_up(x, wgu, torch.where(ids == ids[2, 1], 5, ids), False),
         r"ids\[\d, \d\] = 5 is not an expert id in \[0, E=5\)"),
        (lambda: OPS.grouped_swiglu_gate_up(x, wgu, ids - 1 - ids.max(), False), "is not an expert id"),
        (lambda: OPS.grouped_swiglu_down(h, wd, ids, w.double()), "weights must be float32"),
        (lambda: OPS.grouped_swiglu_down(h[:5], wd, ids, w), "h must have T\\*k = 8 rows"),
        (lambda: OPS.grouped_swiglu_down(h, wd.transpose(1, 2), ids, w), r"h must be \[T\*k, I=32\]"),
        (lambda: OPS.grouped_swiglu_down_backward(x, h, gu[:, :4], wd, ids, w), "gate_up must be"),
        (lambda: OPS.grouped_swiglu_gate_up_backward(gu[:3], x, wgu, ids), "d_gate_up must be"),
    ]
    for fn, pattern in cases:
        with pytest.raises((RuntimeError, ValueError), match=pattern):
            fn()


def test_tuned_table_overrides_heuristic(monkeypatch):
    cfg = {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 4, "num_warps": 8, "num_stages": 4}
    monkeypatch.setitem(grouped_swiglu.TUNED, "Fake GPU", {"gate_up": {"bf16": [[64, cfg]]}})
    assert grouped_swiglu.default_config(8, "gate_up", "bf16", "Fake GPU") == cfg
    # past the table's largest entry, or another kernel/dtype: the heuristic
    assert grouped_swiglu.default_config(8192, "gate_up", "bf16", "Fake GPU") == grouped_swiglu.default_config(8192)
    assert grouped_swiglu.default_config(8, "down", "bf16", "Fake GPU") == grouped_swiglu.default_config(8, "down")
