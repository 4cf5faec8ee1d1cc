"""The flattened ragged batch the model runner builds from a scheduled step."""

from __future__ import annotations

import torch

from services.inference.engine.block_manager import BlockManager
from services.inference.engine.kv_cache import KVCacheSpec, PagedKVCache
from services.inference.engine.model_runner import ModelRunner
from services.inference.engine.scheduler import Scheduler, SchedulerConfig
from services.inference.engine.sequence import SamplingParams, Sequence


def test_step_batch_lays_out_decodes_and_chunks() -> None:
    bs = 4
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=2, block_size=bs, dtype=torch.float32)
    bm = BlockManager(num_blocks=16, block_size=bs)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=10), bm)
    runner = ModelRunner(model=None, kv_cache=PagedKVCache(spec, 16), device=torch.device("cpu"))

    decoding = Sequence("decoding", [5, 6, 7], SamplingParams(max_new_tokens=4))
    scheduler.add(decoding)
    scheduler.postprocess(scheduler.schedule(), [42])  # prefilled, first token sampled
    chunked = Sequence("chunked", list(range(100, 112)), SamplingParams(max_new_tokens=4))
    scheduler.add(chunked)
    out = scheduler.schedule()
    assert [(c.seq.request_id, c.start, c.num_new_tokens) for c in out.chunks] == [
        ("decoding", 3, 1),
        ("chunked", 0, 9),
    ]
    batch = runner.prepare(out)

    assert batch.input_ids.tolist() == [42, *range(100, 109)]
    assert batch.positions.tolist() == [3, *range(9)]
    meta = batch.attention
    assert meta.cu_seqlens_q.tolist() == [0, 1, 10]
    assert meta.seq_lens.tolist() == [4, 9] and meta.query_lens == [1, 9]
    d_table, c_table = decoding.block_table, chunked.block_table
    assert meta.block_tables.tolist() == [d_table + [0] * (3 - len(d_table)), c_table]
    expected_slots = [d_table[0] * bs + 3] + [c_table[p // bs] * bs + p % bs for p in range(9)]
    assert meta.slot_mapping.tolist() == expected_slots
    # Only the decoding sequence reaches its last token; the chunked prefill samples nothing yet.
    assert batch.logits_indices.tolist() == [0] and batch.sampling_seqs == [decoding]
    assert batch.input_ids.dtype == batch.positions.dtype == meta.slot_mapping.dtype == torch.long

    scheduler.abort("decoding")
    scheduler.abort("chunked")
    assert bm.num_free_blocks == bm.num_blocks
