"""Tiny transformers configs of real architectures, as hypothesis strategies, and models built from them.

Entry points: `config_strategy(family)` and `any_config()` draw a config; `build_model(config, seed)`
gives an eval-mode model with random weights scaled so that every activation is O(1) (norm weights
near their identity, biases nonzero: a wrong scale or a dropped bias shows in the output);
`input_ids_strategy(vocab)` draws a `[B, T]` batch of token ids.

Sizes are tiny (hidden <= 64, 1-2 layers, vocab 32-300) so a forward takes milliseconds. Each choice lists the
representative value first: hypothesis' first example of a strategy (the only one a test with `max_examples=1` ever
runs) and the one a failure shrinks toward is then a config with the features that break code, not the degenerate
one: 4 heads over 2 KV heads, 2 layers, an intermediate size of 3x hidden, a hidden size apart from heads x head dim
where the family names its head dim, Llama-3 RoPE scaling where the family has scalings, partial rotary for Phi-3
(0.75) and GPT-NeoX (0.25, parallel residual). Every config
exports with `torch.export` (strict=False, dynamic batch and token dims) and the exported program
matches the eager model; tests/test_configs.py checks this. Choices left out, and why:
- RoPE "dynamic": recomputes frequencies when max(position_ids) exceeds the cached length, a
  data-dependent branch that torch.export refuses (GuardOnDataDependentSymNode).
- RoPE "longrope" (long-context Phi-3): the exported program is right, but tracing caches a
  FakeTensor as `rotary_emb.long_inv_freq` on the eager module, which then gives wrong logits for
  inputs longer than `original_max_position_embeddings`. Static scalings ("linear", "llama3",
  "yarn") are drawn instead.
- Mistral and Qwen2 sliding windows: a Mistral window shorter than the inputs exports and matches,
  but makes the attention mask banded; kept off (`sliding_window=None`) so every family has plain
  causal attention.
- OPT: `word_embed_proj_dim == hidden_size` and pre-norm layers; the OPT-350m layout (projections
  around the embedding, post-norm) also exports, but is the one checkpoint that differs.
"""
import math

import torch
from hypothesis import strategies as st
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
)

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "opt", "gpt_neox")

MAX_POSITIONS = 128  # learned position tables (GPT-2, OPT) and RoPE caches; inputs stay far below
_NO_DROPOUT = {"attention_dropout": 0.0}
_TOKENS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None}  # no padding row in embeddings


@st.composite
def _shape(draw, gqa: bool, free_head_dim: bool) -> dict:
    """Sizes shared by every family: heads, KV heads, head dim (multiple of 8), hidden, layers, vocab; with
    `free_head_dim` the hidden size is drawn apart from heads x head dim (the config then names its head_dim)."""
    heads = draw(st.sampled_from([4, 2, 1]))
    kv_heads = draw(st.sampled_from([d for d in (2, 1, 4) if heads % d == 0])) if gqa else heads
    head_dim = draw(st.sampled_from([8, 16]))
    hidden = draw(st.sampled_from([48, 16, 32, 64])) if free_head_dim else heads * head_dim
    return {
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "hidden": hidden,
        "intermediate": draw(st.sampled_from([3, 2, 4])) * hidden,
        "layers": draw(st.sampled_from([2, 1])),
        "vocab": draw(st.integers(32, 300)),
        "tie": draw(st.booleans()),
        "free_head_dim": free_head_dim,
    }


def _decoder_sizes(s: dict) -> dict:
    """The Llama-style config arguments for a `_shape` draw; `head_dim` where it was drawn free of hidden (families
    drawn without derive it as hidden // heads)."""
    sizes = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                 num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                 tie_word_embeddings=s["tie"], max_position_embeddings=MAX_POSITIONS)
    if s["free_head_dim"]:
        sizes["head_dim"] = s["head_dim"]
    return sizes


@st.composite
def _rope(draw, scaled: bool) -> dict:
    """A `rope_parameters` dict: theta, and with `scaled` one of the static scalings."""
    theta = draw(st.sampled_from([10_000.0, 500_000.0, 1_000_000.0]))
    kind = draw(st.sampled_from(["llama3", "default", "linear", "yarn"])) if scaled else "default"
    params = {"rope_type": kind, "rope_theta": theta}
    if kind != "default":
        params["factor"] = draw(st.sampled_from([2.0, 4.0, 8.0]))
        params["original_max_position_embeddings"] = int(MAX_POSITIONS // params["factor"])
    if kind == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return params


@st.composite
def _llama(draw) -> LlamaConfig:
    s = draw(_shape(gqa=True, free_head_dim=True))
    return LlamaConfig(
        **_decoder_sizes(s),
        rope_parameters=draw(_rope(scaled=True)), attention_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()), **_NO_DROPOUT, **_TOKENS,
    )


@st.composite
def _mistral(draw) -> MistralConfig:
    s = draw(_shape(gqa=True, free_head_dim=True))
    return MistralConfig(
        **_decoder_sizes(s),
        rope_parameters=draw(_rope(scaled=False)), sliding_window=None, **_NO_DROPOUT, **_TOKENS,
    )


@st.composite
def _qwen2(draw) -> Qwen2Config:
    s = draw(_shape(gqa=True, free_head_dim=False))  # Qwen2 derives head_dim = hidden // heads
    return Qwen2Config(
        **_decoder_sizes(s),
        rope_parameters=draw(_rope(scaled=True)), use_sliding_window=False, **_NO_DROPOUT, **_TOKENS,
    )


@st.composite
def _gemma(draw) -> GemmaConfig:
    s = draw(_shape(gqa=True, free_head_dim=True))
    return GemmaConfig(
        **_decoder_sizes(s),
        rope_parameters=draw(_rope(scaled=False)), attention_bias=draw(st.booleans()),
        **_NO_DROPOUT, **_TOKENS,
    )


@st.composite
def _phi3(draw) -> Phi3Config:
    s = draw(_shape(gqa=True, free_head_dim=False))  # Phi-3 derives head_dim = hidden // heads
    rope = draw(_rope(scaled=False))
    rope["partial_rotary_factor"] = draw(st.sampled_from([0.75, 1.0, 0.5]))  # 0.75: Phi-4-mini
    return Phi3Config(
        **_decoder_sizes(s),
        original_max_position_embeddings=MAX_POSITIONS, rope_parameters=rope,
        resid_pdrop=0.0, embd_pdrop=0.0, **_NO_DROPOUT, **_TOKENS,
    )


@st.composite
def _gpt2(draw) -> GPT2Config:
    s = draw(_shape(gqa=False, free_head_dim=False))
    return GPT2Config(
        vocab_size=s["vocab"], n_embd=s["hidden"], n_inner=s["intermediate"], n_layer=s["layers"],
        n_head=s["heads"], n_positions=MAX_POSITIONS, tie_word_embeddings=s["tie"],
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_TOKENS,
    )


@st.composite
def _opt(draw) -> OPTConfig:
    s = draw(_shape(gqa=False, free_head_dim=False))
    return OPTConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], ffn_dim=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], word_embed_proj_dim=s["hidden"],
        do_layer_norm_before=True, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=s["tie"],
        dropout=0.0, layerdrop=0.0, **_NO_DROPOUT, **_TOKENS,
    )


@st.composite
def _gpt_neox(draw) -> GPTNeoXConfig:
    s = draw(_shape(gqa=False, free_head_dim=False))
    rope = draw(_rope(scaled=False))
    rope["partial_rotary_factor"] = draw(st.sampled_from([0.25, 0.5, 1.0]))  # Pythia uses 0.25
    return GPTNeoXConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], tie_word_embeddings=s["tie"],
        max_position_embeddings=MAX_POSITIONS, rope_parameters=rope,
        use_parallel_residual=draw(st.sampled_from([True, False])), hidden_dropout=0.0, **_NO_DROPOUT, **_TOKENS,
    )


_STRATEGIES = {
    "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "gemma": _gemma,
    "phi3": _phi3, "gpt2": _gpt2, "opt": _opt, "gpt_neox": _gpt_neox,
}


def config_strategy(family: str) -> st.SearchStrategy[PretrainedConfig]:
    """Tiny configs of one family (a name in FAMILIES)."""
    if family not in _STRATEGIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return _STRATEGIES[family]()


def any_config() -> st.SearchStrategy[PretrainedConfig]:
    """Tiny configs of any family."""
    return st.one_of([config_strategy(f) for f in FAMILIES])


def build_model(
    config: PretrainedConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """An eval-mode causal LM for `config` with deterministic random weights of O(1) effect.

    Matrices (linears, embeddings, position tables) get N(0, 1/hidden), so each layer keeps
    activations near unit scale and logits spread over a few units. Vectors (norm weights, biases)
    get N(0, 0.1) noise added to their initial value: norms stay near identity whatever their
    convention (Gemma stores w with the scale 1 + w and initialises w = 0), biases become nonzero.
    """
    generator = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    std = 1.0 / math.sqrt(config.hidden_size)
    with torch.no_grad():
        for param in model.parameters():  # tied weights appear once
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() >= 2:
                param.copy_(noise * std)
            else:
                param.add_(noise * 0.1)
    return model.to(dtype).eval()


@st.composite
def input_ids_strategy(draw, vocab: int, max_batch: int = 2, max_len: int = 16) -> torch.Tensor:
    """Token ids `[B, T]` with 1 <= B <= max_batch and 1 <= T <= max_len."""
    batch = draw(st.integers(1, max_batch))
    length = draw(st.integers(1, max_len))
    ids = draw(st.lists(st.integers(0, vocab - 1), min_size=batch * length, max_size=batch * length))
    return torch.tensor(ids, dtype=torch.long).view(batch, length)
