"""The engine's compiled CPU ops, one library built from every source in `SOURCES`: the multi-LoRA op
by token (`lora/cpu_kernel.cpp`, used by `lora/cpu_kernel.py`) and the paged attention of decoding
sequences (`attention/cpu_attention.cpp`, used by `attention/torch_sdpa.py`), all under
`torch.ops.openlora`.

Built on first use by torch's C++ extension loader (needs a C++ compiler and ninja; 5-30 s, once per
machine) into `OPENLORA_KERNEL_DIR` (default `~/.cache/openlora/kernels`), under a name that hashes the
sources, the flags, torch's build, the compiler and this CPU's flags (`build_name`): the build targets
the CPU it runs on (`-march=native`), so a cache shared with another CPU never runs instructions that
CPU lacks. Each build goes to a folder of its own and is renamed into place, so concurrent starts never
wait on each other and a build killed half-way blocks nothing (its folder goes at a later build). Where
it cannot be built, `library()` raises `KernelUnavailable` saying why, and each user falls back to its
plain-torch path.
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
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "lora" / "cpu_kernel.cpp", HERE / "attention" / "cpu_attention.cpp")
# -ffp-contract=fast (GCC's own default for C++) fuses multiply-adds as fbgemm's `embedding_bag` does,
# which is what keeps the LoRA kernel's sums bit-identical to the segment op's on x86.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast")
STALE_SCRATCH_S = 3600  # a build folder this old was left by a killed build


PREFIX = "openlora_cpu_"


class KernelUnavailable(RuntimeError):
    """The compiled ops could not be built or loaded here."""


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
    sources = [source.read_bytes() for source in SOURCES]
    for part in (*sources, flags, torch_build.encode(), _compiler(), _cpu_identity()):
        digest.update(part)
        digest.update(b"\0")
    return f"{PREFIX}{digest.hexdigest()[:16]}"


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
_loaded: Any | str | None = None


def _load() -> Any | str:
    """The ops' namespace, or why there is none (remembered: one try per process)."""
    global _loaded
    with _loading:
        if _loaded is None:
            _loaded = _load_once()
        return _loaded


def _load_once() -> Any | str:
    name = build_name()
    final = kernel_dir() / name
    built = final / f"{name}.so"
    try:
        if not built.exists():
            _build(name, final)
        else:
            try:
                torch.ops.load_library(str(built))  # type: ignore[no-untyped-call]
            except OSError:  # a damaged cache entry (a truncated copy, a full disk): build it anew
                log.warning("the cached CPU kernels %s do not load; building them again", built)
                shutil.rmtree(final, ignore_errors=True)
                _build(name, final)
        return torch.ops.openlora
    except Exception as exc:  # a missing compiler, a read-only cache, a broken toolchain: all say why
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return f"the CPU kernels could not be built or loaded ({reason})"


def _build(name: str, final: Path) -> None:
    from torch.utils.cpp_extension import load

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise KernelUnavailable(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    if shutil.which("ninja") is None:  # the `ninja` wheel's binary, where the venv is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f"{PREFIX}*.*"):  # scratch folders of killed builds
        if time.time() - stale.stat().st_mtime > STALE_SCRATCH_S:
            shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=final.parent))
    log.warning("building the CPU kernels into %s (once per machine and CPU; seconds)", final)
    started = time.monotonic()
    try:
        load(
            name,
            [str(source) for source in SOURCES],
            extra_cflags=list(FLAGS),
            build_directory=str(scratch),
            is_python_module=False,
        )
        try:
            scratch.rename(final)
        except OSError:  # another process put its build in place first: ours is loaded, drop it
            shutil.rmtree(scratch, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    log.warning("built the CPU kernels in %.1f s", time.monotonic() - started)


def library() -> Any:
    """`torch.ops.openlora`, its ops built or loaded on first call; `KernelUnavailable` says why not."""
    loaded = _load()
    if isinstance(loaded, str):
        raise KernelUnavailable(loaded)
    return loaded
