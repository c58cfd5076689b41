"""Process settings for the processes that run jobs (torch threads, the C allocator, the garbage
collector, `exit_with` the process that owns them), and `in_forked_process` for side work of the main
process (a figure drawn beside the others).

glibc's malloc serves blocks of 128 KiB and more (a threshold it raises adaptively up to 32 MiB)
with mmap and gives them back to the OS on free; the next tensor of that size then page-faults
its memory back in, zero-filled by the kernel. A training step or a Hessian-vector product
allocates and frees the same activation-sized tensors over and over, so that is paid on every
step. `keep_freed_memory` raises the mmap threshold to its maximum and the trim threshold to
1 GiB (`mallopt`), so freed blocks stay in the heap and are reused.
The memory a process holds stays at its peak instead of shrinking between steps.

Python's exit ends with a last garbage collection over every object still alive (with torch,
pandas and matplotlib imported, a large heap). `freeze_alive` moves what is alive into the
collector's permanent generation (`gc.freeze`), which collections skip (bench/bench_exit.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import multiprocessing
import os
import select
import threading
import time
from typing import Callable, TypeVar

import torch

from phasediagram.errors import SpecError

T = TypeVar("T")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's largest on 64-bit systems
TRIM_THRESHOLD = 1 << 30


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks for reuse (see the module docstring); False where the C
    library has no `mallopt` (not glibc) or refuses, and then nothing changes."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def configure_worker(threads: int) -> None:
    """A job-running process: `threads` torch threads (at least 1, also as OMP_NUM_THREADS for what it
    starts) and the allocator kept warm."""
    torch.set_num_threads(max(1, threads))
    os.environ["OMP_NUM_THREADS"] = str(max(1, threads))
    keep_freed_memory()


def freeze_alive() -> None:
    """Exempt every object alive now from garbage collection (`gc.freeze`): the collector's full passes,
    and the last one at the interpreter's exit, no longer walk them. For a process whose imports live
    until it exits (a job worker once it has imported torch and this package), or that is about to
    exit: frozen objects are still freed when their reference count drops to zero, but those in
    reference cycles only when the process ends, so not for a long-lived caller."""
    gc.freeze()


def exit_with(pid: int, poll_seconds: float = 1.0) -> None:
    """End this process (`os._exit(1)`) as soon as process `pid` ends: a daemon thread waits on a pidfd
    (Linux), else checks every `poll_seconds`. For a pool worker whose pool's owner was SIGKILLed, which
    cannot shut its workers down: they would otherwise wait for tasks forever, each holding its memory.
    A job cut short this way leaves whole files only (every write is atomic) and is redone by the rerun."""

    def wait() -> None:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd here: poll
            while process_alive(pid):
                time.sleep(poll_seconds)
        else:
            select.select([fd], [], [])
        os._exit(1)

    threading.Thread(target=wait, name=f"exit-with-{pid}", daemon=True).start()


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists (signal 0 checks without sending; another user's process exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def in_forked_process(fn: Callable[..., T], *args) -> Callable[[], T]:
    """Start fn(*args) in a forked child process; return a callable that waits for its result (and
    re-raises its exception). A fork starts in milliseconds with every module already imported,
    where a spawned process would import torch, pandas and matplotlib again (seconds), so work of a
    second or two can run beside the caller's. For work that only reads its arguments and writes
    its own files: fn must not use torch (the child has none of the parent's threads). The child
    runs fn once and exits (it waits on nothing, so it cannot outlive a killed parent by more than
    fn takes). Where the platform cannot fork, or the child dies, fn runs in this process instead.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        result = fn(*args)
        return lambda: result
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=_send_result, args=(writer, fn, args), daemon=True)
    child.start()
    writer.close()

    def wait() -> T:
        try:
            ok, value = reader.recv()
        except EOFError:  # the child died before sending
            ok, value = True, fn(*args)
        finally:
            reader.close()
            child.join()
        if not ok:
            raise value
        return value

    return wait


def _send_result(writer, fn: Callable, args: tuple) -> None:
    """In the forked child: send (True, fn(*args)) or (False, the exception) through `writer`."""
    try:
        message = (True, fn(*args))
    except Exception as exc:  # re-raised in the parent
        message = (False, exc)
    writer.send(message)
    writer.close()


def check_device(text: str) -> torch.device:
    """The torch device `text` names, if this machine has it; `SpecError` naming what is available otherwise."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise SpecError("device", f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError("device", f"{text!r}: this torch has no usable CUDA (built for CPU only, or no GPU "
                                      "visible); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SpecError("device", f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise SpecError("device", f"{text!r}: only cpu and cuda devices are supported")
    return device
