"""llmopt runtime: executing lowered programs.

Today: `llmopt.runtime.cuda_graphs.GraphCache` (replay repeated shapes from CUDA graphs when that
measures faster). The runtime issue adds the engine: paged KV cache, in-flight batching, sampling.
"""
