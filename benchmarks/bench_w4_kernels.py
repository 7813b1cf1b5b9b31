"""llmopt's two Gluon W4A16 kernels beside the shipped Triton kernel and bf16, each over its range of M.

Entry point: `python -m benchmarks.bench_w4_kernels [direct|wgmma ...] [--m 32,64] [--no-check]` (both kernels when
none is named; --m: the M to time instead of the kernel's own; --no-check: skip the check, for a call that ran the
kernel's GPU tests already, which check every config too): for each kernel (`codegen/kernels/w4a16_direct.py`, M = 1
to 16; `codegen/kernels/w4a16_wgmma.py`, M = 17 to 128) it checks the kernel against the reference op on odd shapes,
then times Llama-2-7B shapes as streams (bench_gemm's "stream": C weight copies, at least 4x the L2 cache, one graph
of C calls, divided by C): every config of the kernel (`CONFIGS`, or the direct kernel's `configs_for(M)`; "chosen"
is the one its `choose` tuned, for the direct kernel at M = 9-16 possibly the Triton kernel, whose time is then the
kernel's column) beside what `linear_wq` runs with llmopt's Gluon kernels turned off (the autotuned Triton kernel up
to M = 64, dequantize + cuBLAS above) and `x @ Wᵀ` in bf16, all in this run; and, for the direct kernel, the chosen
config launched without programmatic dependent launch ("no PDL", `codegen/kernels/pdl.py`: in a stream of calls each
may start while the one before it finishes), and the time only to read the int4 bytes (`read_floor.py`) without PDL,
with it, and with every load before the wait. Prints tables.
"""
import itertools

import torch

from benchmarks.bench_gemm import GROUP, LLAMA_7B, _stream_copies, w4_weights
from benchmarks.common import print_table, rel_err, time_graph_ms
from benchmarks.read_floor import read_floor_ms
from llmopt.codegen.kernels import w4a16_direct, w4a16_gemm, w4a16_wgmma
from llmopt.ops.linear_wq import dequantize_groups

KERNELS = {  # name -> (module, its linear function, the M it benchmarks, (M, N, K, G) checks)
    "direct": (w4a16_direct, w4a16_direct.linear_w4_direct, (1, 4, 8, 16),
               [(1, 4096, 4096, 128), (3, 100, 384, 128), (8, 4100, 11008, 128), (7, 77, 1024, 256),
                (5, 33, 128, 128), (2, 64, 256, 256), (16, 4100, 4096, 128), (12, 77, 1024, 256)]),
    "wgmma": (w4a16_wgmma, w4a16_wgmma.linear_w4_wgmma, (32, 64, 128),
              [(32, 4096, 4096, 128), (20, 100, 384, 128), (64, 4100, 11008, 128), (37, 77, 1024, 256),
               (128, 33, 128, 128), (100, 200, 1280, 256), (17, 64, 256, 256)]),
}


def check(name: str) -> list:
    module, linear, _, shapes = KERNELS[name]
    rows = []
    for (m, n, k, g), dtype, with_bias in itertools.product(shapes, (torch.bfloat16, torch.float16), (False, True)):
        qweight, scales, zeros = w4_weights(n, k, g, dtype)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        bias = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
        w = dequantize_groups(qweight, scales, zeros, g, 4).float()  # [N, K]
        ref = x.float() @ w.t() + (bias.float() if with_bias else 0)
        errs = {}
        for cfg in _configs(module, m):
            y = linear(x, qweight, scales, zeros, bias, g, cfg)
            again = linear(x, qweight, scales, zeros, bias, g, cfg)
            errs[cfg] = (rel_err(y, ref), bool(torch.equal(y, again)), bool(y.isfinite().all()))
        rows.append({"M": m, "N": n, "K": k, "G": g, "dtype": str(dtype)[6:], "bias": with_bias,
                     "chosen": module.choose(x, qweight, g, 4), "max rel err": max(e[0] for e in errs.values()),
                     "same twice": all(e[1] for e in errs.values()), "finite": all(e[2] for e in errs.values())})
    return rows


def _configs(module, m: int) -> list:
    """The configs the kernel's first-use tuning may pick for m rows."""
    return module.configs_for(m) if hasattr(module, "configs_for") else module.CONFIGS


def _without_gluon(x, qweight, scales, zeros):
    """What linear_wq runs with llmopt's Gluon kernels turned off for the call."""
    saved = w4a16_gemm.w4a16_direct, w4a16_gemm.w4a16_wgmma
    w4a16_gemm.w4a16_direct = w4a16_gemm.w4a16_wgmma = None
    try:
        return w4a16_gemm.linear_wq(x, qweight, scales, zeros, None, GROUP, 4)
    finally:
        w4a16_gemm.w4a16_direct, w4a16_gemm.w4a16_wgmma = saved


def bench(name: str, ms=None) -> list:
    module, linear, default_ms, _ = KERNELS[name]
    ms = ms or default_ms
    rows = []
    for m, (n, k) in itertools.product(ms, LLAMA_7B):
        qweight, scales, zeros = w4_weights(n, k, GROUP, torch.bfloat16)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = dequantize_groups(qweight, scales, zeros, GROUP, 4)  # [N, K] bf16, the baseline's weight
        weight_bytes = n * k // 2 + 2 * n * (k // GROUP) * 2
        copies = _stream_copies(weight_bytes)
        chosen = module.choose(x, qweight, GROUP, 4)
        qws = [(qweight.clone(), scales.clone(), zeros.clone()) for _ in range(copies)]
        t_base = time_graph_ms([lambda q=q: _without_gluon(x, *q) for q in qws])
        times = {cfg: time_graph_ms([lambda q=q: linear(x, *q, None, GROUP, cfg) for q in qws])
                 for cfg in _configs(module, m)}
        best = min(times, key=times.get)
        mine = chosen if chosen is not None else best  # None: linear_wq runs the Triton kernel ("without") here
        direct_columns = {}
        if name == "direct":  # the one launched with PDL (pdl.py says why), and the read floors with and without it
            t_no_pdl = time_graph_ms([lambda q=q: linear(x, *q, None, GROUP, mine, launch_pdl=False) for q in qws])
            floors = {f"read floor {pdl} us": 1e3 * read_floor_ms(n * k // 2, copies, pdl)
                      for pdl in ("off", "wait", "early")}
            direct_columns = {"no PDL us": 1e3 * t_no_pdl, "PDL gain": t_no_pdl / times[mine], **floors}
        err = rel_err(linear(x, qweight, scales, zeros, None, GROUP, mine), x @ w.t())
        del qws
        ws = [w.clone() for _ in range(copies)]
        t_bf16 = time_graph_ms([lambda v=v: x @ v.t() for v in ws])
        del ws
        t = times[chosen] if chosen is not None else t_base  # what linear_wq runs
        rows.append({"M": m, "N x K": f"{n} x {k}", "bf16 us": 1e3 * t_bf16, "without us": 1e3 * t_base,
                     f"{name} us": 1e3 * t, "chosen config": chosen if chosen is not None else "Triton kernel",
                     "best config": best,
                     f"{name} / bf16": t_bf16 / t, "without / bf16": t_bf16 / t_base, f"{name} / without": t_base / t,
                     **direct_columns,
                     f"{name} GB/s": weight_bytes / t / 1e6, "TFLOP/s": 2 * m * n * k / t / 1e9, "rel err": err,
                     "all configs us": " ".join(f"{c}: {1e3 * v:.2f}" for c, v in times.items())})
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernels", nargs="*", help=f"any of {', '.join(KERNELS)} (default: all)")
    parser.add_argument("--m", type=lambda text: [int(v) for v in text.split(",")], help="M to time, e.g. 32,64")
    parser.add_argument("--no-check", action="store_true", help="skip the check against the reference")
    args = parser.parse_args()
    if set(args.kernels) - set(KERNELS):
        parser.error(f"unknown kernel {sorted(set(args.kernels) - set(KERNELS))}: choose from {list(KERNELS)}")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for name in args.kernels or list(KERNELS):
        if not args.no_check:
            checks = check(name)
            print_table(f"{name} W4A16 kernel, every config vs reference (fp32 product of the dequantized weight)",
                        list(checks[0]), checks)
        rows = bench(name, args.m)
        print_table(f"W4A16 stream, us: the {name} kernel vs linear_wq without the Gluon kernels ('without') vs bf16",
                    list(rows[0]), rows)
