"""Linear CKA of two representations: ours against numpy's Gram and feature forms and torch-cka.

Two cases, X and Y = tanh(X) + 0.5 noise of the same shape, float32 as activations are:

- "wide": n = 768 examples (the metric's 6 x 128) of d = 4096 features (a hidden layer): fewer
  examples than features, where `linear_cka` takes the Gram form;
- "tall": n = 4096 examples of d = 128 features: where it takes the feature form.

No model: X is Gaussian, Y = tanh(X) + 0.5 noise, standing for two networks' activations.

Arms: `linear_cka` (method "auto", biased and debiased, on the float32 inputs; biased also on
float64 copies made beforehand), our other form forced; numpy, in float64 by the formulas of
Kornblith et al.'s demo (the Gram form H K H with K = X X^T, its U-centred debiased form, and the
feature form ||Yc^T Xc||^2 / ...), on float64 copies made beforehand and (Gram form) on the
float32 inputs converted inside the call, as `linear_cka` converts them;
torch-cka 0.21 (`CKA(...).compare`, the minibatch HSIC_1 of Nguyen et al. on float32: one batch of
all n examples in "wide", i.e. the debiased CKA, and batches of 512 in "tall"), skipped with a note
when it is not installed (`pip install --no-deps torch-cka`).

One thread (torch and BLAS) everywhere, inputs made first:

- time: all arms of a case in one process, alternating: `--repeats` rounds, each arm once per
  round in rotating order (after one untimed call each), a round's time of an arm being the mean
  of as many calls as fill 0.2 s; printed: the median over the rounds, and each arm's time over
  numpy's Gram form (float64 copies) as the median over the rounds of that round's ratio;
- peak memory, each arm in a fresh process: the peak resident set during its first call (VmHWM of /proc/self/status,
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
ARMS = ("ours auto", "ours auto, float64 in", "ours auto debiased", "ours other form", "numpy gram",
        "numpy gram, float32 in", "numpy gram debiased", "numpy feature", "torch-cka")
BASE = "numpy gram"  # the arm every time is compared with
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


def arm_fns(case: str, arms) -> dict:
    """arm -> (the function it times, whether its allocations go through numpy), on one shared pair of inputs."""
    from phasediagram.metrics.cka import choose_form, linear_cka

    x, y = inputs(case)
    other = "feature" if choose_form(x.shape[1], y.shape[1], len(x)) == "gram" else "gram"
    xd, yd = x.double(), y.double()
    xn, yn = xd.numpy(), yd.numpy()
    x32, y32 = x.numpy(), y.numpy()
    fns = {"ours auto": (lambda: linear_cka(x, y), False),
           "ours auto, float64 in": (lambda: linear_cka(xd, yd), False),
           "ours auto debiased": (lambda: linear_cka(x, y, debiased=True), False),
           "ours other form": (lambda: linear_cka(x, y, method=other), False),
           "numpy gram": (lambda: numpy_gram_cka(xn, yn, False), True),
           "numpy gram, float32 in": (lambda: numpy_gram_cka(x32.astype("float64"), y32.astype("float64"), False),
                                      True),
           "numpy gram debiased": (lambda: numpy_gram_cka(xn, yn, True), True),
           "numpy feature": (lambda: numpy_feature_cka(xn, yn), True),
           "torch-cka": (lambda: torch_cka_value(x, y, TORCH_CKA_BATCH[case]), False)}
    return {arm: fns[arm] for arm in arms}


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def child(case: str, arm: str) -> None:
    """Run one arm's first call in this (fresh) process and print its memory figures and value as JSON."""
    import gc
    import tracemalloc

    import torch

    torch.set_num_threads(1)
    fn, is_numpy = arm_fns(case, [arm])[arm]
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
    print(json.dumps({"value": value, "rss_mib": peak_kib / 1024, "traced_mib": traced}))


def child_times(case: str, arms: list[str], rounds: int) -> None:
    """Time all `arms` of `case` in this process, alternating, and print arm -> each round's seconds as JSON."""
    import time

    import torch

    torch.set_num_threads(1)
    fns = arm_fns(case, arms)
    for fn, _ in fns.values():
        fn()
    times = {arm: [] for arm in arms}
    for r in range(rounds):
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            fn, calls, start = fns[arm][0], 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - start < 0.2:
                fn()
                calls += 1
            times[arm].append((time.perf_counter() - start) / calls)
    print(json.dumps(times))


def run_child(args: list[str]):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="rounds of the alternating timing")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "ARM"), help=argparse.SUPPRESS)
    ap.add_argument("--child-times", nargs="+", metavar="CASE_AND_ARMS", help=argparse.SUPPRESS)
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/performance.md")
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return
    if args.child_times:
        child_times(args.child_times[0], args.child_times[1:], args.repeats)
        return
    import importlib.util
    import statistics

    import report  # bench/report.py: bench/ is the script's folder, so on sys.path

    from phasediagram.metrics.cka import choose_form

    arms = list(ARMS)
    note = ""
    if importlib.util.find_spec("torch_cka") is None:
        arms.remove("torch-cka")
        note = "torch-cka is not installed (pip install --no-deps torch-cka): its arm is skipped."
        print(note)
    rows, summary = [], []
    for case, (n, d) in CASES.items():
        form = choose_form(d, d, n)
        other = "feature" if form == "gram" else "gram"
        times = run_child(["--child-times", case, *arms, "--repeats", str(args.repeats)])
        ratio = {arm: statistics.median(a / b for a, b in zip(times[arm], times[BASE])) for arm in arms}
        print(f"{case}: n {n}, d {d}; linear_cka takes the {form} form; one thread, {args.repeats} alternating rounds")
        print(f"  {'arm':<40} {'CKA':>10} {'time (s)':>9} {'/ numpy gram':>13} {'peak RSS (MiB)':>15} "
              f"{'tracemalloc (MiB)':>18}")
        for arm in arms:
            res = run_child(["--child", case, arm])
            label = {"ours auto": f"linear_cka ({form})", "ours auto, float64 in": f"linear_cka ({form}), float64 in",
                     "ours auto debiased": f"linear_cka debiased ({form})",
                     "ours other form": f"linear_cka, {other} form forced",
                     "numpy gram": "numpy gram (float64 copies)",
                     "numpy gram debiased": "numpy gram debiased (float64 copies)",
                     "numpy feature": "numpy feature (float64 copies)",
                     "torch-cka": f"torch-cka, minibatches of {TORCH_CKA_BATCH[case]}"}.get(arm, arm)
            seconds = statistics.median(times[arm])
            traced = "" if res["traced_mib"] is None else f"{res['traced_mib']:.1f}"
            print(f"  {label:<40} {res['value']:10.6f} {seconds:9.4f} {ratio[arm]:12.2f}x {res['rss_mib']:15.1f} "
                  f"{traced:>18}", flush=True)
            rows.append([f"{case} ({n} x {d})", label, f"{res['value']:.6f}", f"{seconds:.4f}", f"{ratio[arm]:.2f}x",
                         f"{res['rss_mib']:.1f}", traced])
        same = statistics.median(a / b for a, b in zip(times["ours auto"], times["numpy gram, float32 in"]))
        summary.append(f"{case}: linear_cka / numpy's Gram form on the same inputs: **{same:.2f}x** (float32 in, both "
                       f"converting), **{ratio['ours auto, float64 in']:.2f}x** (float64 in); on float32 against "
                       f"numpy's on float64 copies made beforehand: {ratio['ours auto']:.2f}x.")
        print("  " + summary[-1].replace("**", ""))
    if args.write_docs:
        report.write_section("cka", report.command(__file__, argv), (
            "No model: X (n x d) Gaussian and Y = tanh(X) + 0.5 noise, float32, standing for two networks' activations. "
            f"One thread; time: all arms of a case in one process, {args.repeats} alternating rounds, median; "
            "/ numpy gram: the median over the rounds of the arm's time over numpy's Gram form on float64 copies made "
            "beforehand; peak RSS: each arm in a fresh process, the peak resident set of its first call less the "
            "resident set before it (torch and numpy alike); tracemalloc: numpy's own arrays. numpy in float64; ours "
            "float32 in (unless marked), float64 inside.\n\n"
            + report.table(["case (n x d)", "arm", "CKA", "time (s)", "/ numpy gram", "peak RSS (MiB)",
                            "tracemalloc (MiB)"], rows)
            + "\n\n" + "\n\n".join(summary) + (f"\n\n{note}" if note else "")))


if __name__ == "__main__":
    main()
