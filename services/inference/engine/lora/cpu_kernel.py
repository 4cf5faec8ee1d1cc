"""The `cpu` multi-LoRA op: the plain-torch op's by-token plan (`ops.TokenBags`) in one compiled call
per module (`cpu_kernel.cpp`), with the same sums in the same order, so float32 outputs are bit-identical
to it. The plain op spends a dozen tensor ops per module (the input's cast, two `embedding_bag`s over
64-byte rows, the scaling, the add); the kernel reads each token's slot rows in place and adds the delta
as it goes, bound by reading the adapters' bytes. Measured (`bench/RESULTS.md`, 2026-12-04, SmolLM2
shapes, 64 decode tokens over 42 rank-16 adapters on q/k/v/o, 2 threads): 13.8 → 9.7 ms a step in
float32, 14.4 → 9.1 with a bfloat16 model.

Built on first use by torch's C++ extension loader (needs a C++ compiler and ninja; 5-30 s, once per
machine) into `OPENLORA_KERNEL_DIR` (default `~/.cache/openlora/kernels`), under a name that hashes the
source, the flags, torch's build, the compiler and this CPU's flags (`build_name`): the build targets the
CPU it runs on (`-march=native`), so a cache shared with another CPU never runs instructions that CPU
lacks. Each build goes to a folder of its own and is renamed into place, so concurrent starts never wait
on each other and a build killed half-way blocks nothing (its folder goes at a later build). Where it
cannot be built, `kernel()` raises `KernelUnavailable` saying why, and `auto` falls back to the
plain-torch op.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from services.inference.engine.lora.ops import SegmentPlan, bags_fit, lora_segment

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
# -ffp-contract=fast (GCC's own default for C++) fuses multiply-adds as fbgemm's `embedding_bag` does,
# which is what keeps the kernel's sums bit-identical to the segment op's on x86.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast")
STALE_SCRATCH_S = 3600  # a build folder this old was left by a killed build


class KernelUnavailable(RuntimeError):
    """The compiled op could not be built or loaded here."""


def kernel_dir() -> Path:
    configured = os.environ.get("OPENLORA_KERNEL_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "openlora" / "kernels"


def build_name() -> str:
    """Changes with anything that changes the binary: the source, the flags, torch (its build and C++
    ABI too), the compiler, this CPU."""
    digest = hashlib.sha256()
    torch_build = f"{torch.__version__} {torch.version.git_version} {torch._C._GLIBCXX_USE_CXX11_ABI}"
    flags = " ".join(FLAGS).encode()
    for part in (SOURCE.read_bytes(), flags, torch_build.encode(), _compiler(), _cpu_identity()):
        digest.update(part)
        digest.update(b"\0")
    return f"openlora_lora_cpu_{digest.hexdigest()[:16]}"


def _compiler() -> bytes:
    try:
        done = subprocess.run(
            [os.environ.get("CXX", "c++"), "--version"], capture_output=True, timeout=30, check=False
        )
        return done.stdout
    except (OSError, subprocess.SubprocessError):
        return b"none"


def _cpu_identity() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith((b"flags", b"Features", b"model name"))]
        return b"".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}".encode()


# One build or load per process, however many threads ask first: a second load of another copy of the
# library would register the `openlora` ops twice, which torch refuses.
_loading = threading.Lock()
_loaded: Callable[..., None] | str | None = None


def _load() -> Callable[..., None] | str:
    """The op, or why there is none (remembered: one try per process)."""
    global _loaded
    with _loading:
        if _loaded is None:
            _loaded = _load_once()
        return _loaded


def _load_once() -> Callable[..., None] | str:
    name = build_name()
    final = kernel_dir() / name
    library = final / f"{name}.so"
    try:
        if not library.exists():
            _build(name, final)
        else:
            try:
                torch.ops.load_library(str(library))  # type: ignore[no-untyped-call]
            except OSError:  # a damaged cache entry (a truncated copy, a full disk): build it anew
                log.warning("the cached CPU LoRA kernel %s does not load; building it again", library)
                shutil.rmtree(final, ignore_errors=True)
                _build(name, final)
        op: Callable[..., None] = torch.ops.openlora.lora_by_token
        return op
    except Exception as exc:  # a missing compiler, a read-only cache, a broken toolchain: all say why
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return f"the CPU LoRA kernel could not be built or loaded ({reason})"


def _build(name: str, final: Path) -> None:
    from torch.utils.cpp_extension import load

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise KernelUnavailable(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    if shutil.which("ninja") is None:  # the `ninja` wheel's binary, where the venv is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob("openlora_lora_cpu_*.*"):  # scratch folders of killed builds
        if time.time() - stale.stat().st_mtime > STALE_SCRATCH_S:
            shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=final.parent))
    log.warning("building the CPU LoRA kernel into %s (once per machine and CPU; seconds)", final)
    started = time.monotonic()
    try:
        sources = [str(SOURCE)]
        load(name, sources, extra_cflags=list(FLAGS), build_directory=str(scratch), is_python_module=False)
        try:
            scratch.rename(final)
        except OSError:  # another process put its build in place first: ours is loaded, drop it
            shutil.rmtree(scratch, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    log.warning("built the CPU LoRA kernel in %.1f s", time.monotonic() - started)


def kernel() -> Callable[..., None]:
    """The compiled op, built or loaded on first call; `KernelUnavailable` says why not."""
    loaded = _load()
    if isinstance(loaded, str):
        raise KernelUnavailable(loaded)
    return loaded


def lora_cpu(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    plan: SegmentPlan,
    rank: int | None = None,
) -> None:
    """`ops.lora_segment`'s semantics; a by-token plan over the pool's storage runs compiled. Slots
    in the model's dtype (`lora_dtype=model`) are summed in float32 here and rounded once, where the
    segment op's `embedding_bag`s round the hidden values and the delta to that dtype on the way."""
    bags = plan.bags
    if bags is None or a.dtype not in (torch.float32, y.dtype) or x.dtype != y.dtype or not bags_fit(a, b):
        lora_segment(y, x, a, b, plan, rank)
        return
    kernel()(
        y,
        x if x.stride(-1) == 1 else x.contiguous(),
        a.transpose(1, 2),
        b.transpose(1, 2),
        bags.rows,
        bags.slots,
        bags.scale.view(-1),
        a.shape[1] if rank is None else rank,
    )
