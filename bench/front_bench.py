"""The worker front's own CPU per chunk: the real objects a relayed stream goes through, nothing else.

Drives `EngineClient` (its step handler, without an engine process), `WorkerService`,
`InferenceServicer` and the relay's stream link (`relay_server._Link`) with SmolLM2's tokenizer:
`--streams` base-model requests are started on one link, then `--steps` engine steps of one token for
every stream are handed to the client, as the engine process's messages would be, and after each
step the link's batch is taken and marked written, as the gRPC write would. No gRPC, no ZeroMQ and
no model run, so no thread wake-ups and no other process's cache traffic: the figure is the Python a
chunk costs, which the cluster multiplies by what it runs beside (`bench/cluster_bench.py`).

    .venv/bin/python bench/front_bench.py [--streams 64] [--steps 100] [--rounds 5]

Prints one JSON line: CPU-µs per chunk (median over rounds) and the chunks each round carried.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_flags, cpu_model
from tests.kit.front import Front


async def one_round(tokenizer: Any, streams: int, steps: int) -> tuple[float, int]:
    front = Front(tokenizer)
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
    request_ids = [await front.start(i, prompt, max_new_tokens=steps) for i in range(streams)]
    words = tokenizer.encode(" alpha beta gamma delta epsilon zeta eta theta iota kappa")
    chunks = 0
    started = time.process_time()
    for step in range(steps):
        token = [words[step % len(words)]]
        front.step({rid: token for rid in request_ids}, frozenset(request_ids if step == steps - 1 else ()))
        for _ in range(4):  # let any stream woken by the step run to its next wait
            await asyncio.sleep(0)
        chunks += sum(1 for e in front.write() if e.chunk)
    while front.link.streams:
        await asyncio.sleep(0)
        front.write()
    return (time.process_time() - started) / max(chunks, 1) * 1e6, chunks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from services.common.smollm2 import prepare_smollm2

    tokenizer = AutoTokenizer.from_pretrained(prepare_smollm2())
    results = [asyncio.run(one_round(tokenizer, args.streams, args.steps)) for _ in range(args.rounds)]
    print(
        json.dumps(
            {
                "bench": "front",
                "streams": args.streams,
                "steps": args.steps,
                "us_per_chunk": round(statistics.median(r[0] for r in results), 1),
                "us_per_chunk_rounds": [round(r[0], 1) for r in results],
                "chunks_per_round": results[0][1],
                "cpu": cpu_model(),
                "cpu_flags": cpu_flags(),
            }
        )
    )


if __name__ == "__main__":
    main()
