"""llmopt runtime: execution engine (paged KV cache, batching) — the runtime issue builds it."""
