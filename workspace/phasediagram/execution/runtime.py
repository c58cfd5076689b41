"""Process settings for the processes that run jobs (torch threads, the C allocator, the garbage
collector, `exit_with` the process that owns them), and `in_forked_process` for side work of the main
process (a figure drawn beside the others), `main_script_withheld` while a pool's workers start; the
devices jobs run on (`parse_device`, `check_device`,
the local pool's `pool_slots`) and `deterministic_algorithms` (docs/gpu.md).

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

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import multiprocessing
import os
import select
import signal
import sys
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


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the block with `threads` torch threads (None: as they are), restoring the count after. Float32
    results depend on it: reductions split over threads sum in another order."""
    before = torch.get_num_threads()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise SpecError("threads", f"must be an integer >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


class _Interrupts:
    """A pool worker's Ctrl-C state: whether SIGINT came, whether a task is running."""

    seen = False
    in_task = False


def interrupt_tasks_only() -> None:
    """A pool worker's SIGINT handler. Ctrl-C reaches every process of the terminal's process group,
    the pool's workers with their owner: a worker raises KeyboardInterrupt only inside a task
    (`interruptible_task`), where the writers remove their temporary files and the pool hands the
    exception to the owner (which prints the one line), never while idle, where it would end the
    worker with a traceback; every task started after it ends at once the same way."""

    def on_sigint(signum, frame) -> None:
        _Interrupts.seen = True
        if _Interrupts.in_task:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)


@contextlib.contextmanager
def interrupts_ignored():
    """SIGINT ignored in this process for the block, so that the processes it starts there (a fork
    server, spawned workers) begin with it ignored, a disposition that survives `exec`: Python then
    installs no KeyboardInterrupt handler, and no process that is only starting (importing torch)
    ends with a traceback. A fork server keeps ignoring it; a pool worker takes it up in
    `interrupt_tasks_only`. For blocks that only start processes (a fork and an exec): a SIGINT to
    this process within them is lost."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def interrupts_deferred():
    """SIGINT held back for the block and raised as KeyboardInterrupt when it ends: for a block whose work
    must not be left half done, such as asking a fork server for workers (a worker forked after its
    owner has gone fails to rebuild the pool's semaphores, with a traceback)."""
    came = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if came:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible_task():
    """The block of one pool task, interrupted by SIGINT (`interrupt_tasks_only`); KeyboardInterrupt at
    once where SIGINT came before."""
    if _Interrupts.seen:
        raise KeyboardInterrupt
    _Interrupts.in_task = True
    try:
        yield
    finally:
        _Interrupts.in_task = False


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
    """In the forked child: send (True, fn(*args)) or (False, the exception) through `writer`. Ctrl-C is
    the parent's to handle: the child ignores SIGINT and finishes its short work, which the parent
    waits for."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        message = (True, fn(*args))
    except Exception as exc:  # re-raised in the parent
        message = (False, exc)
    writer.send(message)
    writer.close()


@contextlib.contextmanager
def main_script_withheld():
    """While worker processes start with the "spawn" or "forkserver" method, hide the caller's main
    script from multiprocessing, so that the workers do not run it again.

    Such a child imports the parent's main script (as `__mp_main__`, named by the script's `__file__`
    or by the `__spec__` of `python -m`) before it unpickles its task; a script that calls
    `Study.run()` at top level, without `if __name__ == "__main__":`, would then start a pool inside
    every worker. The pool's workers run only functions of this package, so they need nothing from
    the main script: `__file__` is removed and `__spec__` set to None for the duration, and both are
    restored afterwards. A main module without them (a REPL, a notebook) is left as it is.
    """
    main = sys.modules.get("__main__")
    saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if main is not None
             and main.__dict__.get(name) is not None}
    if not saved:
        yield
        return
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)


def parse_device(text: str) -> torch.device:
    """The torch device `text` names (cpu, cuda, cuda:N), whether or not this machine has it: for jobs
    that run elsewhere (a Slurm node has GPUs its login node lacks); `SpecError` for any other text."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise SpecError("device", f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise SpecError("device", f"{text!r}: only cpu and cuda devices are supported")
    return device


def check_device(text: str) -> torch.device:
    """The torch device `text` names, if this machine has it; `SpecError` naming what is available otherwise."""
    device = parse_device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError("device", f"{text!r}: this torch has no usable CUDA (built for CPU only, or no GPU "
                                      "visible); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SpecError("device", f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def pool_slots(device: str, workers: int | None, workers_per_gpu: int, cpus: int, gpus: int) -> list[tuple[str, int]]:
    """(device, torch threads) of each worker of a local pool, worker i taking entry i.

    cpu: `workers` (default `cpus`) one-thread workers, all on "cpu". cuda (every visible GPU):
    `workers_per_gpu` = K workers per GPU, worker i on "cuda:{i // K}", `gpus` * K workers; cuda:N:
    K workers on "cuda:N". The `cpus` cores are split among the n GPU workers: worker i gets
    floor(cpus / n) threads, one more for i < cpus mod n, at least 1. `SpecError` for K < 1, a cuda
    pool with no GPU, or `workers` other than the pool's size.
    """
    if isinstance(workers_per_gpu, bool) or not isinstance(workers_per_gpu, int) or workers_per_gpu < 1:
        raise SpecError("workers_per_gpu", f"{workers_per_gpu!r} must be an integer >= 1")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise SpecError("workers", f"{workers!r} must be an integer >= 1")
    target = parse_device(device)
    if target.type == "cpu":
        return [("cpu", 1)] * (workers or max(1, cpus))
    if gpus < 1:
        raise SpecError("device", f"{device!r}: no CUDA device is visible")
    indices = range(gpus) if target.index is None else [target.index]
    devices = [f"cuda:{i}" for i in indices for _ in range(workers_per_gpu)]
    if workers is not None and workers != len(devices):
        raise SpecError("workers", f"{workers} workers, but a pool on {device} has {workers_per_gpu} worker(s) per GPU "
                                   f"x {len(indices)} GPU(s) = {len(devices)}; set --workers-per-gpu instead")
    base, extra = divmod(max(1, cpus), len(devices))
    return [(d, max(1, base + (i < extra))) for i, d in enumerate(devices)]


CUBLAS_DETERMINISTIC = ":4096:8"  # cuBLAS's workspace setting that makes its kernels deterministic


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, device: str | torch.device = "cpu"):
    """Within the block, with `enabled`: `torch.use_deterministic_algorithms(True)` (an operation with no
    deterministic implementation raises instead of running) and cuDNN's autotuner off; on a CUDA device
    also CUBLAS_WORKSPACE_CONFIG=:4096:8 unless already set, which cuBLAS reads when this process makes
    its first cuBLAS call, so before that. Afterwards the previous settings are back (not the variable).
    Without `enabled` nothing changes."""
    if not enabled:
        yield
        return
    if torch.device(device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]
