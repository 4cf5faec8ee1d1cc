"""The inference engine: continuous batching over a paged KV cache, on `transformers` models.

`sequence`, `block_manager` and `scheduler` are plain Python over ints and lists (no torch), so the
policy is unit-tested exhaustively without a model; `kv_cache`, `attention/` and `model_runner` own
the tensors; `llm_engine` ties them together as schedule → run → postprocess.
"""
