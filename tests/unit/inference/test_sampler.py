"""The vectorised sampler: greedy rows, seeded reproducibility, top-k/top-p cuts, logprobs."""

from __future__ import annotations

import pytest
import torch

from services.inference.engine.sampler import (
    _filter_top_k_top_p,
    adjusted_logits,
    argmax_rows,
    sample,
    warped_logits,
)
from services.inference.engine.sequence import SamplingParams


def seeded(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def test_greedy_and_top_k_one_take_the_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(), SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=0.0)]
    out = sample(logits, params, [None, seeded(1), None])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fast_row_argmax_picks_the_first_maximum_as_argmax_does(dtype: torch.dtype) -> None:
    """Greedy parity with HF rests on the first maximum of a row winning: ties are common in bf16."""
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.randint(0, 4, (16, 4099), generator=g).to(dtype)  # every row full of ties
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    x = torch.randn(3, 4099, generator=g).to(dtype)
    x[1, 17] = float("nan")  # argmax takes a NaN as the maximum
    x[2, [5, 900, 4000]] = 50.0
    assert argmax_rows(x).tolist() == x.argmax(dim=-1).tolist() == [int(x[0].argmax()), 17, 5]


def test_a_tiny_top_p_keeps_only_the_most_likely_token() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    params = [SamplingParams(temperature=1.0, top_p=1e-6)] * 4
    out = sample(logits, params, [seeded(i) for i in range(4)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_same_seed_same_tokens_whatever_shares_the_batch() -> None:
    torch.manual_seed(2)
    row = torch.randn(1, 100)
    params = SamplingParams(temperature=1.0, seed=7)
    gen_alone = seeded(7)
    tokens_alone = [sample(row, [params], [gen_alone]).token_ids[0] for _ in range(20)]
    assert len(set(tokens_alone)) > 1, "temperature 1 on random logits does sample"

    gen_batched = seeded(7)
    others = torch.randn(3, 100)
    noisy = SamplingParams(temperature=2.0)
    tokens_batched = []
    for step in range(20):
        at = step % 4  # our row moves around a batch of other sampling rows
        batch = torch.cat([others[:at], row, others[at:]])
        gens: list[torch.Generator | None] = [seeded(100 + step + i) for i in range(3)]
        gens.insert(at, gen_batched)
        out = sample(batch, [noisy] * at + [params] + [noisy] * (3 - at), gens)
        tokens_batched.append(out.token_ids[at])
    assert tokens_batched == tokens_alone


def test_seeded_rows_reproduce_exactly() -> None:
    torch.manual_seed(3)
    logits = torch.randn(2, 64)
    params = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=11)] * 2

    def run() -> list[list[int]]:
        gens: list[torch.Generator | None] = [seeded(11), seeded(12)]
        return [sample(logits, params, gens).token_ids for _ in range(10)]

    first = run()
    assert first == run()
    same_logits = torch.cat([logits[:1], logits[:1]])
    gens: list[torch.Generator | None] = [seeded(11), seeded(12)]
    pairs = [sample(same_logits, params, gens).token_ids for _ in range(10)]
    assert any(a != b for a, b in pairs), "different seeds give different draws"


def test_sampling_follows_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    gen = seeded(5)
    params = [SamplingParams(temperature=1.0)]
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        counts[sample(logits, params, [gen]).token_ids[0]] += 1
    torch.testing.assert_close(counts / n, logits.softmax(-1)[0], atol=0.03, rtol=0)


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (3, 1.0), (0, 0.7), (5, 0.5), (1, 0.9)])
def test_filter_matches_a_plain_reference(top_k: int, top_p: float) -> None:
    torch.manual_seed(4)
    logits = torch.randn(3, 12)
    got = _filter_top_k_top_p(logits, torch.tensor([top_k] * 3), torch.tensor([top_p] * 3))
    for row in range(3):
        order = logits[row].argsort(descending=True).tolist()
        keep = order[:top_k] if top_k else order
        probs = logits[row, keep].softmax(0).tolist()
        kept: list[int] = []
        mass = 0.0
        for token, p in zip(keep, probs, strict=True):
            if kept and mass >= top_p:
                break
            kept.append(token)
            mass += p
        expected = torch.full_like(logits[row], float("-inf"))
        expected[kept] = logits[row, kept]
        assert torch.equal(got[row], expected)


def test_logprobs_are_the_model_log_softmax_of_the_chosen_tokens() -> None:
    torch.manual_seed(6)
    logits = torch.randn(2, 40)
    params = [SamplingParams(logprobs=True), SamplingParams(temperature=0.7, seed=1, logprobs=True)]
    out = sample(logits, params, [None, seeded(1)])
    assert out.logprobs is not None
    expected = logits.log_softmax(-1)[torch.arange(2), torch.tensor(out.token_ids)]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected)


def test_an_empty_step_samples_nothing() -> None:
    assert sample(torch.empty(0, 10), [], []).token_ids == []


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=0)]
)
def test_invalid_sampling_params_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


class History:
    def __init__(self, prompt: list[int], output: list[int]) -> None:
        self.token_ids = prompt + output
        self.output_token_ids = output


def _histories(rows: int, vocab: int, g: torch.Generator) -> list[History]:
    return [
        History(
            torch.randint(0, vocab, (9,), generator=g).tolist(),
            torch.randint(0, vocab, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g).tolist(),
        )
        for _ in range(rows)
    ]


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_the_repetition_penalty_matches_transformers(penalty: float) -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 64, generator=g) * 3
    histories = _histories(5, 64, g)
    params = [SamplingParams(repetition_penalty=penalty)] * 5
    ours = adjusted_logits(logits, params, histories)
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    for i, history in enumerate(histories):
        ids = torch.tensor([history.token_ids])
        torch.testing.assert_close(ours[i : i + 1], processor(ids, logits[i : i + 1].clone()))
    assert out_tokens(logits, params, histories) == ours.argmax(dim=-1).tolist()


def out_tokens(logits: torch.Tensor, params: list[SamplingParams], histories: list[History]) -> list[int]:
    return sample(logits, params, [None] * len(params), histories).token_ids


def test_logit_bias_matches_transformers_sequence_bias_and_comes_first() -> None:
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
    )

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 40, generator=g)
    history = _histories(1, 40, g)
    bias = ((3, 5.0), (17, -2.5), (int(history[0].token_ids[0]), 1.5))
    params = [SamplingParams(logit_bias=bias, repetition_penalty=1.2)]
    ids = torch.tensor([history[0].token_ids])
    expected = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias])(ids, logits.clone())
    expected = RepetitionPenaltyLogitsProcessor(1.2)(ids, expected)
    torch.testing.assert_close(adjusted_logits(logits, params, history), expected)


def test_frequency_and_presence_penalties_follow_openai() -> None:
    """logit - frequency x count - presence x [count > 0], counted over the output only."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(1, 30, generator=g)
    history = History(prompt=[1, 1, 1], output=[2, 2, 2, 5])
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)]
    expected = logits.clone()
    expected[0, 2] -= 0.5 * 3 + 0.25
    expected[0, 5] -= 0.5 * 1 + 0.25
    torch.testing.assert_close(adjusted_logits(logits, params, [history]), expected)


def test_a_strong_frequency_penalty_steers_greedy_decoding_away_from_repeats() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 4] = 1.0
    history = History(prompt=[0], output=[4, 4])
    assert out_tokens(logits, [SamplingParams()], [history]) == [4]
    assert out_tokens(logits, [SamplingParams(frequency_penalty=1.0)], [history]) != [4]


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p"), [(0.7, 0, 1.0, 0.1), (1.3, 8, 0.9, 0.05)]
)
def test_temperature_top_k_top_p_and_min_p_match_transformers_warpers(
    temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 50, generator=g) * 2
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    warpers.append(TopPLogitsWarper(top_p))
    warpers.append(MinPLogitsWarper(min_p))
    expected = warpers(torch.zeros(4, 1, dtype=torch.long), logits.clone())  # type: ignore[arg-type]
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)] * 4
    ours = warped_logits(logits, params)
    assert torch.equal(ours.isinf(), expected.isinf()), "the same tokens are cut"
    kept = ~expected.isinf()
    torch.testing.assert_close(ours[kept], expected[kept])


def test_sampled_tokens_respect_min_p() -> None:
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(1, 100, generator=g)
    probs = logits.softmax(dim=-1)[0]
    allowed = set((probs >= 0.3 * probs.max()).nonzero()[:, 0].tolist())
    assert 1 < len(allowed) < 50
    params = [SamplingParams(temperature=1.0, min_p=0.3)]
    gen = seeded(9)
    drawn = {sample(logits, params, [gen]).token_ids[0] for _ in range(300)}
    assert drawn <= allowed and len(drawn) > 1


def test_top_logprobs_are_the_models_most_likely_tokens() -> None:
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(3, 40, generator=g)
    params = [
        SamplingParams(logprobs=True, top_logprobs=3),
        SamplingParams(logprobs=True),
        SamplingParams(logprobs=True, top_logprobs=1, logit_bias=((0, 50.0),)),
    ]
    out = sample(logits, params, [None] * 3, _histories(3, 40, g))
    assert out.top_logprobs is not None and out.top_logprobs[1] is None
    model = logits.log_softmax(dim=-1)
    for row in (0, 2):
        top = out.top_logprobs[row]
        assert top is not None
        values, ids = model[row].topk(params[row].top_logprobs)
        assert top[0] == ids.tolist()
        assert top[1] == pytest.approx(values.tolist())
    assert out.token_ids[2] == 0, "the bias picks the token"
    assert out.logprobs is not None
    assert out.logprobs[2] == pytest.approx(float(model[2, 0])), "logprobs are the model's, unbiased"
