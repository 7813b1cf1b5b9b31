"""Group-quantized weight (W3/W4/W8, canonical layout) -> dense weight, in Triton.

Entry point: `dequantize_wq(qweight, scales, zeros, group_size, bits, dtype) -> W [N, K]`, bit-identical
to `dequantize_groups(...).to(dtype)` (`llmopt/ops/linear_wq.py`) when the zeros have the scales' dtype
(as `linear_wq` passes them): q - z is a small integer, exact in
fp32, and its product with a 16-bit scale is exact there too (with fp32 scales it is fp32's product,
as in the reference), so rounding to the scales' dtype and then to `dtype` rounds as the reference does.

`linear_wq` uses it for prefill-sized M: dequantizing into a temporary and calling cuBLAS beat the
fused W4A16 kernel 1.06-2.46x at M = 128 to 4096 (H200, benchmarks/RESULTS.md), while the fused kernel
wins up to M = 64, where reading the weight dominates. One program writes a [BLOCK_N, BLOCK_K] tile,
BLOCK_K = min(group size, 128), so a tile lies in one group: one scale and zero point per row.
"""
import torch
import triton
import triton.language as tl

BLOCK_N = 32  # rows a program: best of 8-128 rows, 4-8 warps on the H200 (3.7 TB/s read + write at 4096 x 4096)


@triton.jit
def _dequantize_kernel(
    qw_ptr,  # [N, K // 2] uint8 (BITS <= 4, low nibble = even k) or [N, K] (BITS == 8)
    s_ptr, z_ptr,  # [N, K // GROUP_SIZE]
    w_ptr,  # [N, K] out
    N, stride_qn, stride_sn, stride_wn,
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    kb = tl.program_id(1)  # block of BLOCK_K columns, inside group kb * BLOCK_K // GROUP_SIZE
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    group = kb * BLOCK_K // GROUP_SIZE
    s = tl.load(s_ptr + rows * stride_sn + group, mask=row_ok, other=0.0)  # [BLOCK_N]
    z = tl.load(z_ptr + rows * stride_sn + group, mask=row_ok, other=0.0).to(tl.float32)
    if BITS <= 4:
        offs_b = kb * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(qw_ptr + rows[:, None] * stride_qn + offs_b[None, :], mask=row_ok[:, None], other=0)  # [BLOCK_N, BLOCK_K // 2]
        q = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_N, BLOCK_K)).to(tl.float32)  # k even: low nibble
    else:
        offs_b = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        q = tl.load(qw_ptr + rows[:, None] * stride_qn + offs_b[None, :], mask=row_ok[:, None], other=0).to(tl.float32)
    w = ((q - z[:, None]) * s.to(tl.float32)[:, None]).to(s.dtype)  # [BLOCK_N, BLOCK_K], the reference's rounding
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + rows[:, None] * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=row_ok[:, None])


def dequantize_wq(
    qweight: torch.Tensor,  # [N, K // 2] (bits <= 4) or [N, K] (bits == 8) uint8
    scales: torch.Tensor,  # [N, K // G]
    zeros: torch.Tensor,  # [N, K // G]
    group_size: int,
    bits: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """-> W: [N, K] in `dtype`, one launch."""
    n = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits <= 4 else 1)
    assert scales.shape == zeros.shape == (n, k // group_size) and k % group_size == 0
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zeros.contiguous()
    w = torch.empty(n, k, dtype=dtype, device=qweight.device)  # w: [N, K]
    block_k = min(group_size, 128)
    grid = (triton.cdiv(n, BLOCK_N), k // block_k)
    _dequantize_kernel[grid](
        qweight, scales, zeros, w, n, qweight.stride(0), scales.stride(0), w.stride(0),
        GROUP_SIZE=group_size, BITS=bits, BLOCK_N=BLOCK_N, BLOCK_K=block_k, num_warps=4,
    )
    return w
