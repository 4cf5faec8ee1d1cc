"""The benchmark workload of `TARGETS.md`, written to JSON lines so every engine replays the same requests.

Shape of the S-LoRA benchmark, scaled for CPU: n requests whose arrival gaps are Gamma(1/cv², cv²/rate)
(cv=1 is Poisson), an adapter index ⌊power(α) × num_adapters⌋ per request (α=1 uniform; α<1 skewed
towards the first adapters, as `numpy.random.power` has CDF x^α), input and output lengths
uniform in [lo, hi), greedy, EOS ignored, max_new_tokens = the output length. Prompts are token ids
drawn uniformly from the model's vocabulary, so no tokenizer is involved and any model can replay them.

Every record carries its adapter index even where a benchmark serves the base model only, so the engine
benchmark and the multi-LoRA benchmarks read the same files:

    .venv/bin/python bench/workload.py out.jsonl --n 64 --rate 4 --vocab-size 49152 --num-adapters 100
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class WorkloadSpec:
    n: int = 64
    """Number of requests."""
    rate: float = 4.0
    """Mean arrivals per second; `inf` puts every request at time 0 (an offline batch)."""
    cv: float = 1.0
    """Coefficient of variation of the arrival gaps (1 = Poisson, > 1 = bursty)."""
    num_adapters: int = 5
    alpha: float = 1.0
    """Exponent of `numpy.random.power` for the adapter index: 1 uniform, < 1 skewed."""
    input_len: tuple[int, int] = (8, 256)
    """Prompt length, uniform in [lo, hi). S-LoRA used [8, 512] for inputs and outputs; scaled down so a
    CPU run of a few hundred requests takes minutes."""
    output_len: tuple[int, int] = (8, 128)
    """Output length, uniform in [lo, hi); it is the request's max_new_tokens, EOS ignored."""
    vocab_size: int = 49152
    first_token_id: int = 0
    """Prompt tokens are drawn from [first_token_id, vocab_size): lets callers skip special tokens."""
    seed: int = 42

    def __post_init__(self) -> None:
        if self.n < 1 or self.num_adapters < 1:
            raise ValueError("n and num_adapters must be >= 1")
        if self.rate <= 0 or self.cv <= 0 or self.alpha <= 0:
            raise ValueError("rate, cv and alpha must be > 0")
        for name, (lo, hi) in (("input_len", self.input_len), ("output_len", self.output_len)):
            if not 1 <= lo < hi:
                raise ValueError(f"{name} must satisfy 1 <= lo < hi, got [{lo}, {hi})")
        if not 0 <= self.first_token_id < self.vocab_size:
            raise ValueError("first_token_id must be in [0, vocab_size)")


@dataclass(frozen=True)
class WorkloadRequest:
    request_id: str
    arrival_s: float
    """Seconds after the start of the run at which the request arrives."""
    adapter_index: int
    """In [0, num_adapters); benchmarks of the base model ignore it."""
    prompt_token_ids: list[int]
    max_new_tokens: int
    """Exactly the tokens to generate: greedy, EOS ignored."""


def generate(spec: WorkloadSpec) -> list[WorkloadRequest]:
    """The spec's requests in arrival order; the same spec always gives the same list."""
    rng = np.random.default_rng(spec.seed)
    # Draw each quantity as one vector, in a fixed order, so changing one range never moves another.
    if np.isinf(spec.rate):
        gaps = np.zeros(spec.n)
    else:
        shape = 1.0 / spec.cv**2
        gaps = rng.gamma(shape, spec.cv**2 / spec.rate, size=spec.n)
    # The first request arrives at 0: a run starts when its first request does.
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    adapters = np.minimum(
        (rng.power(spec.alpha, size=spec.n) * spec.num_adapters).astype(np.int64), spec.num_adapters - 1
    )
    input_lens = rng.integers(*spec.input_len, size=spec.n)
    output_lens = rng.integers(*spec.output_len, size=spec.n)
    requests = []
    for i in range(spec.n):
        prompt = rng.integers(spec.first_token_id, spec.vocab_size, size=int(input_lens[i]))
        requests.append(
            WorkloadRequest(
                request_id=f"req-{i:05d}",
                arrival_s=float(arrivals[i]),
                adapter_index=int(adapters[i]),
                prompt_token_ids=[int(t) for t in prompt],
                max_new_tokens=int(output_lens[i]),
            )
        )
    return requests


def write_jsonl(path: Path, spec: WorkloadSpec, requests: list[WorkloadRequest]) -> None:
    """First line: the spec (so a file says how it was made); then one request per line."""
    with path.open("w") as f:
        f.write(json.dumps({"spec": _spec_json(spec)}) + "\n")
        for r in requests:
            f.write(json.dumps(asdict(r)) + "\n")


def read_jsonl(path: Path) -> tuple[WorkloadSpec, list[WorkloadRequest]]:
    with path.open() as f:
        header = json.loads(f.readline())
        spec_fields: dict[str, Any] = header["spec"]
        for key in ("input_len", "output_len"):
            spec_fields[key] = tuple(spec_fields[key])
        spec_fields["rate"] = float(spec_fields["rate"])
        spec = WorkloadSpec(**spec_fields)
        requests = [WorkloadRequest(**json.loads(line)) for line in f if line.strip()]
    if len(requests) != spec.n:
        raise ValueError(f"{path}: {len(requests)} requests, the spec says {spec.n}")
    return spec, requests


def _spec_json(spec: WorkloadSpec) -> dict[str, Any]:
    fields = asdict(spec)
    # JSON has no infinity; "inf" round-trips through float().
    fields["rate"] = "inf" if np.isinf(spec.rate) else spec.rate
    return fields


def _lengths(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload flags, shared by every benchmark that makes its own workload file."""
    parser.add_argument("--n", type=int, default=WorkloadSpec.n, help="number of requests")
    parser.add_argument("--rate", type=float, default=WorkloadSpec.rate, help="arrivals/s; inf = all at 0")
    parser.add_argument("--cv", type=float, default=WorkloadSpec.cv, help="arrival burstiness (1 = Poisson)")
    parser.add_argument("--num-adapters", type=int, default=WorkloadSpec.num_adapters)
    parser.add_argument("--alpha", type=float, default=WorkloadSpec.alpha, help="adapter skew (1 = uniform)")
    parser.add_argument("--input-len", type=_lengths, default=WorkloadSpec.input_len, help="lo,hi")
    parser.add_argument("--output-len", type=_lengths, default=WorkloadSpec.output_len, help="lo,hi")
    parser.add_argument("--seed", type=int, default=WorkloadSpec.seed)


def spec_from_args(args: argparse.Namespace, vocab_size: int, first_token_id: int = 0) -> WorkloadSpec:
    return WorkloadSpec(
        n=args.n,
        rate=args.rate,
        cv=args.cv,
        num_adapters=args.num_adapters,
        alpha=args.alpha,
        input_len=args.input_len,
        output_len=args.output_len,
        vocab_size=vocab_size,
        first_token_id=first_token_id,
        seed=args.seed,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="JSON-lines file to write")
    parser.add_argument("--vocab-size", type=int, default=WorkloadSpec.vocab_size)
    parser.add_argument("--first-token-id", type=int, default=0)
    add_arguments(parser)
    args = parser.parse_args()
    spec = spec_from_args(args, args.vocab_size, args.first_token_id)
    requests = generate(spec)
    write_jsonl(args.out, spec, requests)
    total_out = sum(r.max_new_tokens for r in requests)
    print(json.dumps({"written": str(args.out), "requests": len(requests), "output_tokens": total_out}))


if __name__ == "__main__":
    main()
