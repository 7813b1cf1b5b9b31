"""Helpers the generated launchers call at run time (no Triton here: plain tensor views).

Entry points: `row_view(x, lead)`, `col_view(x)`, `launch_config(rows, block)`.
"""
import triton

TILE_ELEMENTS = 4096  # elements a program computes: ROWS * BLOCK


def row_view(x, lead):
    """x broadcast to `[*lead, W]` (stride 0 along the dims it broadcasts over), its last dim contiguous."""
    if x.dim() == 0:
        x = x.reshape(1)
    if x.shape[-1] != 1 and x.stride(-1) != 1:
        x = x.contiguous()
    return x.expand(*lead, x.shape[-1])


def col_view(x):
    """An input without rows (a `[K]` weight, a `[1, 1, K]` or 0-d value): its W elements, contiguous."""
    return x.reshape(-1).contiguous()


def launch_config(rows: int, block: int):
    """(ROWS, num_warps): a power-of-two count of rows so that a program holds about 4096 elements."""
    rows_per_program = max(1, min(triton.next_power_of_2(rows), TILE_ELEMENTS // block))
    elements = rows_per_program * block
    return rows_per_program, 4 if elements <= 2048 else 8 if elements <= 8192 else 16
