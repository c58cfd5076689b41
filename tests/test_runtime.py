"""Process settings of job-running processes (`runtime`): threads and glibc's malloc thresholds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from phasediagram import runtime

# In a fresh interpreter: minor page faults of 40 rounds of malloc + touch + free of 3, 5 and 1 MiB
# blocks (what a training step does with activations), before and after `keep_freed_memory`.
PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, resource
    from phasediagram.runtime import keep_freed_memory
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
