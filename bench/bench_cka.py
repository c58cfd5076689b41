"""Linear CKA of two representations: ours against numpy's Gram and feature forms and torch-cka.

Two cases, X and Y = tanh(X) + 0.5 noise of the same shape, float32 as activations are:

- "wide": n = 768 examples (the metric's 6 x 128) of d = 4096 features (a hidden layer): fewer
  examples than features, where `linear_cka` takes the Gram form;
- "tall": n = 4096 examples of d = 128 features: where it takes the feature form.

Arms: `linear_cka` (method "auto", biased and debiased), our other form forced; numpy, in float64
on float64 copies made beforehand, by the formulas of Kornblith et al.'s demo (the Gram form
H K H with K = X X^T, its U-centred debiased form, and the feature form ||Yc^T Xc||^2 / ...);
torch-cka 0.21 (`CKA(...).compare`, the minibatch HSIC_1 of Nguyen et al. on float32: one batch of
all n examples in "wide", i.e. the debiased CKA, and batches of 512 in "tall"), skipped with a note
when it is not installed (`pip install --no-deps torch-cka`).

Each arm runs in a fresh process with one thread (torch and BLAS), its inputs made first:

- time: perf_counter median of `--repeats` calls after one untimed call;
- peak memory: the process's peak resident set during the first call (VmHWM of /proc/self/status,
  reset to the current resident set just before it by writing 5 to /proc/self/clear_refs) less its
  resident set then, which covers torch's and numpy's allocations alike (glibc's mmap threshold is
  fixed at 128 KiB, MALLOC_MMAP_THRESHOLD_, so that freed large blocks leave the resident set
  rather than serve the call unseen);
- for the numpy arms also tracemalloc's peak of the call (numpy reports its arrays to tracemalloc;
  torch does not).

    python bench/bench_cka.py
    python bench/bench_cka.py --repeats 5
    python bench/bench_cka.py --write-docs   # also writes its table into docs/performance.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASES = {"wide": (768, 4096), "tall": (4096, 128)}
ARMS = ("ours auto", "ours auto debiased", "ours other form", "numpy gram", "numpy gram debiased",
        "numpy feature", "torch-cka")
TORCH_CKA_BATCH = {"wide": 768, "tall": 512}


def inputs(case: str):
    import torch

    n, d = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = torch.tanh(x).add_(torch.randn(n, d, generator=g), alpha=0.5)
    return x, y


def numpy_gram_cka(x, y, debiased: bool) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K, L centred by H (biased) or U-centred (debiased)."""
    import numpy as np

    def centre(k):
        n = len(k)
        if debiased:
            np.fill_diagonal(k, 0.0)
            m = k.sum(0) / (n - 2)
            m -= m.sum() / (2 * (n - 1))
        else:
            m = k.mean(0)
            m -= m.mean() / 2
        k -= m[:, None]
        k -= m[None, :]
        if debiased:
            np.fill_diagonal(k, 0.0)
        return k

    k, l_ = centre(x @ x.T), centre(y @ y.T)
    return float(k.ravel() @ l_.ravel() / (np.linalg.norm(k) * np.linalg.norm(l_)))


def numpy_feature_cka(x, y) -> float:
    """||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    import numpy as np

    xc, yc = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


def torch_cka_value(x, y, batch: int) -> float:
    import warnings

    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from torch_cka import CKA

    class Rows(torch.nn.Module):  # maps example indices to that representation's rows
        def __init__(self, rows):
            super().__init__()
            self.rows = rows

        def forward(self, idx):
            return self.rows[idx]

    loader = DataLoader(TensorDataset(torch.arange(len(x))), batch_size=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cka = CKA(Rows(x), Rows(y), model1_name="x", model2_name="y")
        cka.compare(loader, loader)
    return float(cka.hsic_matrix[0, 0])


def arm_call(case: str, arm: str):
    """(the function the arm times, whether its allocations go through numpy)."""
    import numpy as np

    from phasediagram.metrics.cka import choose_form, linear_cka

    x, y = inputs(case)
    other = "feature" if choose_form(x.shape[1], y.shape[1], len(x)) == "gram" else "gram"
    if arm.startswith("numpy"):
        xn, yn = x.double().numpy().copy(), y.double().numpy().copy()
        fns = {"numpy gram": lambda: numpy_gram_cka(xn, yn, False),
               "numpy gram debiased": lambda: numpy_gram_cka(xn, yn, True),
               "numpy feature": lambda: numpy_feature_cka(xn, yn)}
        del x, y
        return fns[arm], True
    fns = {"ours auto": lambda: linear_cka(x, y), "ours auto debiased": lambda: linear_cka(x, y, debiased=True),
           "ours other form": lambda: linear_cka(x, y, method=other),
           "torch-cka": lambda: torch_cka_value(x, y, TORCH_CKA_BATCH[case])}
    assert np is not None
    return fns[arm], False


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def child(case: str, arm: str, repeats: int) -> None:
    """Run one arm in this (fresh) process and print its figures as JSON."""
    import gc
    import statistics
    import time
    import tracemalloc

    import torch

    torch.set_num_threads(1)
    fn, is_numpy = arm_call(case, arm)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak resident set := resident set now
    before = status_kib("VmRSS")
    value = fn()
    peak_kib = status_kib("VmHWM") - before
    traced = None
    if is_numpy:
        tracemalloc.start()
        fn()
        traced = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.stop()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    print(json.dumps({"value": value, "seconds": statistics.median(times), "rss_mib": peak_kib / 1024,
                      "traced_mib": traced}))


def run_arm(case: str, arm: str, repeats: int) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.run([sys.executable, __file__, "--child", case, arm, "--repeats", str(repeats)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{case} / {arm} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("CASE", "ARM"), help=argparse.SUPPRESS)
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/performance.md")
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child, args.repeats)
        return
    import importlib.util

    import report  # bench/report.py: bench/ is the script's folder, so on sys.path

    from phasediagram.metrics.cka import choose_form

    arms = list(ARMS)
    note = ""
    if importlib.util.find_spec("torch_cka") is None:
        arms.remove("torch-cka")
        note = "torch-cka is not installed (pip install --no-deps torch-cka): its arm is skipped."
        print(note)
    rows = []
    for case, (n, d) in CASES.items():
        form = choose_form(d, d, n)
        other = "feature" if form == "gram" else "gram"
        print(f"{case}: n {n}, d {d}; linear_cka takes the {form} form; one thread, median of {args.repeats}")
        print(f"  {'arm':<30} {'CKA':>10} {'time (s)':>9} {'peak RSS (MiB)':>15} {'tracemalloc (MiB)':>18}")
        for arm in arms:
            res = run_arm(case, arm, args.repeats)
            label = {"ours auto": f"linear_cka ({form})", "ours auto debiased": f"linear_cka debiased ({form})",
                     "ours other form": f"linear_cka, {other} form forced",
                     "torch-cka": f"torch-cka, minibatches of {TORCH_CKA_BATCH[case]}"}.get(arm, arm)
            traced = "" if res["traced_mib"] is None else f"{res['traced_mib']:.1f}"
            print(f"  {label:<30} {res['value']:10.6f} {res['seconds']:9.3f} {res['rss_mib']:15.1f} {traced:>18}")
            rows.append([f"{case} ({n} x {d})", label, f"{res['value']:.6f}", f"{res['seconds']:.3f}",
                         f"{res['rss_mib']:.1f}", traced])
    if args.write_docs:
        report.write_section("cka", report.command(__file__, argv), (
            f"One thread, each arm in a fresh process; time: median of {args.repeats} calls after one; peak RSS: "
            "the peak resident set of the first call less the resident set before it (torch and numpy alike); tracemalloc: "
            "numpy's own arrays. numpy in float64 on float64 copies, ours float32 in, float64 inside.\n\n"
            + report.table(["case (n x d)", "arm", "CKA", "time (s)", "peak RSS (MiB)", "tracemalloc (MiB)"], rows)
            + (f"\n\n{note}" if note else "")))


if __name__ == "__main__":
    main()
