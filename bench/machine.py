"""What a benchmark figure depends on besides our code: the CPU's vector extensions and a busy host."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from services.common import cpu


def cpu_flags() -> str:
    """The vector extensions of this CPU that matter to torch's kernels (figures depend on them)."""
    flags = cpu.cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile", "fma")
    return " ".join(f for f in wanted if f in flags)


def cpu_model() -> str:
    """The CPU's model name as Linux reports it ("" where /proc/cpuinfo has none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def gemm_gflops(dtype: Any, shape: tuple[int, int, int] = (2048, 2048, 2048), seconds: float = 0.5) -> float:
    """What torch's matmul reaches here for `shape` (rows, inner, columns) in `dtype`, measured now
    with the current torch threads: the ceiling a figure is compared with. It moves with the CPU
    (an AVX2-only host and an AMX one differ 8x in bf16), so it is measured, never written down."""
    import torch  # here: the relay and gateway benchmarks never load torch

    rows, inner, columns = shape
    a = torch.randn(rows, inner).to(dtype)
    b = torch.randn(columns, inner).to(dtype)
    torch.nn.functional.linear(a, b)
    rate = _calls_per_second(lambda: torch.nn.functional.linear(a, b), seconds)
    return 2 * rows * inner * columns * rate / 1e9


def memory_read_gbps(mib: int = 1024, seconds: float = 0.5) -> float:
    """How fast torch reads memory here, measured now: a sum over a tensor larger than any cache this
    VM reports, with the current torch threads. It bounds work that reads its weights once and does
    little with them, such as the adapters' share of a decode step."""
    import torch  # here: the relay and gateway benchmarks never load torch

    data = torch.ones(mib << 18)  # float32: `mib` MiB
    return data.numel() * data.element_size() * _calls_per_second(data.sum, seconds) / 1e9


def _calls_per_second(call: Callable[[], object], seconds: float) -> float:
    """How often `call` runs per second, over at least `seconds` and three calls (after a warm-up)."""
    call()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or calls < 3:
        call()
        calls += 1
    return calls / elapsed


def set_up_torch(threads: int) -> None:
    """What every in-process benchmark does first: torch's intra-op threads, and transformers quiet
    (one JSON line on stdout is each benchmark's contract; progress bars and warnings would clutter it)."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def steal_seconds() -> float:
    """CPU time the hypervisor gave other machines while ours wanted it (0 on bare metal): a run
    with much of it measured a busy host, not our code."""
    return float(getattr(psutil.cpu_times(), "steal", 0.0))


def thread_kind(name: str, tid: int, pid: int) -> str:
    """The part of a service process a thread belongs to: its event loop, grpc's core, ZeroMQ's I/O,
    or Python threads (the default executor: spool fsyncs, adapter parsing)."""
    if tid == pid:
        return "loop"
    if name.startswith(("event_engine", "grpc_global_tim", "lifeguard", "grpc_")):
        return "grpc"
    if name.startswith("ZMQbg"):
        return "zmq"
    return "threads"


def thread_usage(pid: int) -> dict[str, tuple[float, int, int]]:
    """CPU-seconds (nanosecond schedstat, not 10 ms ticks), wake-ups (voluntary context switches: the
    thread slept and was woken) and preemptions (involuntary ones: another thread took its core) so
    far of each kind of thread of a live process. On a small VM a wake-up costs tens to hundreds of
    microseconds of CPU, so with few tokens a second they, not the Python work, make most of a
    service's CPU per token. Threads that ended are not counted."""
    usage: dict[str, tuple[float, int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            on_cpu_ns = int((task / "schedstat").read_text().split()[0])
            status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines())
            woken, preempted = (
                int(status["voluntary_ctxt_switches"]),
                int(status["nonvoluntary_ctxt_switches"]),
            )
        except (OSError, ValueError, IndexError, KeyError):
            continue  # the thread ended meanwhile
        kind = thread_kind(name, int(task.name), pid)
        seconds, wakeups, preemptions = usage.get(kind, (0.0, 0, 0))
        usage[kind] = (seconds + on_cpu_ns / 1e9, wakeups + woken, preemptions + preempted)
    return usage
