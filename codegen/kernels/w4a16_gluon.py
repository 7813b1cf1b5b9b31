"""Weight-only 4-bit linear for Hopper (sm_90) in Gluon: a TMA producer warp and a dequantizing wgmma consumer.

Entry point: `linear_w4_gluon(x [M, K] bf16/fp16, qweight [N, K // 2] uint8, scales [N, K // G], zeros, bias) -> y [M, N]`
for M <= 64, 4-bit weights in the canonical layout (`llmopt/ops/linear_wq.py`: even k in the low nibble), G a
power of two >= 128. Same function as `torch.ops.llmopt.linear_wq` up to the order of fp32 sums: each weight is
dequantized as the reference does it, (q - z) * s rounded once to the scales' dtype.

Why a second kernel beside `w4a16_gemm.py`: that kernel's loads and its dequantization share warps, so at the
one or two programs an SM that its registers allow, the tensor cores and the ALUs wait on loads in turn
(Nsight: no eligible warp in 70-76% of cycles, benchmarks/RESULTS.md). Here the loads have a warp of their own:
- the producer (one warp) streams [BLOCK_N, 64]-byte weight tiles and [BLOCK_M, 128] x tiles by TMA into a
  ring of `STAGES` shared-memory slots, as far ahead as the ring allows;
- the consumer (one warp group) reads each weight tile straight into wgmma's A-operand register layout, one
  byte (two k) a register, and turns it into a bf16x2 pair with no int-to-float conversion: the nibbles go
  into the mantissa of 128.0 (0x4300 | q is the bf16 128 + q), then (128 + q) - (128 + z) is q - z exactly,
  times s rounded once (`_DEQUANT_ASM`, packed bf16x2 arithmetic). With x's tile as wgmma's B operand in
  shared memory, it accumulates yᵀ [BLOCK_N, BLOCK_M] = W · xᵀ over its K range, one wgmma in flight while
  the next tile is dequantized.
Why the layout works with no shuffle: wgmma's A layout for 16-bit values (k_width 2) gives each thread the k
pairs (2c, 2c + 1), (2c + 8, 2c + 9), ...; in the canonical layout a pair is one byte. So the byte tile loaded
in the same layout with k_width 1 (pairs instead of values), split into its two nibbles and joined along a new
last dim, is the A operand, element for element (checked: `gl.convert_layout(..., assert_trivial=True)`).
Split-K: the last program to finish an output tile (an atomic counter that resets itself) sums the fp32
partials and writes y, so a call is one launch.
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

TILE_K = 128  # k per weight tile: 64 bytes a row; G >= 128 keeps a tile inside one group
BLOCK_K = gl.constexpr(TILE_K)
# Gluon is young: Triton 3.9 renamed the TMA load (3.6 has only the old name)
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier  # 3.9's name; 3.6: thread_barrier
_X_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
_W_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=8, rank=2)  # 64-byte swizzle: byte loads in the A layout hit distinct banks

# one byte (two k: low nibble first) + the packed pairs (MAGIC + z, MAGIC + z) and (s, s) -> two dequantized values
_ASM_HEAD = "{ .reg .b32 t, w; shl.b32 t, $2, 12; lop3.b32 t, t, $2, 0x000F000F, 0xA8; "
_BF16_ASM = gl.constexpr(_ASM_HEAD + "or.b32 w, t, 0x43004300; sub.rn.bf16x2 w, w, $3; mul.rn.bf16x2 w, w, $4; mov.b32 {$0, $1}, w; }")
_FP16_ASM = gl.constexpr(_ASM_HEAD + "or.b32 w, t, 0x64006400; sub.rn.f16x2 w, w, $3; mul.rn.f16x2 w, w, $4; mov.b32 {$0, $1}, w; }")
DTYPES = (torch.bfloat16, torch.float16)


@gluon.jit
def _k_range(pid_k, num_kb, SPLIT_K):
    """-> (first weight tile, number of tiles) of split pid_k."""
    per_split = gl.cdiv(num_kb, SPLIT_K)
    begin = pid_k * per_split
    return begin, gl.maximum(gl.minimum(num_kb - begin, per_split), 0)


@gluon.jit
def _producer(desc_w, desc_x, w_smem, x_smem, acc_smem, ready, empty, s_ptr, z_ptr, N, num_kb, stride_sn,
              GROUP_SIZE, SPLIT_K):
    block_n: gl.constexpr = w_smem.shape[1]
    stages: gl.constexpr = w_smem.shape[0]
    row0 = gl.program_id(0) * block_n
    kb0, n_kb = _k_range(gl.program_id(1), num_kb, SPLIT_K)
    for i in range(n_kb):
        slot = i % stages
        mbarrier.wait(empty.index(slot), ((i // stages) & 1) ^ 1)  # a fresh barrier passes phase 1
        mbarrier.expect(ready.index(slot), desc_w.block_type.nbytes + desc_x.block_type.nbytes)
        _tma_load(desc_w, [row0, (kb0 + i) * (BLOCK_K // 2)], ready.index(slot), w_smem.index(slot))
        _tma_load(desc_x, [0, (kb0 + i) * BLOCK_K], ready.index(slot), x_smem.index(slot))


@gluon.jit
def _dequantize(wb, zz, ss, dtype: gl.constexpr):
    """wb: [BLOCK_N, BLOCK_K // 2] bytes (int32); zz, ss: [BLOCK_N, 1] packed (MAGIC + z) and s pairs
    -> (low, high) nibbles dequantized, each [BLOCK_N, BLOCK_K // 2] in dtype."""
    if dtype == gl.bfloat16:
        asm: gl.constexpr = _BF16_ASM
    else:
        asm: gl.constexpr = _FP16_ASM
    lo, hi = gl.inline_asm_elementwise(asm, "=h,=h,r,r,r", [wb, zz, ss], dtype=(gl.int16, gl.int16), is_pure=True,
                                       pack=1)
    return lo.to(dtype, bitcast=True), hi.to(dtype, bitcast=True)


@gluon.jit
def _packed_pair(v, dtype: gl.constexpr):
    """v: [R] in dtype -> [R] int32 holding (v, v), a bf16x2/f16x2 operand."""
    bits = v.to(dtype).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    return bits | (bits << 16)


@gluon.jit
def _consumer(desc_w, desc_x, w_smem, x_smem, acc_smem, ready, empty, s_ptr, z_ptr, N, num_kb, stride_sn,
              GROUP_SIZE, SPLIT_K):
    block_n: gl.constexpr = w_smem.shape[1]
    block_m: gl.constexpr = x_smem.shape[1]
    stages: gl.constexpr = w_smem.shape[0]
    dtype: gl.constexpr = x_smem.dtype
    magic: gl.constexpr = 128.0 if dtype == gl.bfloat16 else 1024.0
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, block_m, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    pair_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=1)
    row_layout: gl.constexpr = gl.SliceLayout(1, pair_layout)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    kb0, n_kb = _k_range(pid_k, num_kb, SPLIT_K)
    rows = pid_n * block_n + gl.arange(0, block_n, layout=row_layout)  # [BLOCK_N] weight rows
    rows = gl.where(rows < N, rows, N - 1)  # rows past N read row N - 1; their outputs are not stored
    sz_ptrs = rows * stride_sn  # [BLOCK_N]
    acc = gl.zeros([block_n, block_m], gl.float32, acc_layout)  # yᵀ
    w_prev = gl.zeros([block_n, BLOCK_K], dtype, a_layout)  # the A operand of the wgmma in flight
    s_next = gl.load(s_ptr + sz_ptrs + (kb0 * BLOCK_K) // GROUP_SIZE)  # [BLOCK_N]: scales a tile ahead
    z_next = gl.load(z_ptr + sz_ptrs + (kb0 * BLOCK_K) // GROUP_SIZE)
    for i in range(n_kb):
        slot = i % stages
        ss = _packed_pair(s_next, dtype)[:, None]  # [BLOCK_N, 1]
        zz = _packed_pair(z_next.to(gl.float32) + magic, dtype)[:, None]
        g = (gl.minimum(kb0 + i + 1, num_kb - 1) * BLOCK_K) // GROUP_SIZE
        s_next = gl.load(s_ptr + sz_ptrs + g)
        z_next = gl.load(z_ptr + sz_ptrs + g)
        mbarrier.wait(ready.index(slot), (i // stages) & 1)
        wb = w_smem.index(slot).load(pair_layout).to(gl.int32)  # [BLOCK_N, BLOCK_K // 2]
        lo, hi = _dequantize(wb, zz, ss, dtype)
        w = gl.convert_layout(gl.reshape(gl.join(lo, hi), [block_n, BLOCK_K]), a_layout,  # k = 2 * pair + nibble
                              assert_trivial=True)
        acc = warpgroup_mma(w, x_smem.index(slot).permute((1, 0)), acc, is_async=True)
        acc, w_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, w_prev))  # the last tile's wgmma is done
        mbarrier.arrive(empty.index((i + stages - 1) % stages), count=1, pred=i > 0)
        w_prev = w
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

    acc_smem.store(acc)  # the epilogue runs after the partitions join (module docstring)


@gluon.jit
def _epilogue(acc_smem, b_ptr, y_ptr, ws_ptr, count_ptr, M, N, stride_ym, SPLIT_K: gl.constexpr,
              HAS_BIAS: gl.constexpr):
    """acc_smem: this program's yᵀ tile [BLOCK_N, BLOCK_M] fp32 -> y (+ bias in fp32, as a GEMM epilogue), cast once.
    Split-K: each program publishes its partial; the last of an output tile's splits sums them all and stores y."""
    BLOCK_N: gl.constexpr = acc_smem.shape[0]
    BLOCK_M: gl.constexpr = acc_smem.shape[1]
    # the consumer's own layout: read back in another one, the tile came back wrong with Triton 3.6 on the H100
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
    pid_n = gl.program_id(0)
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))  # [BLOCK_N]
    offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, layout))  # [BLOCK_M]
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    _cta_barrier()  # the consumer's whole tile is in shared memory before any thread reads it back
    acc = acc_smem.load(layout)
    if SPLIT_K > 1:
        ws_tile = ws_ptr + offs_m[None, :] * N + offs_n[:, None]  # [BLOCK_N, BLOCK_M] of ws [SPLIT_K, M, N]
        gl.store(ws_tile + gl.program_id(1) * M * N, acc, mask=mask)
        _cta_barrier()  # every thread's partial is written before the counter moves
        last = gl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
        mask = mask & last
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout)
        for sk in range(SPLIT_K):
            acc += gl.load(ws_tile + sk * M * N, mask=mask, other=0.0, cache_modifier=".cg")
        gl.atomic_xchg(count_ptr + pid_n, 0, mask=last)  # zero again for the next call
    if HAS_BIAS:
        acc += gl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[:, None]
    gl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _w4_gluon_kernel(desc_w, desc_x, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, count_ptr, M, N, num_kb, stride_sn, stride_ym,
                     GROUP_SIZE: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr):
    dtype: gl.constexpr = desc_x.dtype
    BLOCK_N: gl.constexpr = desc_w.block_type.shape[0]
    BLOCK_M: gl.constexpr = desc_x.block_type.shape[0]
    w_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, BLOCK_K // 2], desc_w.layout)
    x_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], desc_x.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    fence_async_shared()
    acc_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_N, BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    args = (desc_w, desc_x, w_smem, x_smem, acc_smem, ready, empty, s_ptr, z_ptr, N, num_kb, stride_sn, GROUP_SIZE,
            SPLIT_K)
    # every partition takes the same arguments (Gluon's rule for worker partitions), each using what it needs
    gl.warp_specialize([(_consumer, args), (_producer, args)], [1], [24])
    _epilogue(acc_smem, b_ptr, y_ptr, ws_ptr, count_ptr, M, N, stride_ym, SPLIT_K, HAS_BIAS)


MAX_M = 64
_counters = {}  # device -> int32 split-K arrival counters, all zero between launches


def _config(m: int, n: int, k: int, sms: int):
    """-> (BLOCK_M, BLOCK_N, SPLIT_K, STAGES) for an [m, k] x [n, k]ᵀ product."""
    block_m = max(8, triton.next_power_of_2(m))
    block_n = 64
    tiles = triton.cdiv(n, block_n)
    split_k = max(1, min(k // TILE_K // 4, triton.cdiv(3 * sms, tiles)))  # ~3 programs an SM, >= 4 tiles a split
    return block_m, block_n, split_k, 6


def usable(x: torch.Tensor, qweight: torch.Tensor, group_size: int, bits: int) -> bool:
    """Whether this kernel takes the call: an sm_90 GPU, 16-bit x, 4-bit weights, groups of >= 128, M <= 64."""
    return (x.is_cuda and torch.cuda.get_device_capability(x.device) == (9, 0) and x.dtype in DTYPES
            and bits == 4 and group_size >= TILE_K and group_size & (group_size - 1) == 0
            and x.shape[-1] % group_size == 0 and 0 < x.reshape(-1, x.shape[-1]).shape[0] <= MAX_M)


def linear_w4_gluon(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    bias, group_size: int, config=None) -> torch.Tensor:
    """x [M, K] (M <= 64, 16-bit), qweight [N, K // 2] uint8, scales/zeros [N, K // G], bias [N] or None -> y [M, N].
    config: (BLOCK_M, BLOCK_N, SPLIT_K, STAGES) to override the default choice (benchmarks sweep it)."""
    m, k = x.shape
    n = qweight.shape[0]
    x, qweight = x.contiguous(), qweight.contiguous()
    scales = scales.contiguous()
    zeros = zeros.to(scales.dtype).contiguous()
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    block_m, block_n, split_k, stages = config or _config(m, n, k, sms)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # y: [M, N]
    ws = torch.empty(split_k if split_k > 1 else 0, m, n, dtype=torch.float32, device=x.device)  # ws: [S, M, N]
    tiles = triton.cdiv(n, block_n)
    counters = _counters.get(x.device)
    if counters is None or counters.numel() < tiles:
        counters = _counters[x.device] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=x.device)
    desc_w = TensorDescriptor(qweight, list(qweight.shape), list(qweight.stride()), [block_n, TILE_K // 2], _W_LAYOUT)
    desc_x = TensorDescriptor(x, list(x.shape), list(x.stride()), [block_m, TILE_K], _X_LAYOUT)
    _w4_gluon_kernel[(tiles, split_k)](
        desc_w, desc_x, scales, zeros, bias if bias is not None else scales, y, ws, counters,
        m, n, k // TILE_K, scales.stride(0), y.stride(0),
        GROUP_SIZE=group_size, SPLIT_K=split_k, STAGES=stages, HAS_BIAS=bias is not None, num_warps=4,
    )
    return y
