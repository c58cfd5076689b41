"""Process settings of job-running processes (`runtime`): threads, glibc's malloc thresholds, the garbage
collector's frozen objects, the pool's workers (forks of one server, ending with their owner: `exit_with`),
and side work in a forked process (`in_forked_process`)."""

from __future__ import annotations

import gc
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from phasediagram.execution import local_pool, runtime

# In a fresh interpreter: minor page faults of 40 rounds of malloc + touch + free of 3, 5 and 1 MiB
# blocks (what a training step does with activations), before and after `keep_freed_memory`.
PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, resource
    from phasediagram.execution.runtime import keep_freed_memory
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    sizes = (3 << 20, 5 << 20, 1 << 20)

    def faults(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            blocks = [libc.malloc(s) for s in sizes]
            for p, s in zip(blocks, sizes):
                ctypes.memset(p, 1, s)
            for p in reversed(blocks):
                libc.free(p)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    default = faults(40)
    ok = keep_freed_memory()
    faults(1)  # the heap grows once to hold the blocks
    print(ok, default, faults(40))
""")


def test_freed_blocks_are_reused_instead_of_faulted_back_in():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    ok, default, kept = out[0] == "True", int(out[1]), int(out[2])
    assert ok
    assert default >= 400, "glibc's defaults no longer return these blocks to the OS: the probe tests nothing"
    assert kept <= default // 20


def test_configure_worker_sets_threads(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # restored after the test
    try:
        runtime.configure_worker(0)
        assert torch.get_num_threads() == 1
        runtime.configure_worker(2)
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    finally:
        torch.set_num_threads(threads)


def test_without_mallopt_nothing_changes(monkeypatch):
    runtime.keep_freed_memory.cache_clear()
    monkeypatch.setattr(runtime.ctypes.util, "find_library", lambda name: None)
    try:
        assert runtime.keep_freed_memory() is False
    finally:
        runtime.keep_freed_memory.cache_clear()


PARENT = os.getpid()


def _where_and_what(value):
    return os.getpid(), value * 2


def _fails(value):
    raise ValueError(f"bad value {value}")


def _dies_in_a_child(value):
    if os.getpid() != PARENT:
        os._exit(3)
    return value + 1


TORCH_OBJECTS = 50_000  # fewer objects than importing torch alone leaves to the collector (about 1.8e5)


def _worker_state(_=None):
    time.sleep(0.05)  # long enough that every worker takes some of the tasks
    return os.getpid(), os.getppid(), "torch._dynamo" in sys.modules, gc.get_freeze_count()


def test_pool_workers_are_forks_of_one_server_that_imported_torch_optims_lazy_import():
    """Where the platform has a fork server, both workers are its children, not this process's, and start with
    torch, this package and torch._dynamo (which torch.optim imports at a process's first optimizer) imported,
    and those imports exempt from garbage collection (`freeze_alive`)."""
    with local_pool.start_pool(2) as pool:
        states = set(pool.map(_worker_state, range(8)))
    assert len({pid for pid, _, _, _ in states}) == 2
    parents = {parent for _, parent, _, _ in states}
    assert len(parents) == 1 and os.getpid() not in parents
    assert all(dynamo and frozen > TORCH_OBJECTS for _, _, dynamo, frozen in states)


def test_pool_spawns_its_workers_where_nothing_forks(monkeypatch):
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    with local_pool.start_pool(1) as pool:
        _, parent, _, frozen = pool.submit(_worker_state).result()
    assert parent == os.getpid() and frozen > TORCH_OBJECTS


def test_console_runs_main_then_freezes_what_is_alive(tmp_path):
    """`cli.console`, the entry of the processes that end with the CLI, returns main's status and leaves the
    objects still alive frozen, so that the interpreter's exit skips them."""
    code = ("import gc, sys; from phasediagram import cli; s = cli.console(sys.argv[1:]); "
            "print(s, gc.get_freeze_count())")
    argv = ["--preset", "demo", "--metrics", "train", "--root", str(tmp_path)]
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stdout.split()
    assert out[-2] == "0" and int(out[-1]) > TORCH_OBJECTS
    assert (tmp_path / "bash_scripts" / "demo" / "train.sh").is_file()


def test_in_forked_process_returns_the_childs_result():
    wait = runtime.in_forked_process(_where_and_what, 21)
    pid, value = wait()
    assert value == 42 and pid != os.getpid()


def test_in_forked_process_reraises_the_childs_exception():
    wait = runtime.in_forked_process(_fails, 7)
    with pytest.raises(ValueError, match="bad value 7"):
        wait()


def test_in_forked_process_runs_here_when_the_child_dies():
    assert runtime.in_forked_process(_dies_in_a_child, 1)() == 2


def test_in_forked_process_runs_here_where_nothing_forks(monkeypatch):
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    pid, value = runtime.in_forked_process(_where_and_what, 1)()
    assert (pid, value) == (os.getpid(), 2)


def _note_pid_then_return(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    return 1


def _start_then_die(path):
    runtime.in_forked_process(_note_pid_then_return, path)
    os._exit(0)  # as if killed: never waits for the child


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_until_gone(pids, seconds: float = 30) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _running(p)]


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_in_forked_process_child_exits_when_its_parent_died(tmp_path):
    path = tmp_path / "pid"
    parent = multiprocessing.get_context("fork").Process(target=_start_then_die, args=(str(path),))
    parent.start()
    parent.join(30)
    deadline = time.monotonic() + 30
    while not (path.exists() and path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(path.read_text())
    assert _wait_until_gone([pid], deadline - time.monotonic()) == []


# A pool's owner (a script without a main guard) that prints its workers' pids, then sleeps until it is killed.
POOL_OWNER = textwrap.dedent("""
    import multiprocessing, time
    from phasediagram.execution import local_pool

    pool = local_pool.start_pool(2)  # its workers start here
    print(*sorted(p.pid for p in multiprocessing.active_children()), flush=True)
    time.sleep(600)
""")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_pool_workers_exit_when_their_owner_is_killed(tmp_path):
    """A SIGKILLed owner cannot shut its pool down; its idle workers end by themselves (`exit_with`)
    instead of waiting for tasks forever."""
    script = tmp_path / "owner.py"
    script.write_text(POOL_OWNER)
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in owner.stdout.readline().split()]
        assert len(workers) == 2 and all(_running(p) for p in workers)
    finally:
        owner.kill()
        owner.wait()
    assert _wait_until_gone(workers) == []


# `exit_with(pid)` (by a pidfd, or by polling without one), then sleeps.
WATCHER = textwrap.dedent("""
    import os, sys, time
    from phasediagram.execution import runtime

    if sys.argv[1] == "poll":
        del os.pidfd_open
    runtime.exit_with(int(sys.argv[2]), poll_seconds=0.05)
    print("watching", flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("how", ["pidfd", "poll"])
def test_exit_with_ends_this_process_when_the_other_ends(tmp_path, how):
    script = tmp_path / "watcher.py"
    script.write_text(WATCHER)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    watcher = subprocess.Popen([sys.executable, str(script), how, str(sleeper.pid)], stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline().strip() == "watching"
        time.sleep(0.3)
        assert watcher.poll() is None  # still waiting while the other process runs
        sleeper.kill()
        sleeper.wait()
        assert watcher.wait(timeout=30) == 1
    finally:
        sleeper.kill()
        watcher.kill()
        sleeper.wait()
        watcher.wait()


def _divide_by_zero():
    from phasediagram.execution.failures import attempt

    return attempt("train:c", lambda: 1 / 0)


def test_one_failure_rule_for_every_executor():
    """`attempt`: a job's value, or a `JobFailure` naming the job and the exception with its traceback,
    which reaches a pool's owner whole; bad input propagates."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from phasediagram.errors import CorruptFile, SpecError
    from phasediagram.execution.failures import JobFailure, attempt

    assert attempt("train:c", lambda: "done") == "done"
    failure = _divide_by_zero()
    assert isinstance(failure, JobFailure) and str(failure) == "train:c: ZeroDivisionError: division by zero"
    assert "ZeroDivisionError" in failure.trace and isinstance(failure.cause, ZeroDivisionError)
    with ProcessPoolExecutor(1, mp_context=get_context("fork")) as pool:  # as a pool worker's result
        again = pool.submit(_divide_by_zero).result()
    assert str(again) == str(failure) and again.trace and again.job_id == "train:c"
    for bad in (SpecError("x", "bad"), CorruptFile("/f", "cut")):
        with pytest.raises(type(bad)):
            attempt("train:c", lambda bad=bad: (_ for _ in ()).throw(bad))
    assert isinstance(attempt("train:c", lambda: (_ for _ in ()).throw(SpecError("x", "bad")), fatal=()), JobFailure)
