"""The attention graphs' cache ports, by name: what the exporter writes and what the runtime binds.

Contract: two interfaces (`runtime.attention_call` says how each is called).
- In place (GroupQueryAttention; MHA and GQA): inputs `PAST_KEY`, `PAST_VALUE` [1, KV heads, capacity,
  head dim] aliased to outputs `PRESENT_KEY`, `PRESENT_VALUE`, with `SEQLENS_K` and `TOTAL_LEN`.
- Rows (MLA's latent cache): input `PAST_ROWS` [1, T, width], the cached rows, and output `NEW_ROWS`
  [1, S, width], the rows this call adds.
`CACHE_INPUTS` are the inputs whose element type is the cache's, one per interface.

A leaf module (no imports): export, offload and runtime all name the ports through it, so a graph
and the code that calls it cannot drift apart.
"""

PAST_KEY, PAST_VALUE = "past_key", "past_value"
PRESENT_KEY, PRESENT_VALUE = "present_key", "present_value"
SEQLENS_K, TOTAL_LEN = "seqlens_k", "total_len"
PAST_ROWS, NEW_ROWS = "past_latent", "new_latent"
CACHE_INPUTS = (PAST_KEY, PAST_ROWS)
