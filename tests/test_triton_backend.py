"""backend="triton" gives the logits of backend="torch" for every family.

On CPU the kernels run under the Triton interpreter at tiny sizes in fp32 (the interpreter computes
bf16 wrongly); the `gpu` tests run bf16 models on the H200, of a realistic width and of each family's
published width (Llama-3-8B, Mistral-7B, Qwen2-7B, Gemma-7B, Phi-3-mini, GPT-2 XL, OPT-6.7B, Pythia-6.9B).
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmopt
from llmopt.passes import FuseAttention
from llmopt.testing import FAMILIES, build_model, config_strategy


@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
@pytest.mark.parametrize("family", FAMILIES)
def test_triton_backend_matches_torch(family, data):
    config = data.draw(config_strategy(family))
    program = llmopt.capture(build_model(config))  # captured once (seconds on CPU), compiled for both backends
    ids = torch.randint(0, config.vocab_size, (2, 7))
    reference = llmopt.compile(program.copy(), passes=[FuseAttention()], backend="torch")
    lowered = llmopt.compile(program, passes=[FuseAttention()], backend="triton")
    assert lowered.backend == "triton"
    # fp32 everywhere; kernels reorder sums (online softmax), so agreement is to fp32 rounding
    torch.testing.assert_close(lowered(ids), reference(ids), rtol=1e-4, atol=1e-4)
    # explicit positions take the masked path
    pos = torch.arange(7).expand(2, 7)
    torch.testing.assert_close(lowered(ids, pos), reference(ids, pos), rtol=1e-4, atol=1e-4)


def test_explicit_positions_run_the_attention_kernel_with_the_mask(monkeypatch):
    """Shifted positions keep the model's mask in the lowered graph; the Triton kernel reads it (no fp32 fallback)."""
    from llmopt.codegen import kernels

    masks = []
    flash = kernels.flash_attention
    monkeypatch.setattr(kernels, "flash_attention", lambda q, k, v, scale, causal, mask=None: masks.append(mask) or flash(q, k, v, scale, causal, mask))
    program = llmopt.capture(build_model(tiny_config("llama")))  # captured once, compiled for both backends
    reference = llmopt.compile(program.copy(), passes=[FuseAttention()], backend="torch")
    lowered = llmopt.compile(program, passes=[FuseAttention()], backend="triton")
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(9).expand(2, 9) + torch.tensor([[0], [5]])  # the second row continues at position 5
    torch.testing.assert_close(lowered(ids, pos), reference(ids, pos), rtol=1e-4, atol=1e-4)
    assert masks and all(m is not None and m.dtype == torch.bool for m in masks)


def test_w4_groups_the_kernels_do_not_take_stay_on_the_reference_op():
    """RTN with groups of 16 (the Triton W4 kernels take powers of two >= 32): lowering keeps those linears on
    `llmopt.linear_wq`'s reference, so the model still runs and gives the torch backend's logits."""
    from llmopt.passes import RTN

    reference = llmopt.compile(build_model(tiny_config("llama")), passes=[RTN(bits=4, group_size=16), FuseAttention()],
                               backend="torch")
    lowered = llmopt.compile(reference.program, backend="triton")
    kept = [n for n in lowered._runner.causal_gm.graph.nodes if n.target == torch.ops.llmopt.linear_wq.default]
    assert len(kept) == 4 * 2  # qkv, o, gate_up, down in each of 2 layers, merged
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(lowered(ids), reference(ids), rtol=1e-4, atol=1e-4)


def tiny_config(family: str):
    """A fixed tiny config: Llama (RMSNorm, q/k/v and gate/up sharing inputs, GQA) or GPT-2 (LayerNorm, fused qkv)."""
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              vocab_size=96, max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    return tf.GPT2Config(vocab_size=96, n_embd=32, n_inner=64, n_layer=2, n_head=2, n_positions=128, bos_token_id=0, eos_token_id=1)


@pytest.mark.parametrize("activations", ["per_token", "per_tensor_static"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_smoothquant_triton_matches_torch(family, activations):
    """W8A8 lowered (each input quantized once, in the generated kernel of its norm / activation) gives the
    reference ops' logits. The quantization is bit-identical; what differs is the fp32 rounding of the
    values it quantizes (a few ulps), which can move a value across a rounding boundary: one int8 step
    (1/127 of its row's max) in one element, ~1e-3 of one linear's output. Seen: 2e-7."""
    from llmopt.passes import SmoothQuant

    model = build_model(tiny_config(family))
    calibration = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = llmopt.compile(model, passes=[SmoothQuant(alpha=0.5, activations=activations), FuseAttention()],
                               calibration=calibration, backend="torch")
    lowered = llmopt.compile(reference.program, backend="triton")
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    want = reference(ids)
    for got in (lowered(ids), lowered(ids, torch.arange(7).expand(2, 7))):
        rel = (got - want).norm() / want.norm()
        assert torch.isfinite(got).all() and rel < 1e-3, f"{family} {activations}: relative error {rel:.3g}"


def wide_config(family: str):
    """A bf16-sized config of the family: hidden 512, 8 heads of 64, 2 layers, vocab 1024."""
    import transformers as tf

    common = dict(vocab_size=1024, num_hidden_layers=2, max_position_embeddings=1024)
    llama_like = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=4, **common)
    return {
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "mistral": lambda: tf.MistralConfig(**llama_like, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**llama_like),
        "gemma": lambda: tf.GemmaConfig(**llama_like, head_dim=64),
        "phi3": lambda: tf.Phi3Config(**llama_like, pad_token_id=0),
        "gpt2": lambda: tf.GPT2Config(vocab_size=1024, n_embd=512, n_layer=2, n_head=8, n_positions=1024),
        "opt": lambda: tf.OPTConfig(vocab_size=1024, hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
                                    ffn_dim=1408, max_position_embeddings=1024, word_embed_proj_dim=512),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=1024, hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
                                             intermediate_size=1408, max_position_embeddings=1024),
    }[family]()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the H200 machine)")
@pytest.mark.parametrize("family", FAMILIES)
def test_triton_backend_bf16_on_gpu(family):
    model = build_model(wide_config(family), dtype=torch.bfloat16).cuda()
    ids = torch.randint(0, 1024, (2, 300), device="cuda")
    reference = llmopt.compile(model, passes=[FuseAttention()], backend="torch")
    lowered = llmopt.compile(model, passes=[FuseAttention()], backend="triton")
    got, want = lowered(ids).float(), reference(ids).float()
    # bf16 activations (8 bits of mantissa) through two layers: relative error ~1e-2
    rel = (got - want).norm() / want.norm()
    assert torch.isfinite(got).all() and rel < 2e-2, f"{family}: relative error {rel:.3g}"


def published_config(family: str):
    """The published width of one checkpoint of the family (hidden, MLP, heads, KV heads, head dim, vocab),
    2 layers deep: every kernel sees the shapes of the full model, whose other layers repeat them."""
    import transformers as tf

    two = dict(num_hidden_layers=2)
    return {
        "llama": lambda: tf.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,  # Llama-3-8B
                                        num_key_value_heads=8, vocab_size=128256, **two),
        "mistral": lambda: tf.MistralConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,  # Mistral-7B-v0.3
                                            num_key_value_heads=8, vocab_size=32768, sliding_window=None, **two),
        "qwen2": lambda: tf.Qwen2Config(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,  # Qwen2-7B
                                        num_key_value_heads=4, vocab_size=152064, **two),
        "gemma": lambda: tf.GemmaConfig(hidden_size=3072, intermediate_size=24576, num_attention_heads=16,  # Gemma-7B: head dim 256
                                        num_key_value_heads=16, head_dim=256, vocab_size=256000, **two),
        "phi3": lambda: tf.Phi3Config(hidden_size=3072, intermediate_size=8192, num_attention_heads=32,  # Phi-3-mini: head dim 96
                                      num_key_value_heads=32, vocab_size=32064, pad_token_id=0, **two),
        "gpt2": lambda: tf.GPT2Config(n_embd=1600, n_head=25, n_layer=2, vocab_size=50257),  # GPT-2 XL: hidden 1600
        "opt": lambda: tf.OPTConfig(hidden_size=4096, ffn_dim=16384, num_attention_heads=32, vocab_size=50272,  # OPT-6.7B
                                    word_embed_proj_dim=4096, **two),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=4096, intermediate_size=16384, num_attention_heads=32,  # Pythia-6.9B
                                             vocab_size=50432, rotary_pct=0.25, **two),
    }[family]()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the H200 machine)")
@pytest.mark.parametrize("family", FAMILIES)
def test_triton_backend_bf16_at_published_width_on_gpu(family, monkeypatch):
    from llmopt.codegen import kernels

    flash_calls = []
    flash = kernels.flash_attention
    monkeypatch.setattr(kernels, "flash_attention", lambda *a, **kw: flash_calls.append(1) or flash(*a, **kw))
    config = published_config(family)
    model = build_model(config, dtype=torch.bfloat16).cuda()
    ids = torch.randint(0, config.vocab_size, (2, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    reference = llmopt.compile(model, passes=[FuseAttention()], backend="torch")
    lowered = llmopt.compile(model, passes=[FuseAttention()], backend="triton")
    got, want = lowered(ids).float(), reference(ids).float()  # [2, 512, vocab]
    rel = (got - want).norm() / want.norm()
    assert torch.isfinite(got).all() and rel < 2e-2, f"{family}: relative error {rel:.3g}"
    assert len(flash_calls) >= config.num_hidden_layers  # the Triton kernel ran (head dims 96 and 256 too), not a fallback


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the H200 machine)")
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_models_at_published_width_on_gpu(family):
    """SmoothQuant W8A8 and RTN w4 at each family's published width, lowered (int8 GEMMs with the
    quantization fused into the norms; the W4A16 kernel for a 4-row batch, dequantize + cuBLAS for 300
    tokens): as close to the float model as the reference ops are. Not closer to the reference than
    that: in bf16 the lowered float model already differs from the reference by ~1e-2 (attention and norms
    round differently), which moves some values across int8 rounding boundaries, and those flips are as
    large as the quantization's own error (measured on Llama-3-8B's width, 300 tokens: reference 6.8% from
    the float logits, lowered 6.8%, lowered vs reference 5.4%)."""
    from llmopt.passes import RTN, SmoothQuant

    config = published_config(family)
    model = build_model(config, dtype=torch.bfloat16).cuda()
    widths = {getattr(config, name, None) for name in ("hidden_size", "n_embd", "intermediate_size", "ffn_dim", "n_inner")}
    group = 128 if all(w is None or w % 128 == 0 for w in widths) else 64  # GPT-2 XL's 1600 = 25 groups of 64
    gen = torch.Generator("cuda").manual_seed(0)
    calibration = torch.randint(0, config.vocab_size, (4, 128), device="cuda", generator=gen)
    batches = [torch.randint(0, config.vocab_size, shape, device="cuda", generator=gen) for shape in ((1, 300), (4, 1))]
    exact = llmopt.compile(model, passes=[FuseAttention()], backend="torch")
    floats = [exact(ids).float() for ids in batches]  # [B, T, vocab] each
    for passes in ([SmoothQuant(alpha=0.5)], [RTN(bits=4, group_size=group)]):
        reference = llmopt.compile(model, passes=passes + [FuseAttention()], calibration=calibration, backend="torch")
        lowered = llmopt.compile(reference.program, backend="triton")
        for ids, want in zip(batches, floats):
            ref, got = reference(ids).float(), lowered(ids).float()
            err_ref, err_got = ((x - want).norm() / want.norm() for x in (ref, got))
            case = f"{family} {passes[0].name} {tuple(ids.shape)}"
            assert torch.isfinite(got).all() and err_got < 1.1 * err_ref + 2e-3, f"{case}: {err_got:.3g} from float, reference {err_ref:.3g}"
            assert (got - ref).norm() / ref.norm() < max(err_ref, 2e-2), case
