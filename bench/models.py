"""Training-step throughput of cnnmodels against torchvision's same architecture.

One training step = forward, cross-entropy, backward and an SGD (momentum) step. For every architecture
both implementations run in the same process with identical weights, interleaved round by round (ours
first in even rounds, torchvision first in odd ones, an even number of rounds) so that machine noise hits both
alike; the table reports the median images/s of each, the ratio (the median over pairs of rounds of the
geometric mean of the pair's two ratios: whichever goes first measures slower here, and a pair holds each order
once), and whether one training step of
each calls the same ATen kernels on the same shapes (counted on meta tensors; if so, any ratio off 1.0 is
measurement noise).

    python bench/models.py                          # every shared architecture at 32 px, families at 224 px
    python bench/models.py --models resnet50 vgg16_bn --sizes 224 --rounds 7
    python bench/models.py --models densenet201 --sizes 32 --noise-floor   # torchvision against itself
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import pandas as pd
import torch
import torchvision

import cnnmodels
from cnnmodels import training_step_kernels

SHARED = [
    "alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "googlenet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "densenet121", "densenet161", "densenet169", "densenet201",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
]
FAMILY_REPRESENTATIVES = ["alexnet", "vgg11_bn", "googlenet", "resnet18", "resnet50", "densenet121", "efficientnet_b0"]
DEFAULT_BATCH = {32: 64, 224: 8}


def default_batch(size: int) -> int:
    """64 images up to 64 px, 8 above (a step at 224 px fits a 2-core machine's cache and memory at 8)."""
    return DEFAULT_BATCH.get(size, 64 if size <= 64 else 8)


def build_pair(name: str, num_classes: int = 10, same: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(cnnmodels, torchvision) with identical weights; ``same``: two torchvision copies (the noise floor)."""
    if same:
        first = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        second = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        second.load_state_dict(first.state_dict())
        return first, second
    if name == "googlenet":
        ours = cnnmodels.create_model(name, num_classes=num_classes, torchvision_compat=True)
        theirs = torchvision.models.get_model(name, weights=None, num_classes=num_classes, init_weights=True)
    else:
        ours = cnnmodels.create_model(name, num_classes=num_classes)
        theirs = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    ours.load_state_dict(theirs.state_dict())  # identical weights: identical arithmetic, fair timing
    return ours, theirs


def step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        # Works for plain logits and for both libraries' GoogLeNetOutputs (same field names).
        loss = cnnmodels.googlenet_loss(model(x), y)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def measure(name: str, size: int, batch: int, rounds: int, steps: int, same: bool = False) -> dict:
    torch.manual_seed(0)
    ours, theirs = build_pair(name, same=same)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    step_seconds(ours, x, y, 1)  # warm-up (allocator, oneDNN primitive caches)
    step_seconds(theirs, x, y, 1)
    ours_ips, theirs_ips = [], []
    for i in range(rounds + rounds % 2):  # whole pairs: each order as often
        # Alternate which one goes first (ABBA): the first of a pair measures systematically slower here.
        pair = [(ours, ours_ips), (theirs, theirs_ips)]
        for model, results in pair if i % 2 == 0 else reversed(pair):
            results.append(batch / step_seconds(model, x, y, steps))
    o, t = statistics.median(ours_ips), statistics.median(theirs_ips)
    # Per-round ratios: the two halves of a round see the same machine state, so slow drifts of this shared
    # machine cancel (a ratio of the two medians would keep them). Per pair of rounds, the geometric mean: the
    # first-position penalty is in one ratio's numerator and the other's denominator, so it cancels too (a
    # median over an odd number of rounds fell on the order that had one round more).
    rounds_ratios = [a / b for a, b in zip(ours_ips, theirs_ips, strict=True)]
    ratio = statistics.median(math.sqrt(first * second)
                              for first, second in zip(rounds_ratios[::2], rounds_ratios[1::2], strict=True))
    # Equal kernel counts mean equal work: a ratio off 1.0 is then noise, not the implementation.
    same = training_step_kernels(ours, (3, size, size)) == training_step_kernels(theirs, (3, size, size))
    return {"model": name, "input": f"{size}x{size}", "batch": batch, "cnnmodels img/s": round(o, 1),
            "torchvision img/s": round(t, 1), "ratio": round(ratio, 3), "same kernels": "yes" if same else "NO"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="architectures (default: all shared at 32 px, "
                        "one per family at 224 px)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 224])
    parser.add_argument("--batch", type=int, help="batch size (default: 64 up to 64 px, 8 above)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds, "
                        "rounded up to an even number (pairs of both orders)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--noise-floor", action="store_true",
                        help="time torchvision against a copy of itself: how far from 1.0 noise alone moves a ratio")
    args = parser.parse_args()

    shared = set(torchvision.models.list_models()) & set(cnnmodels.list_models())
    if unknown := [name for name in args.models or [] if name not in shared]:
        parser.error(f"--models: {', '.join(unknown)} is not both a cnnmodels and a torchvision model "
                     f"(shared: {', '.join(sorted(shared))})")
    for option in ("rounds", "steps"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    if args.batch is not None and args.batch < 2:
        parser.error("--batch must be at least 2 (batch norm needs two values per channel to train)")
    rows = []
    for size in args.sizes:
        names = args.models or (SHARED if size <= 64 else FAMILY_REPRESENTATIVES)
        for name in names:
            smallest = cnnmodels.create_model(name, num_classes=10).min_input_size
            if size < smallest:
                print(f"  {name:<16} skipped at {size}x{size}: the ImageNet layout needs >= {smallest} px", flush=True)
                continue
            row = measure(name, size, args.batch or default_batch(size), args.rounds, args.steps,
                          same=args.noise_floor)
            rows.append(row)
            print(f"  {row['model']:<16} {row['input']:>8}  ours {row['cnnmodels img/s']:>8}  "
                  f"torchvision {row['torchvision img/s']:>8}  ratio {row['ratio']:.3f}  "
                  f"same kernels {row['same kernels']}", flush=True)
    if not rows:
        raise SystemExit("nothing measured: every model was skipped at the given --sizes")
    table = pd.DataFrame(rows)
    first, second = "cnnmodels", "torchvision"
    if args.noise_floor:  # both columns are torchvision's: headed as what they are, in the table and the summary
        first, second = "torchvision copy A", "torchvision copy B"
        table = table.rename(columns={"cnnmodels img/s": f"{first} img/s", "torchvision img/s": f"{second} img/s"})
    print()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads")
    if args.noise_floor:
        print("noise floor: both columns are torchvision's model (identical copies); ratios show the noise")
    print(table.to_markdown(index=False) if args.markdown else table.to_string(index=False))
    print(f"\nmedian ratio ({first} / {second}): {table['ratio'].median():.3f}; "
          f"min {table['ratio'].min():.3f} ({table.loc[table['ratio'].idxmin(), 'model']})"
          + ("" if args.noise_floor else
             f"; same kernels as torchvision: {(table['same kernels'] == 'yes').sum()} of {len(table)}"))


if __name__ == "__main__":
    main()
