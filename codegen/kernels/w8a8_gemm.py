"""W8A8 linear on int8 tensor cores: y = (q(x) @ Wᵀ) · s_x · s_w (+ bias) (+ residual).

Entry points:
- `linear_w8a8(x, weight, weight_scale, bias, act_scale, residual=None)`, the Triton form of
  `torch.ops.llmopt.linear_w8a8` with an optional fused residual add. Two launches: the activation
  quantization (`quantize_rows`, bit-identical to the reference) and one GEMM whose int32 accumulator
  gets the whole epilogue (row scale, column scale, bias, residual, cast) in registers;
- `linear_int8(q, row_scale, weight, weight_scale, bias, out_dtype)`: the GEMM alone, on activations
  quantized already. Lowering calls it (`llmopt.codegen.quantize_inputs`): linears that share an input
  share its quantization, which a generated kernel fuses into the op that makes the input.

The weight stays in its canonical `[N, K]` row-major int8 layout: that is already K-major for the
B operand, which is what int8 tensor-core instructions read, so there is no repacking step.

Two GEMM kernels, one epilogue (`_scaled`):
- `_w8a8_gemm_kernel`, on Hopper (compute capability 9.x) for prefill-sized M (>= 1024 rows), a
  16-bit output, and operands that suit the tensor memory accelerator (`_use_tma`): persistent (one
  or two programs per SM by config, walking output tiles in grouped order), A and B tiles loaded by TMA through
  host-side tensor descriptors, the residual loaded and the output stored by TMA. TMA zero-fills
  reads past M and K and clips writes past M and N, so there are no masks but the scales';
- `_w8a8_pointer_kernel`, everywhere else (fewer rows, other GPUs, unaligned shapes, the
  Triton interpreter): one program per tile, pointer loads. Two autotuners share it:
  `_w8a8_gemm_pointer_kernel` (tiles of 32-256 rows) and, up to DECODE_MAX_M rows, `_w8a8_gemv_kernel`:
  16-row tiles with K split over programs (SPLIT_K), so that a decode GEMV has enough programs to keep its
  weight loads in flight (a 4096-wide linear got 64 programs at M = 1 from the prefill tiles). The last
  program of a tile to arrive (an atomic counter that resets itself, `split_k.py`) adds the int32 partials,
  exactly, so every split gives the same bits, and runs the epilogue: one launch a call.
All are tuned per (M bucket, N, K) and GPU, and the choices kept on disk (the pointer kernel's by Triton's
autotuner, the TMA kernel's by `_tma_shape`).
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError
from triton.tools.tensor_descriptor import TensorDescriptor

from llmopt.codegen.kernels import tuning
from llmopt.codegen.kernels.choice_cache import MISSING, ChoiceCache
from llmopt.codegen.kernels.quantize_rows import quantize_rows
from llmopt.codegen.kernels.split_k import sum_of_splits, tile_counters
from llmopt.codegen.kernels.tuning import quick_bench

_INTERPRET = triton.knobs.runtime.interpret
DECODE_MAX_M = 16  # up to here the pointer kernel runs 16-row tiles with split K (`_decode_configs`)


def _pointer_configs():
    if _INTERPRET:  # one small config: the interpreter runs each program in Python
        return [_pointer_config(32, 32, 32, 4, 1, group_m=4)]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 256, 128, 8, 4), (256, 128, 128, 8, 4),
        (128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (128, 256, 64, 8, 4), (128, 128, 256, 8, 3),
        (64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (32, 64, 256, 4, 3),
    ]
    return [_pointer_config(*shape) for shape in shapes]


def _decode_configs():
    """M <= DECODE_MAX_M: 16-row tiles and split K, so that a GEMV has enough programs to keep many weight loads in
    flight (the prefill tiles above gave a 4096-wide linear 64 programs at M = 1)."""
    if _INTERPRET:  # split in two, to run the reduction
        return [_pointer_config(16, 32, 32, 4, 1, split_k=2)]
    shapes = [  # (BLOCK_N, BLOCK_K, warps, stages, SPLIT_K)
        (64, 256, 4, 3, 1), (64, 256, 4, 3, 2), (64, 256, 4, 3, 4), (64, 128, 4, 4, 8), (128, 256, 4, 3, 2),
        (128, 256, 4, 3, 4), (128, 128, 4, 4, 4), (128, 128, 4, 4, 8), (32, 256, 4, 3, 4), (256, 128, 8, 3, 4),
    ]
    return [_pointer_config(DECODE_MAX_M, n, k, w, s, split_k=split) for n, k, w, s, split in shapes]


def _pointer_config(bm, bn, bk, warps, stages, group_m=8, split_k=1):
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "SPLIT_K": split_k}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def _tma_shapes() -> list:
    """The TMA kernel's candidates: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, epilogue in two halves, programs per
    SM). Tuned by `_tma_shape` rather than `triton.autotune`: the descriptors' block shapes follow the config, which
    Triton's autotuner can only set in a per-config pre-hook, and it does not keep such choices on disk."""
    if _INTERPRET:  # one small config; subtiled, so the interpreter runs the split epilogue
        return [(32, 32, 32, 4, 1, True, 1)]
    # measured on the H200 (benchmarks/RESULTS.md): 128x128x128 tiles, 3 stages, two programs per SM (112 KB of
    # shared memory each) lead on every M 2048-8192 Llama shape: while one program runs its epilogue the other's
    # MMAs keep the tensor cores busy (1.72-1.99x bf16 against 1.52-1.81x for one 256x128 program per SM). Configs
    # that overflow shared memory (4 stages plus a residual block) time as infinite; a residual block makes the
    # two-per-SM config run one per SM at a time.
    return [
        (128, 128, 128, 4, 3, True, 2), (256, 128, 128, 8, 4, True, 1), (256, 128, 128, 8, 3, True, 1),
        (128, 256, 128, 8, 3, False, 1), (128, 128, 64, 4, 6, True, 2), (128, 128, 128, 4, 4, False, 1),
    ]


_TMA_SHAPES = _tma_shapes()
_tma_choices = ChoiceCache("w8a8_gemm_tma", [__file__, tuning.__file__], _TMA_SHAPES)


def _tile_fits(block_m: int, m_bucket: int) -> bool:
    """Tiles no taller than the M bucket (a 256-row tile wastes most of itself on 16 tokens); 64 rows always fit."""
    return block_m <= max(m_bucket, 64)


def _prune(configs, named_args, **kwargs):
    """The pointer kernels' configs whose tiles fit the M bucket (`_tile_fits`), or the last."""
    return [c for c in configs if _tile_fits(c.kwargs["BLOCK_M"], named_args["M_BUCKET"])] or configs[-1:]


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile index -> (row tile, column tile), grouped: GROUP_M row tiles share each weight column
    tile while it is in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_id = tile // (GROUP_M * num_n)
    first_m = group_id * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % (GROUP_M * num_n)) % group_rows
    pid_n = (tile % (GROUP_M * num_n)) // group_rows
    return pid_m, pid_n


@triton.jit
def _scaled(
    acc,  # acc: [BM, BN] int32, rows offs_m and columns offs_n of q @ Wᵀ
    offs_m, offs_n,  # [BM], [BN]
    M, N, sa_ptr, stride_sam, sb_ptr, bias_ptr,
    HAS_BIAS: tl.constexpr,
):
    """-> [BM, BN] fp32 (acc * s_x) * s_w + bias, the reference's order; callers add the residual."""
    sa = tl.load(sa_ptr + offs_m * stride_sam, mask=offs_m < M, other=0.0)  # [BM]
    sb = tl.load(sb_ptr + offs_n, mask=offs_n < N, other=0.0)  # [BN]
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _finish_tma(
    acc,  # acc: [BM, BN] int32, the output block at rows m0.., columns n0..
    m0, n0, M, N, sa_ptr, stride_sam, sb_ptr, bias_ptr,
    r_desc, c_desc,  # residual (read if HAS_RESIDUAL) and output, blocks [BM, BN]
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """The TMA kernel's epilogue for one block: scales and bias, the residual read by TMA (straight
    into shared memory, no layout-conversion scratch), the cast, the store by TMA."""
    offs_m = m0 + tl.arange(0, BM)
    offs_n = n0 + tl.arange(0, BN)
    y = _scaled(acc, offs_m, offs_n, M, N, sa_ptr, stride_sam, sb_ptr, bias_ptr, HAS_BIAS)
    if HAS_RESIDUAL:
        y += r_desc.load([m0, n0]).to(tl.float32)
    c_desc.store([m0, n0], y.to(c_desc.dtype))


@triton.jit
def _w8a8_tma_kernel(
    # TMA descriptors (block shapes from the config, `_launch_tma`)
    a_desc,  # a: [M, K] int8, quantized activations; blocks [BLOCK_M, BLOCK_K]
    b_desc,  # b: [N, K] int8, weight; blocks [BLOCK_N, BLOCK_K]
    c_desc,  # c: [M, N] output in the activation dtype; blocks [BLOCK_M, BLOCK_N (/ 2 if SUBTILE)]
    r_desc,  # res: [M, N] residual, read if HAS_RESIDUAL; blocks as c's
    # epilogue operands
    sa_ptr,  # sa: [M] fp32 row scales (row stride 0 for a static per-tensor scale)
    sb_ptr,  # sb: [N] fp32 column scales
    bias_ptr,  # bias: [N], read if HAS_BIAS
    M, N, K, stride_sam,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUBTILE: tl.constexpr,  # epilogue in two column halves: half the registers and staging memory
):
    # persistent: program p takes tiles p, p + programs, ...; the flattened loop lets the next
    # tile's loads start during this tile's epilogue
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    step = tl.num_programs(0)
    tile_c = tl.program_id(0) - step  # the epilogue's own tile counter, as in Triton's persistent matmul
    for tile in tl.range(tl.program_id(0), num_tiles, step, flatten=True):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k0])  # [BLOCK_M, BLOCK_K]
            b = b_desc.load([pid_n * BLOCK_N, k0])  # [BLOCK_N, BLOCK_K]
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)

        tile_c += step
        pid_m, pid_n = _tile_coords(tile_c, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        if SUBTILE:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))  # [BLOCK_M, BLOCK_N // 2, 2]
            acc0, acc1 = tl.split(halves)  # [BLOCK_M, BLOCK_N // 2] each
            _finish_tma(acc0, m0, n0, M, N, sa_ptr, stride_sam, sb_ptr, bias_ptr, r_desc, c_desc,
                        HAS_BIAS, HAS_RESIDUAL, BLOCK_M, BLOCK_N // 2)
            _finish_tma(acc1, m0, n0 + BLOCK_N // 2, M, N, sa_ptr, stride_sam, sb_ptr, bias_ptr, r_desc, c_desc,
                        HAS_BIAS, HAS_RESIDUAL, BLOCK_M, BLOCK_N // 2)
        else:
            _finish_tma(acc, m0, n0, M, N, sa_ptr, stride_sam, sb_ptr, bias_ptr, r_desc, c_desc,
                        HAS_BIAS, HAS_RESIDUAL, BLOCK_M, BLOCK_N)


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _w8a8_pointer_kernel(
    # int8 operands
    a_ptr,  # a: [M, K] int8, quantized activations
    b_ptr,  # b: [N, K] int8, weight
    # epilogue operands
    sa_ptr,  # sa: [M] fp32 row scales (row stride 0 for a static per-tensor scale)
    sb_ptr,  # sb: [N] fp32 column scales
    bias_ptr,  # bias: [N], read if HAS_BIAS
    res_ptr,  # res: [M, N], read if HAS_RESIDUAL
    c_ptr,  # c: [M, N] output in the activation dtype
    ws_ptr,  # ws: [SPLIT_K, M, N] int32 partial sums (SPLIT_K > 1)
    count_ptr,  # count: [number of output tiles] int32, zero between calls (SPLIT_K > 1)
    # sizes and strides (inner strides are 1)
    M, N, K,
    M_BUCKET,  # autotuning key only
    stride_am, stride_bn, stride_sam, stride_rm, stride_cm,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # split-K: program_id(1) takes a run of K blocks
    num_kb = tl.cdiv(K, BLOCK_K)
    kb_per_split = tl.cdiv(num_kb, SPLIT_K)
    k_begin = tl.program_id(1) * kb_per_split * BLOCK_K
    k_end = min(K, k_begin + kb_per_split * BLOCK_K)
    offs_k = k_begin + tl.arange(0, BLOCK_K)
    rows = offs_m % M  # wrapped so every operand load is in bounds; the epilogue masks the extra rows
    cols = offs_n % N
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + cols[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N], a view of Wᵀ

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - (k0 - k_begin), other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - (k0 - k_begin), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K > 1:  # the tile's last split to arrive adds the partials (int32: exact) and stores
        ws_tile = ws_ptr + offs_m[:, None] * N + offs_n[None, :]  # [BLOCK_M, BLOCK_N]
        last, acc = sum_of_splits(acc, ws_tile, tl.program_id(1), M, N, count_ptr, tile, mask, SPLIT_K)
        if last:
            _store_pointer(acc, offs_m, offs_n, mask, M, N, sa_ptr, stride_sam, sb_ptr, bias_ptr, res_ptr, stride_rm,
                           c_ptr, stride_cm, HAS_BIAS, HAS_RESIDUAL)
    else:
        _store_pointer(acc, offs_m, offs_n, mask, M, N, sa_ptr, stride_sam, sb_ptr, bias_ptr, res_ptr, stride_rm,
                       c_ptr, stride_cm, HAS_BIAS, HAS_RESIDUAL)


@triton.jit
def _store_pointer(acc, offs_m, offs_n, mask, M, N, sa_ptr, stride_sam, sb_ptr, bias_ptr, res_ptr, stride_rm, c_ptr,
                   stride_cm, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The pointer kernel's epilogue: acc [BLOCK_M, BLOCK_N] int32 -> scales, bias, residual, cast, store."""
    y = _scaled(acc, offs_m, offs_n, M, N, sa_ptr, stride_sam, sb_ptr, bias_ptr, HAS_BIAS)
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], y.to(c_ptr.dtype.element_ty), mask=mask)


_POINTER_AUTOTUNE = dict(key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune},
                         do_bench=quick_bench, cache_results=True)
_w8a8_gemm_pointer_kernel = triton.autotune(configs=_pointer_configs(), **_POINTER_AUTOTUNE)(_w8a8_pointer_kernel)
_w8a8_gemv_kernel = triton.autotune(configs=_decode_configs(), **_POINTER_AUTOTUNE)(_w8a8_pointer_kernel)  # M <= 16
_MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in _w8a8_gemv_kernel.configs)


_TMA_MIN_ROWS = 1024  # below, the pointer kernel's small tiles (several per SM) fill the GPU better


def _has_tma(device: torch.device) -> bool:
    """Hopper's tensor memory accelerator, which the TMA kernel's configs are tuned for."""
    return device.type == "cuda" and not _INTERPRET and torch.cuda.get_device_capability(device)[0] == 9


def _use_tma(
    q: torch.Tensor, weight: torch.Tensor, c: torch.Tensor, res: torch.Tensor,  # [M, K], [N, K], [M, N], [M, N]
) -> bool:
    """The TMA kernel: prefill-sized M on Hopper, 16-bit output and residual (the configs' shared
    memory fits 2-byte epilogue blocks), and TMA's rules: 16-byte aligned bases and row strides."""
    tensors = (q, weight, c, res)
    return (
        q.shape[0] >= _TMA_MIN_ROWS and _has_tma(q.device) and c.element_size() == 2 and res.element_size() == 2
        and all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in tensors)
    )


def _num_programs(device: torch.device) -> int:
    """The persistent grid's unit: one program per SM, times the config's programs per SM (two in all
    under the interpreter, to exercise the tile loop)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def int8_gemm_scaled(
    q: torch.Tensor,  # [M, K] int8
    weight: torch.Tensor,  # [N, K] int8
    row_scale: torch.Tensor,  # [M, 1] or [1, 1] fp32
    weight_scale: torch.Tensor,  # [N] fp32
    bias: Optional[torch.Tensor],  # [N] or None
    residual: Optional[torch.Tensor],  # [M, N] or None
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """-> [M, N] in `out_dtype`: (q @ weightᵀ) · row_scale · weight_scale (+ bias) (+ residual)."""
    m, k = q.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.dtype == torch.int8 and weight.stride(1) == 1
    assert m * k < 2**31 and n * k < 2**31 and m * n < 2**31, "32-bit offsets"
    weight_scale = weight_scale.to(torch.float32).contiguous()
    sa = row_scale.expand(m, 1)  # a static scale gets row stride 0
    c = torch.empty(m, n, dtype=out_dtype, device=q.device)  # c: [M, N]
    if m == 0:
        return c
    if residual is not None:
        assert residual.shape == (m, n) and residual.stride(1) == 1
    res = residual if residual is not None else c  # res: [M, N], read if HAS_RESIDUAL
    scales = (sa, weight_scale, bias if bias is not None else weight_scale)
    flags = {"HAS_BIAS": bias is not None, "HAS_RESIDUAL": residual is not None}
    if _use_tma(q, weight, c, res):
        launch = lambda shape: _launch_tma(q, weight, c, res, scales, sa.stride(0), flags, shape)  # noqa: E731
        launch(_tma_shape(launch, q.device, tma_key(q, n, out_dtype, flags)))
    else:
        decode = m <= DECODE_MAX_M
        kernel = _w8a8_gemv_kernel if decode else _w8a8_gemm_pointer_kernel
        ws = torch.empty(_MAX_SPLIT_K if decode else 0, m, n, dtype=torch.int32, device=q.device)  # [S, M, N]
        # split K only at decode sizes: the prefill tiles never read the counters
        counters = tile_counters(q.device, m, n) if decode else ws
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
        kernel[grid](
            q, weight, *scales, res, c, ws, counters, m, n, k, _m_bucket(m),
            q.stride(0), weight.stride(0), sa.stride(0), res.stride(0), c.stride(0), **flags,
        )
    return c


def _m_bucket(m: int) -> int:
    """The rows a tuning choice covers: M rounded up to a power of two, at most 4096."""
    return min(triton.next_power_of_2(m), 4096)


def tma_key(q: torch.Tensor, n: int, out_dtype: torch.dtype, flags: dict) -> tuple:
    """q [M, K] against [N, K] weights, flags (HAS_BIAS, HAS_RESIDUAL) -> the TMA kernel's tuning key (M bucket, N,
    K, out dtype, bias, residual); `_tma_choices.get(key, q.device)` is the shape it runs."""
    m, k = q.shape
    return (_m_bucket(m), n, k, out_dtype, *flags.values())


def _tma_shape(launch, device: torch.device, key: tuple) -> tuple:
    """launch(shape): the TMA kernel's call with one of `_TMA_SHAPES`; key: `tma_key` -> the fastest shape for it,
    timed on the call's own operands on its first use (a bucket) and kept on disk (`choice_cache.py`); the first
    candidate, untimed, during a CUDA-graph capture with none kept."""
    m_bucket = key[0]
    shapes = [shape for shape in _TMA_SHAPES if _tile_fits(shape[0], m_bucket)] or _TMA_SHAPES[-1:]
    if len(shapes) == 1:
        return shapes[0]
    shape = _tma_choices.get(key, device)
    if shape is MISSING:
        if torch.cuda.is_current_stream_capturing():
            return shapes[0]
        times = {candidate: _time_tma(launch, candidate) for candidate in shapes}
        shape = _tma_choices.put(key, device, min(times, key=times.get))
    return shape


def _time_tma(launch, shape: tuple) -> float:
    """ms a call of launch(shape); infinite where the config does not fit the GPU (shared memory, registers)."""
    try:
        return quick_bench(lambda: launch(shape), None)
    except (OutOfResources, CompileTimeAssertionFailure, PTXASError):
        return float("inf")


def _launch_tma(q, weight, c, res, scales: tuple, stride_sam: int, flags: dict, shape: tuple):
    """The TMA kernel on q [M, K], weight [N, K] -> c [M, N] (res [M, N] read if flags["HAS_RESIDUAL"]), config
    shape (`_tma_shapes`): descriptors with its block shapes, a persistent grid of its programs per SM."""
    block_m, block_n, block_k, warps, stages, subtile, per_sm = shape
    m, n = c.shape
    out_block = [block_m, block_n // 2 if subtile else block_n]
    descs = [TensorDescriptor.from_tensor(q, [block_m, block_k]),
             TensorDescriptor.from_tensor(weight, [block_n, block_k]),
             TensorDescriptor.from_tensor(c, out_block), TensorDescriptor.from_tensor(res, out_block)]
    grid = (min(_num_programs(q.device) * per_sm, triton.cdiv(m, block_m) * triton.cdiv(n, block_n)), )
    _w8a8_tma_kernel[grid](*descs, *scales, m, n, q.shape[1], stride_sam, **flags, BLOCK_M=block_m, BLOCK_N=block_n,
                           BLOCK_K=block_k, GROUP_M=8, SUBTILE=subtile, num_warps=warps, num_stages=stages)


def linear_int8(
    q: torch.Tensor,  # [..., K] int8, quantized activations
    row_scale: torch.Tensor,  # [..., 1] fp32 (per token), or 1 element (a static per-tensor scale)
    weight: torch.Tensor,  # [N, K] int8
    weight_scale: torch.Tensor,  # [N] fp32
    bias: Optional[torch.Tensor],  # [N] or None
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """-> [..., N] in `out_dtype`: (q @ weightᵀ) · row_scale · weight_scale (+ bias), one launch."""
    lead, k = q.shape[:-1], q.shape[-1]
    q2 = q.reshape(-1, k).contiguous()  # q2: [M, K]
    y = int8_gemm_scaled(q2, weight.contiguous(), row_scale.reshape(-1, 1), weight_scale, bias, None, out_dtype)
    return y.reshape(*lead, weight.shape[0])


def linear_w8a8(
    x: torch.Tensor,  # [..., K] fp16/bf16/fp32
    weight: torch.Tensor,  # [N, K] int8
    weight_scale: torch.Tensor,  # [N] fp32
    bias: Optional[torch.Tensor],  # [N] or None
    act_scale: Optional[torch.Tensor],  # [1] fp32 (static) or None (per token, dynamic)
    residual: Optional[torch.Tensor] = None,  # [..., N] or None, added before the cast
) -> torch.Tensor:
    """Same function as `torch.ops.llmopt.linear_w8a8` (+ `residual`), as two Triton launches."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k).contiguous()  # x2: [M, K]
    q, row_scale = quantize_rows(x2, act_scale)
    res2 = None if residual is None else residual.reshape(-1, n).contiguous()  # res2: [M, N]
    y = int8_gemm_scaled(q, weight.contiguous(), row_scale, weight_scale, bias, res2, x.dtype)
    return y.reshape(*lead, n)
