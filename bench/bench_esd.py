"""`esd_alpha` against WeightWatcher 0.7.7 (with powerlaw 1.5), layer by layer, at init and briefly trained.

Models (float32, seeded): the toolkit's `mlp` at widths 32 and 256 and `resnet1d` at widths 8 and 32
on MNIST-1D's (40,) inputs, a plain 40-512-256-128-10 MLP, and `resnet18` at width 8 on (3, 32, 32)
images; each at init and after `--steps` SGD steps (lr 0.05, momentum 0.9) on a fixed random batch
of 128 with random labels, in train mode. WeightWatcher reads no Conv1d, so it is given a copy of
each model whose Conv1d (out, in, k) are the Conv2d (out, in, k, 1) of the same weights: the rule
`esd_alpha` applies to Conv1d.

For each model: the layers read, the layers WeightWatcher fits (`analyze()` with its defaults, status
"success", alpha not its placeholder 0 or inf), whether `esd_alpha` fits the same layers, the largest
|alpha difference| over them, both weighted alphas (WeightWatcher's: the mean of its `alpha_weighted`
column over the layers it fits) and their difference. Exits 1 when a layer set differs or a
difference exceeds 1e-4.

    python bench/bench_esd.py
    python bench/bench_esd.py --steps 50
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
from contextlib import redirect_stdout

import torch
from torch import nn

from phasediagram.metrics.esd_alpha import ESDAlphaOptions, esd_alpha, weight_layers
from phasediagram.models import families

TOL = 1e-4
MNIST1D = (40,)
CIFAR = (3, 32, 32)
MODELS = (("mlp", 32, MNIST1D), ("mlp", 256, MNIST1D), ("resnet1d", 8, MNIST1D), ("resnet1d", 32, MNIST1D),
          ("plain MLP 40-512-256-128-10", None, MNIST1D), ("resnet18", 8, CIFAR))


def build(arch: str, width: int | None, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    if width is None:
        sizes = (40, 512, 256, 128, 10)
        layers = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
        return nn.Sequential(*layers[:-1])
    return families.create(arch, width, shape, 10)


def train(model: nn.Module, shape: tuple[int, ...], steps: int) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, *shape, generator=g), torch.randint(0, 10, (128,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def as_conv2d(model: nn.Module) -> nn.Module:
    """A copy of `model` with every Conv1d (out, in, k) replaced by the Conv2d (out, in, k, 1) of its weights."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv1d):
            conv = nn.Conv2d(module.in_channels, module.out_channels, (module.kernel_size[0], 1), bias=False)
            conv.weight.data = module.weight.data.unsqueeze(-1).clone()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, conv)
    return model


def weightwatcher_fits(model: nn.Module) -> tuple[dict[str, float], float]:
    """{layer name: alpha} of the layers WeightWatcher fits, and its mean alpha_weighted over them."""
    import weightwatcher

    with redirect_stdout(io.StringIO()):  # its small-N fit prints a line per layer
        details = weightwatcher.WeightWatcher(model=as_conv2d(model)).analyze()
    fitted = details[(details.status == "success") & (details.alpha > 0) & (details.alpha < float("inf"))]
    return dict(zip(fitted.longname, fitted.alpha)), float(fitted.alpha_weighted.mean())


def compare(model: nn.Module) -> dict:
    ww_alpha, ww_weighted = weightwatcher_fits(model)
    out = esd_alpha(model, None, ESDAlphaOptions(), None)
    names = [name for name, _ in weight_layers(model)]
    ours = {names[int(k.split("@")[1])]: v for k, v in out.items() if "esd_alpha_layer@" in k}
    common = sorted(set(ours) & set(ww_alpha))
    return {"read": len(names), "ww": len(ww_alpha), "same_layers": set(ours) == set(ww_alpha),
            "max_diff": max((abs(ours[n] - ww_alpha[n]) for n in common), default=0.0),
            "weighted": out.get("-/esd_alpha_weighted", float("nan")), "ww_weighted": ww_weighted}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="SGD steps of the trained models")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/performance.md")
    args = parser.parse_args()
    try:
        import weightwatcher  # noqa: F401
    except ImportError:
        print("weightwatcher is not installed (requirements-dev.txt: weightwatcher==0.7.7, powerlaw==1.5, safetensors)")
        return 0
    print(f"{'model':30s} {'state':7s} read fitted same  max|dalpha| weighted(ours) weighted(ww) |dweighted|")
    ok, rows = True, []
    for arch, width, shape in MODELS:
        label = arch if width is None else f"{arch} w{width}"
        for state in ("init", "trained"):
            model = build(arch, width, shape)
            if state == "trained":
                train(model, shape, args.steps)
            r = compare(model)
            dw = abs(r["weighted"] - r["ww_weighted"])
            ok &= r["same_layers"] and r["max_diff"] <= TOL and dw <= TOL
            print(f"{label:30s} {state:7s} {r['read']:4d} {r['ww']:6d} {str(r['same_layers']):5s} {r['max_diff']:11.2e} "
                  f"{r['weighted']:14.6f} {r['ww_weighted']:12.6f} {dw:11.2e}")
            rows.append([label, state, r["read"], r["ww"], r["same_layers"], f"{r['max_diff']:.1e}",
                         f"{r['weighted']:.6f}", f"{r['ww_weighted']:.6f}", f"{dw:.1e}"])
    verdict = "all within 1e-4 on the same layers" if ok else "DIFFERENCES beyond 1e-4 or different layers"
    print(verdict)
    if args.write_docs:
        import report  # bench/report.py: bench/ is the script's folder, so on sys.path

        report.write_section("esd", report.command(__file__), (
            "`esd_alpha` against weightwatcher 0.7.7's `analyze()` (powerlaw 1.5), per model at init and after "
            f"{args.steps} SGD steps: layers read, layers weightwatcher fits, whether ours fits the same ones, the "
            f"largest alpha difference over them and both weighted alphas; {verdict}.\n\n"
            + report.table(["model", "state", "layers read", "fitted (ww)", "same layers", "max abs d alpha",
                            "weighted (ours)", "weighted (ww)", "abs d weighted"], rows)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
