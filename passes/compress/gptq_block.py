"""GPTQ's inner loop as one Triton kernel per block of columns (for CUDA tensors).

Entry point: `round_block(w_block, u_block, scale, zero, groups, bits) -> (codes, errs)`, what
`gptq._round_columns` does for one block of up to 128 columns in torch (a dozen small launches per
column, most of GPTQ's time on a GPU). Each program holds BLOCK_R rows of the block in registers and
walks its columns in order: round column j to its group's grid, scale the rounding error by 1 / U[j, j],
and subtract error · U[j, :] from the row's remaining columns; rows are independent, so programs need
not talk. The caller then updates the columns after the block with one matmul, as in torch.

Rounding is torch's: w / s correctly rounded (`div_rn`), then half to even (adding and subtracting
1.5 · 2^23, exact for |w / s| < 2^22), then + z and the clamp. The error (w - (q - z) s) / U[j, j] may
differ from torch's in the last bit where the compiler fuses a multiply-add, so a code can differ in a
near-tie; the tests bound that.
"""
import torch
import triton
import triton.language as tl

_ROUND = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + _ROUND - _ROUND rounds fp32 x half to even


@triton.jit
def _round_block_kernel(
    w_ptr,  # [N, width] fp32 view: the block's columns
    u_ptr,  # [width, width] fp32 view: U's block, upper triangular
    scale_ptr, zero_ptr,  # [N, ng] fp32 each
    groups_ptr,  # [width] int32: each column's group
    codes_ptr, errs_ptr,  # [N, width] fp32 each (outputs)
    n_rows, width,
    stride_w, stride_u, stride_s, stride_z, stride_c, stride_e,
    MAXQ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < width
    w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_C]
    for j in range(0, width):
        w_j = tl.sum(tl.where(cols[None, :] == j, w, 0.0), axis=1)  # [BLOCK_R]: column j, with the earlier errors applied
        g = tl.load(groups_ptr + j)
        s = tl.load(scale_ptr + rows * stride_s + g, mask=row_ok, other=1.0)
        z = tl.load(zero_ptr + rows * stride_z + g, mask=row_ok, other=0.0)
        q = tl.math.div_rn(w_j, s)
        q = (q + _ROUND) - _ROUND
        q = tl.minimum(tl.maximum(q + z, 0.0), MAXQ)
        err = tl.math.div_rn(w_j - (q - z) * s, tl.load(u_ptr + j * stride_u + j))  # [BLOCK_R]
        u_row = tl.load(u_ptr + j * stride_u + cols, mask=col_ok, other=0.0)  # [BLOCK_C]: zero left of j
        w = w - err[:, None] * u_row[None, :]
        tl.store(codes_ptr + rows * stride_c + j, q, mask=row_ok)
        tl.store(errs_ptr + rows * stride_e + j, err, mask=row_ok)


def round_block(w_block, u_block, scale, zero, groups, bits: int):
    """w_block: [N, width] fp32 (width <= 128), u_block: [width, width] fp32, scale/zero: [N, ng] fp32,
    groups: [width] int32 -> (codes [N, width] fp32, errs [N, width] fp32). Rows of every 2-D argument
    must be contiguous (views of row-major tensors are fine)."""
    n, width = w_block.shape
    if any(t.stride(1) != 1 for t in (w_block, u_block, scale, zero)):
        raise ValueError("round_block: every 2-D argument needs contiguous rows (stride 1 along its last dim)")
    codes = torch.empty(n, width, device=w_block.device, dtype=torch.float32)
    errs = torch.empty(n, width, device=w_block.device, dtype=torch.float32)
    block_r = 16 if triton.knobs.runtime.interpret else 32
    _round_block_kernel[(triton.cdiv(n, block_r),)](
        w_block, u_block, scale, zero, groups, codes, errs, n, width,
        w_block.stride(0), u_block.stride(0), scale.stride(0), zero.stride(0), codes.stride(0), errs.stride(0),
        MAXQ=float(2**bits - 1), BLOCK_R=block_r, BLOCK_C=max(16, triton.next_power_of_2(width)), num_warps=4,
    )
    return codes, errs
