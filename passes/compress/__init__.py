"""Tensor-level algorithms of llmopt's compression passes, independent of any graph.

Every function takes plain tensors (weights `[N, K]` as in nn.Linear, calibration inputs
`[n_tokens, K]` or per-channel statistics) and returns tensors or small result types; the graph
passes in `llmopt.passes` find the linears, gather calibration data and call these.

- `rtn`: `quantize_groups` -> `QuantizedWeight` (the `linear_wq` layout), `fake_quantize_groups`
- `awq`: `search_awq_scales` -> `AwqScales(scales, alpha, duo, errors, candidates)`, `search_awq_clip` -> clip ratios
- `gptq`: `gptq_quantize` -> `QuantizedWeight` (quantize_groups' layout and ranges, GPTQ's error-feedback rounding)
- `w8a8`: `quantize_weight_per_channel`, `smooth_scales`, `search_smooth_alpha`, `static_act_scale`
- `prune`: `magnitude_scores`, `wanda_scores`, `prune_mask`, `is_2_4_sparse`, `to_semi_structured`
- `lora`: `merge_lora`, `requantize_merged`

Example (AWQ for the linears reading one input, then RTN with the searched clip):

    s = search_awq_scales(x, [w_q, w_k, w_v], bits=4, group_size=128).scales
    w_scaled = w_q * s                          # the pass also folds 1/s into the preceding norm
    clip = search_awq_clip(x / s, w_scaled, bits=4, group_size=128)
    qw = quantize_groups(w_scaled, bits=4, group_size=128, clip_ratio=clip)
"""
from llmopt.passes.compress.awq import AwqScales, search_awq_clip, search_awq_scales
from llmopt.passes.compress.gptq import gptq_quantize
from llmopt.passes.compress.lora import merge_lora, requantize_merged
from llmopt.passes.compress.prune import is_2_4_sparse, magnitude_scores, prune_mask, to_semi_structured, wanda_scores
from llmopt.passes.compress.rtn import QuantizedWeight, fake_quantize_groups, quantize_groups
from llmopt.passes.compress.w8a8 import (
    quantize_weight_per_channel,
    search_smooth_alpha,
    smooth_scales,
    static_act_scale,
)

__all__ = [
    "AwqScales",
    "QuantizedWeight",
    "fake_quantize_groups",
    "gptq_quantize",
    "is_2_4_sparse",
    "magnitude_scores",
    "merge_lora",
    "prune_mask",
    "quantize_groups",
    "quantize_weight_per_channel",
    "requantize_merged",
    "search_awq_clip",
    "search_awq_scales",
    "search_smooth_alpha",
    "smooth_scales",
    "static_act_scale",
    "to_semi_structured",
    "wanda_scores",
]
