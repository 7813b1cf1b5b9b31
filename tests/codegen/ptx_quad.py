"""A lockstep interpreter for the few PTX instructions in llmopt's inline assembly, over the 4 lanes of a lane quad.

Entry points: `run_on_quad(asm, inputs) -> outputs`: asm is an `inline_asm_elementwise` string ($0.. outputs first,
then inputs, as Triton numbers them), inputs[lane] the 32-bit input operands of lanes 0-3; returns each lane's
output operands. Lanes 0-3 stand for any quad: the only lane-dependent input the assembly reads is `%laneid`, through
its low two bits, and its shuffles (`shfl.sync.bfly` with lane masks 1 and 2) stay inside the quad. Lets the CPU
suite check what the GPU kernels' register shuffles compute, bit for bit, without a GPU. `run_on_words(asm, seed)`
runs a one-input assembly string on 1024 random 32-bit words and the edge cases, a quad at a time, yielding (word,
output registers); `as_16_bit(register, dtype)` reads a register as two 16-bit floats.
"""
import random
import re

import torch

MASK = 0xFFFFFFFF


def _prmt(a: int, b: int, selector: int) -> int:
    """prmt.b32 (default mode): byte i of the result is byte (selector nibble i) of the 8 bytes {b, a}."""
    source = a | (b << 32)
    return sum(((source >> (8 * ((selector >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    """lop3.b32: each bit of the result is bit (a b c) of the lookup table."""
    out = 0
    for index in range(8):
        if lut >> index & 1:
            out |= ((a if index & 4 else ~a) & (b if index & 2 else ~b) & (c if index & 1 else ~c)) & MASK
    return out


_OPS = {
    "mov.u32": lambda a: a, "and.b32": lambda a, b: a & b, "shr.b32": lambda a, b: a >> b,
    "setp.ne.u32": lambda a, b: a != b, "selp.b32": lambda a, b, p: a if p else b, "prmt.b32": _prmt,
    "lop3.b32": _lop3,
}


def run_on_quad(asm: str, inputs: list) -> list:
    """inputs: 4 lists (lanes 0-3) of input operand values -> 4 lists of output operand values."""
    n_in = len(inputs[0])
    n_out = max(int(i) for i in re.findall(r"\$(\d+)", asm)) + 1 - n_in
    regs = [{f"${n_out + i}": value & MASK for i, value in enumerate(lane)} for lane in inputs]
    for statement in asm.replace("{", ";").replace("}", ";").split(";"):
        statement = statement.strip()
        if not statement or statement.startswith(".reg"):
            continue
        op, args = statement.split(None, 1)
        dest, *srcs = (a.strip() for a in args.split(","))

        def value(lane: int, operand: str):
            if operand in regs[lane]:
                return regs[lane][operand]
            return lane if operand == "%laneid" else int(operand, 0) & MASK

        if op == "shfl.sync.bfly.b32":  # d, a, lane mask, clamp, member mask: every lane reads lane ^ mask
            sent = [value(lane, srcs[0]) for lane in range(4)]
            for lane in range(4):
                regs[lane][dest] = sent[lane ^ value(lane, srcs[1])]
        else:
            for lane in range(4):
                regs[lane][dest] = _OPS[op](*(value(lane, s) for s in srcs))
    return [[regs[lane][f"${i}"] for i in range(n_out)] for lane in range(4)]


def run_on_words(asm: str, seed: int):
    """Yields (word, its lane's output operand values) for 1024 random words, 0, all ones and alternating nibbles."""
    rng = random.Random(seed)
    words = [rng.getrandbits(32) for _ in range(1024)] + [0, MASK, 0x0F0F0F0F, 0xF0F0F0F0]
    for start in range(0, len(words), 4):
        quad = words[start:start + 4]
        yield from zip(quad, run_on_quad(asm, [[w] for w in quad]))


def as_16_bit(register: int, dtype: torch.dtype) -> list:
    """A 32-bit register -> its (low, high) halves as dtype values."""
    return torch.tensor([register - 2**32 if register >= 2**31 else register], dtype=torch.int32).view(dtype).tolist()
