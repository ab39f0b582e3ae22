"""Run under TRITON_INTERPRET=1 (set before triton is imported) by tests/test_grouped_swiglu.py in a subprocess:
the two Triton grouped GEMMs against the reference experts on CPU tensors, fp32 and fp16."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from qwen3moe_kernels import reference  # noqa: E402
from qwen3moe_kernels.kernels import grouped_swiglu as k  # noqa: E402


def run(T, H, I, E, top_k, dtype, all_one=False, bm=16):
    g = torch.Generator().manual_seed(T * 131 + H)
    x = torch.randn(T, H, generator=g).to(dtype)
    wgu = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    wd = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    logits = torch.randn(T, E, generator=g)
    weights, ids = reference.router_topk(logits, top_k, True)
    if all_one:
        ids = torch.stack([torch.full((T,), j, dtype=torch.int32) for j in range(top_k)], 1)
    cfg = {"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": 32}
    padded, be, _ = reference.moe_align_block(ids, E, bm)
    h = k.gate_up(x, wgu, padded, be, top_k, cfg)
    y = k.down(h, wd, weights, padded, be, cfg)
    out = y.reshape(T, top_k, H).sum(1)
    ref = reference.moe_experts(x.double(), ids, weights.double(), wgu.double(), wd.double()).float()
    # h check: the gate/up kernel alone
    href = reference.swiglu(torch.einsum("th,tsih->tsi", x.double(), wgu.double()[ids.long()]).reshape(T * top_k, 2 * I))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    eh = (h.double() - href).abs().max().item() if T else 0.0
    eo = (out.double() - ref.double()).abs().max().item() if T else 0.0
    assert eh <= tol * max(1.0, href.abs().max().item()), (T, H, I, E, top_k, dtype, "h", eh)
    assert eo <= tol * max(1.0, ref.abs().max().item()), (T, H, I, E, top_k, dtype, "out", eo)


if __name__ == "__main__":
    cases = [
        (1, 64, 48, 5, 2),  # one token; most experts get no token
        (37, 83, 67, 7, 3),  # sizes not multiples of the tiles, E odd
        (20, 96, 40, 9, 9),  # k == E
    ]
    for dtype in (torch.float32, torch.float16):
        for c in cases:
            run(*c, dtype)
        run(19, 70, 45, 6, 1, dtype, all_one=True)  # all tokens on expert 0
    print("OK")
    sys.exit(0)
