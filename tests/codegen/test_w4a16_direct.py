"""The register-direct W4A16 decode kernel (codegen/kernels/w4a16_direct.py) and linear_wq's choice of it.

On any machine: the inline assembly that turns loaded words into mma operands computes, bit for bit, what the
kernel's relabelling of k says (run on a lane quad by `ptx_quad.py`); the Gluon source compiles for sm_90 with the
installed Triton into what the design says (16-byte weight loads, mma.sync, no shared memory inside the loop). On
the GPU (`gpu`): every config against the reference on odd shapes, fp16 and bf16, outputs poisoned; a chain of
calls under programmatic dependent launch equals the chain without it; linear_wq takes it exactly where it should;
a kernel that fails its check warns and leaves the Triton kernel in charge.
"""
import random
import warnings

import pytest
import torch

import llmopt.ops  # noqa: F401  (registers torch.ops.llmopt)
from llmopt.ops.linear_wq import dequantize_groups, pack_int4
from tests.codegen.ptx_quad import as_16_bit, run_on_quad, run_on_words
from tests.codegen.sm90_compile import compile_job

HAS_CUDA = torch.cuda.is_available()
needs_hopper = pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() != (9, 0),
                                  reason="the direct kernel runs on sm_90 GPUs")

_COMPILE_FOR_SM90 = """
import json
import re
from llmopt.codegen.kernels import w4a16_direct
from tests.codegen.sm90_compile import compile_gluon_for_sm90

compiled = compile_gluon_for_sm90(
    w4a16_direct._w4_direct_kernel,
    {"x_ptr": "*bf16", "qw_ptr": "*u8", "s_ptr": "*bf16", "z_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16"},
    {"GROUP_SIZE": 128, "KW": 8, "ROW_TILES": 1, "HAS_BIAS": False, "PDL": True, "LATE_X": False, "XM": 8},
    ("x_ptr", "qw_ptr", "s_ptr", "z_ptr", "stride_xm", "stride_qn"), num_warps=8)
ptx = compiled.asm["ptx"]
kw, row_tiles, late_x = w4a16_direct.WIDE_CONFIGS[0]
wide = compile_gluon_for_sm90(
    w4a16_direct._w4_direct_kernel,
    {"x_ptr": "*bf16", "qw_ptr": "*u8", "s_ptr": "*bf16", "z_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16"},
    {"GROUP_SIZE": 128, "KW": kw, "ROW_TILES": row_tiles, "HAS_BIAS": False, "PDL": True, "LATE_X": late_x,
     "XM": 16}, ("x_ptr", "qw_ptr", "s_ptr", "z_ptr", "stride_xm", "stride_qn"), num_warps=kw)
order = re.findall(r"griddepcontrol[.][a-z_]+|ld[.]global[.a-z0-9]*|st[.]global", ptx)
print(json.dumps({"mma": ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"), "order": order[:15],
                  "mma_wide": wide.asm["ptx"].count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"),
                  "row_tiles_wide": row_tiles,
                  "loads": re.findall(r"ld[.]global[.a-z0-9]*", ptx), "cp_async": ptx.count("cp.async"),
                  "barriers": ptx.count("bar.sync"), "shared": compiled.metadata.shared}))
"""

BACKGROUND = {
    "test_direct_kernel_compiles_for_hopper_into_register_loads_and_mma":
        compile_job(_COMPILE_FOR_SM90),
}


@pytest.mark.parametrize("dtype,magic", [(torch.bfloat16, 128), (torch.float16, 1024)])
def test_weight_asm_makes_register_p_the_pair_of_nibbles_p_and_p_plus_4(dtype, magic):
    """A loaded weight word (8 nibbles, physical k 8j .. 8j + 7) -> 4 registers p = (MAGIC + nibble p,
    MAGIC + nibble p + 4) as 16-bit floats: the pairs the module docstring labels logical k."""
    from llmopt.codegen.kernels import w4a16_direct

    asm = (w4a16_direct._W_ASM_BF16 if dtype == torch.bfloat16 else w4a16_direct._W_ASM_FP16).value
    for word, registers in run_on_words(asm, seed=0):
        for p in range(4):
            expected = [magic + (word >> (4 * p) & 0xF), magic + (word >> (4 * p + 16) & 0xF)]
            assert as_16_bit(registers[p], dtype) == expected, (hex(word), p)


def test_x_asm_pairs_the_halves_of_two_x_words():
    """Two x words a (e = 0) and b (e = 1) of two values each -> (a.lo, b.lo) and (a.hi, b.hi): x in the weights'
    logical order of k."""
    from llmopt.codegen.kernels import w4a16_direct

    rng = random.Random(1)
    for _ in range(256):
        pairs = [[rng.getrandbits(32), rng.getrandbits(32)] for lane in range(4)]
        out = run_on_quad(w4a16_direct._X_ASM.value, pairs)
        for (a, b), (lo, hi) in zip(pairs, out):
            assert lo == (a & 0xFFFF) | (b & 0xFFFF) << 16 and hi == a >> 16 | (b >> 16) << 16


def test_direct_kernel_compiles_for_hopper_into_register_loads_and_mma():
    """Compiled for sm_90 (in a child process: this suite runs Triton's interpreter, which does not compile), with
    one x tile (M <= 8) and two (M = 9-16). The `assert_trivial` conversions of both mma operands are part of the
    source, so compiling at all means the nibble and x relabelling cost no data movement."""
    import json

    done = BACKGROUND["test_direct_kernel_compiles_for_hopper_into_register_loads_and_mma"].result()
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the loop's two blocks and the odd last block after it: 8 k-steps each, for Σ (MAGIC + q) x and for Σ x
    assert result["mma"] == 3 * 16
    # M = 9-16: the same for each 16-row tile and each of the two x tiles of 8 rows
    assert result["mma_wide"] == 3 * 16 * result["row_tiles_wide"] * 2
    # a block's operands: 16-byte loads, two of weights (rows g and g + 8) and four of x, and one 2-byte load each of
    # the zero point and the scale of each row; four block loads (two before the loop, two in it)
    loads = result["loads"]
    assert loads.count("ld.global.v4.b32") == 4 * 6 and loads.count("ld.global.b16") == 4 * 4, loads
    assert len(loads) == 4 * 10
    assert result["cp_async"] == 0  # no shared-memory staging of the weights...
    assert result["barriers"] <= 3 and result["shared"] <= 8192  # ...only the warps' final sum meets there
    # programmatic dependent launch (pdl.py): the next kernel may start; the first two blocks' weights (two 16-byte
    # loads each) and zero points and scales (four 2-byte loads each) are asked for before the wait, x after it
    order = result["order"]
    assert order[0] == "griddepcontrol.launch_dependents" and order.count("griddepcontrol.wait") == 1, order
    early = order[1:order.index("griddepcontrol.wait")]
    assert sorted(early) == sorted(2 * (["ld.global.v4.b32"] * 2 + ["ld.global.b16"] * 4)), early
    assert order[order.index("griddepcontrol.wait") + 1] == "ld.global.v4.b32"  # x, only after the wait


def _inputs(m, n, k, g, dtype, with_bias, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qweight = pack_int4(torch.randint(0, 16, (n, k), device="cuda", generator=gen))  # [N, K // 2]
    scales = (torch.rand(n, k // g, device="cuda", generator=gen) * 0.02 + 0.005).to(dtype)  # [N, K // G]
    zeros = torch.randint(0, 16, (n, k // g), device="cuda", generator=gen).to(dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)  # [M, K]
    bias = torch.randn(n, device="cuda", dtype=dtype, generator=gen) if with_bias else None
    return x, qweight, scales, zeros, bias


def _reference(x, qweight, scales, zeros, bias, g):
    """fp32 product of the reference's dequantized weight: what the kernel computes up to fp32 rounding."""
    w = dequantize_groups(qweight, scales, zeros, g, 4).float()  # [N, K]
    return x.float() @ w.t() + (bias.float() if bias is not None else 0.0)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("m,n,k,g,dtype,with_bias", [
    (1, 4096 + 96, 4096, 128, torch.bfloat16, True), (3, 100, 384, 128, torch.float16, False),
    (8, 4100, 11008, 128, torch.bfloat16, False), (5, 77, 1024, 256, torch.bfloat16, True),
    (2, 33, 128, 128, torch.float16, True), (7, 11008, 4096, 512, torch.float16, False),
    (16, 4096 + 96, 4096, 128, torch.bfloat16, True), (12, 100, 384, 128, torch.float16, False),
    (9, 4100, 11008, 128, torch.bfloat16, False), (13, 77, 1024, 256, torch.float16, True),
])
def test_direct_kernel_matches_reference_in_every_config(poison, m, n, k, g, dtype, with_bias):
    """Every config first-use tuning may pick for m rows (one x tile up to 8, two from 9 to 16)."""
    from llmopt.codegen.kernels.w4a16_direct import configs_for, linear_w4_direct

    x, qweight, scales, zeros, bias = _inputs(m, n, k, g, dtype, with_bias, seed=m + n)
    ref = _reference(x, qweight, scales, zeros, bias, g)
    for config in configs_for(m):
        y = linear_w4_direct(x, qweight, scales, zeros, bias, g, config)
        assert y.shape == (m, n) and y.dtype == dtype
        err = ((y.float() - ref).norm() / ref.norm()).item()
        assert err < (4e-3 if dtype == torch.bfloat16 else 1e-3), (config, err)  # the output's rounding
        assert torch.equal(y, linear_w4_direct(x, qweight, scales, zeros, bias, g, config))  # deterministic


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("m", [1, 8, 16])
def test_direct_kernel_chain_under_pdl_matches_the_chain_without(m):
    """Six calls, each taking the last one's output as x (4096 x 4096 weights), eager and replayed from a CUDA graph:
    with programmatic dependent launch, bit for bit the chain without it. A call reading x before the previous one
    had written it would differ."""
    from llmopt.codegen.kernels.w4a16_direct import configs_for, linear_w4_direct

    k = 4096
    layers = [_inputs(1, k, k, 128, torch.bfloat16, False, seed=i)[1:4] for i in range(6)]
    x0 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

    def chain(config, launch_pdl):
        h = x0
        for qweight, scales, zeros in layers:
            h = linear_w4_direct(h, qweight, scales, zeros, None, 128, config, launch_pdl=launch_pdl)
        return h

    for config in configs_for(m):
        expected = chain(config, False)
        assert torch.equal(chain(config, True), expected), config
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(config, True)
        for _ in range(3):
            out.fill_(float("nan"))
            graph.replay()
            assert torch.equal(out, expected), config


def assert_linear_wq_routes(monkeypatch, module, entry: str, cases: list):
    """cases: (M, G, bits, whether linear_wq should call module.entry); every answer matches the reference op."""
    from llmopt.codegen.kernels import w4a16_gemm

    calls = []
    kernel = getattr(module, entry)
    monkeypatch.setattr(module, entry, lambda *a, **kw: calls.append(a[0].shape) or kernel(*a, **kw))
    n, k = 520, 1024
    for m, g, bits, expected in cases:
        calls.clear()
        x, qweight, scales, zeros, bias = _inputs(m, n, k, g, torch.bfloat16, True, seed=m)
        if bits == 8:
            qweight = torch.randint(0, 256, (n, k), dtype=torch.uint8, device="cuda")
        x3 = x.reshape(1, m, k)  # leading dims are kept
        y = w4a16_gemm.linear_wq(x3, qweight, scales, zeros, bias, g, bits)
        assert y.shape == (1, m, n)
        assert bool(calls) == expected, (m, g, bits)
        ref = torch.ops.llmopt.linear_wq(x, qweight, scales, zeros, bias, g, bits)
        assert ((y[0].float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def forget_kept_choices(monkeypatch, tmp_path, module):
    """module's first-use choices start empty, in this process and on disk (kept under tmp_path for the test), so a
    test's forced picks neither come from nor reach the real cache."""
    from llmopt.codegen.kernels import choice_cache

    monkeypatch.setattr(choice_cache, "directory", lambda: tmp_path)
    monkeypatch.setattr(module, "_tuned", choices_of_a_new_process(module))


def choices_of_a_new_process(module):
    """A `ChoiceCache` like module's, with nothing in memory, as a new process has."""
    from llmopt.codegen.kernels.choice_cache import ChoiceCache

    return ChoiceCache(module._tuned.kernel, [module.__file__], module._tuned.choices)


def assert_failing_kernel_warns_once(monkeypatch, module, entry: str, m: int, match: str):
    """module.entry raising as a Triton that cannot compile it would: linear_wq warns (match), once, and answers."""
    from llmopt.codegen.kernels import w4a16_gemm

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(module, "_checked", {})
    monkeypatch.setattr(module, entry, broken)
    x, qweight, scales, zeros, bias = _inputs(m, 256, 512, 128, torch.bfloat16, False)
    with pytest.warns(RuntimeWarning, match=match):
        y = w4a16_gemm.linear_wq(x, qweight, scales, zeros, bias, 128, 4)
    ref = torch.ops.llmopt.linear_wq(x, qweight, scales, zeros, bias, 128, 4)
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked once: no second warning
        w4a16_gemm.linear_wq(x, qweight, scales, zeros, bias, 128, 4)


@pytest.mark.gpu
@needs_hopper
def test_linear_wq_takes_the_direct_kernel_for_decode_rows_only(monkeypatch):
    from llmopt.codegen.kernels import w4a16_direct

    assert_linear_wq_routes(monkeypatch, w4a16_direct, "linear_w4_direct",
                            [(1, 128, 4, True), (8, 256, 3, True), (17, 128, 4, False), (4, 64, 4, False),
                             (4, 128, 8, False)])


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("triton_fastest", [False, True])
def test_linear_wq_runs_what_first_use_tuning_picked_at_9_to_16_rows(monkeypatch, tmp_path, triton_fastest):
    """M = 9-16: first-use tuning times the direct kernel's wide configs beside the Triton kernel; linear_wq then
    runs the direct kernel exactly when a config of it was the fastest (forced here both ways), and answers right."""
    from llmopt.codegen.kernels import w4a16_direct, w4a16_gemm

    timed = []

    def pick(linear, configs, *shape):
        timed.append(list(configs))
        return None if triton_fastest else configs[0]

    x, qweight, scales, zeros, bias = _inputs(12, 520, 1024, 128, torch.bfloat16, True, seed=12)
    checked = {(x.device.index, x.dtype): True}  # no first-use checks here
    monkeypatch.setattr(w4a16_direct, "_checked", checked)
    monkeypatch.setattr(w4a16_direct, "_wide_checked", dict(checked))
    forget_kept_choices(monkeypatch, tmp_path, w4a16_direct)
    monkeypatch.setattr(w4a16_direct, "fastest_streaming", pick)
    calls = []
    kernel = w4a16_direct.linear_w4_direct
    monkeypatch.setattr(w4a16_direct, "linear_w4_direct",
                        lambda *a, **kw: calls.append(a[0].shape) or kernel(*a, **kw))
    y = w4a16_gemm.linear_wq(x, qweight, scales, zeros, bias, 128, 4)
    assert timed == [w4a16_direct.WIDE_CONFIGS + [None]]  # the Triton kernel is a candidate
    assert bool(calls) != triton_fastest
    ref = torch.ops.llmopt.linear_wq(x, qweight, scales, zeros, bias, 128, 4)
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


@pytest.mark.gpu
@needs_hopper
def test_a_new_process_reuses_the_first_use_choice_kept_on_disk(monkeypatch, tmp_path):
    """The first call per shape times the configs and keeps the fastest on disk; a new process (its own memory, the
    same disk) takes it without timing again, even inside a CUDA-graph capture, where no timing can run."""
    from llmopt.codegen.kernels import w4a16_direct

    timed = []
    x, qweight, scales, zeros, _ = _inputs(1, 520, 1024, 128, torch.bfloat16, False, seed=3)
    monkeypatch.setattr(w4a16_direct, "_checked", {(x.device.index, x.dtype): True})  # no first-use check here
    monkeypatch.setattr(w4a16_direct, "fastest_streaming",
                        lambda linear, configs, *shape: timed.append(shape) or configs[-1])
    forget_kept_choices(monkeypatch, tmp_path, w4a16_direct)
    assert w4a16_direct.choose(x, qweight, 128, 4) == w4a16_direct.CONFIGS[-1]
    assert len(timed) == 1 and len(list(tmp_path.glob("w4a16_direct-*.autotune.json"))) == 1
    monkeypatch.setattr(w4a16_direct, "_tuned", choices_of_a_new_process(w4a16_direct))
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        chosen = w4a16_direct.choose(x, qweight, 128, 4)
        x.add_(0)  # a graph with a kernel in it (an empty one warns)
    assert chosen == w4a16_direct.CONFIGS[-1] and len(timed) == 1


@pytest.mark.gpu
@needs_hopper
def test_a_failing_direct_kernel_warns_and_the_triton_kernel_runs(monkeypatch):
    from llmopt.codegen.kernels import w4a16_direct

    assert_failing_kernel_warns_once(monkeypatch, w4a16_direct, "linear_w4_direct", 1,
                                     "direct W4A16 kernel failed .*PassManager::run failed; using the Triton")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("broken_tiles", [1, 2])
def test_a_failing_x_tile_count_warns_and_leaves_the_other_to_the_direct_kernel(monkeypatch, tmp_path, broken_tiles):
    """One x tile (M <= 8) or two (M = 9-16) failing their first-use check (as on a Triton that cannot compile them):
    linear_wq warns once, answers those rows with the Triton kernel, and the other rows still take the direct kernel,
    whichever comes first."""
    from llmopt.codegen.kernels import w4a16_direct, w4a16_gemm

    kernel = w4a16_direct.linear_w4_direct
    calls = []

    def half_broken(x, *args, **kwargs):
        if (x.shape[0] > w4a16_direct.X_TILE) == (broken_tiles == 2):
            raise RuntimeError("PassManager::run failed")
        calls.append(x.shape)
        return kernel(x, *args, **kwargs)

    monkeypatch.setattr(w4a16_direct, "_checked", {})
    monkeypatch.setattr(w4a16_direct, "_wide_checked", {})
    forget_kept_choices(monkeypatch, tmp_path, w4a16_direct)
    monkeypatch.setattr(w4a16_direct, "linear_w4_direct", half_broken)
    monkeypatch.setattr(w4a16_direct, "fastest_streaming", lambda linear, configs, *shape: configs[0])
    broken_m, working_m = (12, 1) if broken_tiles == 2 else (1, 12)
    label = "9-16 rows.* failed" if broken_tiles == 2 else "direct W4A16 kernel failed"
    for m in (broken_m, working_m):
        x, qweight, scales, zeros, bias = _inputs(m, 256, 512, 128, torch.bfloat16, True, seed=m)
        ref = torch.ops.llmopt.linear_wq(x, qweight, scales, zeros, bias, 128, 4)
        if m == broken_m:
            with pytest.warns(RuntimeWarning, match=label + " .*PassManager::run failed; using the Triton"):
                y = w4a16_gemm.linear_wq(x, qweight, scales, zeros, bias, 128, 4)
            assert not calls
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the other tile count's own check passes: no warning
                y = w4a16_gemm.linear_wq(x, qweight, scales, zeros, bias, 128, 4)
            assert calls[-1] == (working_m, 512)  # after its own check, the call itself took the direct kernel
        assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
