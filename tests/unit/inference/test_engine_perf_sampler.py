"""The sampler takes logits in the model's dtype (the runner no longer upcasts every row)."""

from __future__ import annotations

import torch

from services.inference.engine.sampler import sample
from services.inference.engine.sequence import SamplingParams


def test_bfloat16_logits_sample_as_their_float32_upcast() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50).to(torch.bfloat16)
    logits[0, 7] = logits[0, 9] = 10.0  # a tie: both dtypes must pick the first index
    params = [
        SamplingParams(logprobs=True),
        SamplingParams(),
        SamplingParams(temperature=0.8, top_k=5, seed=1),
        SamplingParams(temperature=1.2, top_p=0.9, seed=2),
    ]

    def generators() -> list[torch.Generator | None]:
        return [None, None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]

    low = sample(logits, params, generators())
    full = sample(logits.float(), params, generators())
    assert low.token_ids == full.token_ids
    assert low.token_ids[0] == 7
    assert low.logprobs == full.logprobs
