"""The CPU backend: ``gc_cpu.cpp``, a C++/OpenMP library JIT-built once and cached.

Why a kernel of our own: per tensor, torch's ops cost a call each (two for the loop
``g.sub_(g.mean(...))``, four with the fp32 casts of a 16-bit gradient), and its
mixed-dtype kernels (a bf16 sum in fp32) run far below memory bandwidth on CPU. One
call here reads every gradient once for its sums and once for the subtraction — a
row of a dim-0 channel is subtracted right after it is summed, while in cache — and
splits the work over the threads torch uses (``torch.get_num_threads()``).

Built the way DeepSpeed builds its CPU ops: :func:`torch.utils.cpp_extension.load`
(ninja, cached under ``TORCH_EXTENSIONS_DIR``, a file lock so that ranks starting
together build it once). The source includes no torch headers, so a cold build takes
seconds; it is compiled for this CPU (``-march=native``), and the cache name carries
the CPU's feature flags, so a cache shared between machine types never runs
instructions a CPU lacks. Any build or load failure is reported once as a warning and
the engine uses its torch ops (the tested fallback).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from typing import Sequence

import torch

from .table import KernelItem

__all__ = ["available", "accumulate", "subtract", "library", "DTYPES"]

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_COLS = 9
CFLAGS_ENV = "DIST_GC_KERNEL_CFLAGS"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gc_cpu.cpp")
_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_ERROR: str | None = None


def _cpu_tag() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    # the CPU's features, and what the library is built against
    return hashlib.sha1(f"{platform.machine()} {flags} {sys.version_info[:2]} {torch.__version__}".encode()).hexdigest()[:10]


def _put_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the ``ninja`` wheel (a dependency)
    installs it beside the interpreter, which is not on PATH when a venv's python is
    run without activating the venv: add that directory then (this process only)."""
    if shutil.which("ninja"):
        return
    for where in (os.path.dirname(sys.executable), getattr(_try_import("ninja"), "BIN_DIR", None)):
        if where and os.path.exists(os.path.join(where, "ninja")):
            os.environ["PATH"] = where + os.pathsep + os.environ.get("PATH", "")
            return


def _try_import(name: str):
    try:
        return __import__(name)
    except ImportError:
        return None


#: Give up waiting for another process's build (and use the torch ops) after this long.
BUILD_TIMEOUT_S = 600.0


@contextlib.contextmanager
def _build_lock(build_dir: str):
    """An exclusive ``flock`` on ``build_dir/dist_gc.flock`` for the duration of the build.

    Why not only torch's own lock (``build_dir/lock``): it is a plain file with no owner,
    so a process killed mid-build (torchrun and SLURM send SIGTERM) leaves it behind and
    every later process waits on it forever. The kernel releases a ``flock`` when its
    holder dies, so whoever holds ours knows that any torch lock file left in the
    directory is stale (every dist_gc build takes ours first) and removes it."""
    try:
        import fcntl
    except ImportError:  # (no flock: Windows) torch's lock alone
        yield
        return
    with open(os.path.join(build_dir, "dist_gc.flock"), "a") as f:
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been building in {build_dir} for over {BUILD_TIMEOUT_S:.0f} s") from None
                time.sleep(0.1)
        try:
            stale = os.path.join(build_dir, "lock")
            if os.path.exists(stale):
                warnings.warn(f"dist_gc: removing {stale}, left by a kernel build that did not finish", RuntimeWarning, stacklevel=4)
                with contextlib.suppress(OSError):
                    os.remove(stale)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(name: str, flags: list[str]) -> str:
    """Build (or load from the cache) the library; returns its path."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    build_dir = os.path.join(root, name)
    os.makedirs(build_dir, exist_ok=True)
    with _build_lock(build_dir):
        return cpp_extension.load(name=name, sources=[_SOURCE], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                  build_directory=build_dir, is_python_module=False, verbose=False)


def library() -> ctypes.CDLL | None:
    """The built library (building it on first use), or ``None`` if it cannot be built
    here (the reason is warned once and kept in :func:`error`)."""
    global _LIB, _ERROR
    if _LIB is not None or _ERROR is not None:
        return _LIB
    with _LOCK:
        if _LIB is None and _ERROR is None:
            try:
                _put_ninja_on_path()
                flags = ["-O3", "-std=c++17", "-fopenmp"] + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"])
                # Extra flags (the tests build the portable paths with -mno-avx512f -mno-f16c);
                # they are part of the cache name, so each set has its own library.
                extra = os.environ.get(CFLAGS_ENV, "").split()
                tag = _cpu_tag() + (hashlib.sha1(" ".join(extra).encode()).hexdigest()[:6] if extra else "")
                lib = ctypes.CDLL(_build(f"dist_gc_cpu_{tag}", flags + extra))
                for fn in (lib.dist_gc_accumulate, lib.dist_gc_subtract):
                    fn.restype = ctypes.c_int
                lib.dist_gc_accumulate.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
                lib.dist_gc_subtract.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
                _LIB = lib
            except Exception as exc:  # noqa: BLE001 - any build failure falls back, loudly
                _ERROR = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                warnings.warn(f"dist_gc: the fused CPU kernel could not be built ({_ERROR}); using torch ops (slower, same results). "
                              "Set DIST_GC_KERNEL=torch to silence this", RuntimeWarning, stacklevel=2)
    return _LIB


def error() -> str | None:
    """Why the library could not be built (``None``: built, or not tried yet)."""
    return _ERROR


def available() -> bool:
    return library() is not None


class Table:
    """The static columns of a step's table (built once per engine); the data addresses
    are filled in at each call (gradients may be reallocated between steps)."""

    def __init__(self, items: Sequence[KernelItem], dtypes: Sequence[torch.dtype]) -> None:
        rows = [[0, DTYPES[d], *it.shape, it.sum_start, (1 if it.final else 0) | (2 if it.exclusive else 0), int(it.count)]
                for it, d in zip(items, dtypes)]
        self.data = torch.tensor(rows, dtype=torch.int64).reshape(-1, _COLS)
        self.dtypes = tuple(dtypes)

    def fill(self, views: Sequence[torch.Tensor]) -> None:
        self.data[:, 0] = torch.tensor([v.data_ptr() for v in views], dtype=torch.int64)


def accumulate(table: Table, views: Sequence[torch.Tensor], sums: torch.Tensor, fuse: bool) -> None:
    """See :mod:`dist_gc.kernels` (``sums``: contiguous fp32 on CPU)."""
    table.fill(views)
    library().dist_gc_accumulate(table.data.data_ptr(), table.data.size(0), sums.data_ptr(), int(fuse), torch.get_num_threads())


def subtract(table: Table, views: Sequence[torch.Tensor], means: torch.Tensor) -> None:
    table.fill(views)
    library().dist_gc_subtract(table.data.data_ptr(), table.data.size(0), means.data_ptr(), torch.get_num_threads())
