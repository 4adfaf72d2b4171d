"""Parameter and multiply-add counting, and the kernels a training step runs.

MACs follow torchvision's ``_ops`` convention: multiply-adds of convolutions and linear layers only (batch
norm, activations, pooling, additions and the SE gate's multiplication are not counted), for one image.

Command line::

    python -m cnnmodels.profile resnet50                      # per-stage table at 3x224x224
    python -m cnnmodels.profile resnet18 --input-size 1 32 32 --small-input --num-classes 10
    python -m cnnmodels.profile --inception-example           # the GoogLeNet tutorial's naive vs reduced module
"""

from __future__ import annotations

import argparse
import collections
import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["Profile", "StageProfile", "profile", "inception_example", "training_step_kernels"]


@dataclass(frozen=True)
class StageProfile:
    """Parameters and MACs of one stage (a top-level child, or a child of ``features``)."""

    name: str
    params: int
    macs: int
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """Totals and per-stage breakdown of a model at one input size. ``params`` counts every parameter of the
    module (GoogLeNet with its auxiliary heads: 13.0 M); ``inference_params`` those of the modules an eval
    forward pass runs (GoogLeNet 6.6 M, torchvision's published ``num_params``: what a served model computes
    with), the same for models without training-only branches."""

    params: int
    macs: int
    input_size: tuple[int, ...]
    stages: list[StageProfile] = field(default_factory=list)
    inference_params: int = 0

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def table(self) -> str:
        """A plain-text table with one row per stage and a total row."""
        rows = [("stage", "output", "params", "MACs", "% MACs")]
        for s in self.stages:
            share = 100.0 * s.macs / self.macs if self.macs else 0.0
            shape = "x".join(str(d) for d in s.output_shape)
            rows.append((s.name, shape, f"{s.params:,}", f"{s.macs:,}", f"{share:.1f}"))
        rows.append(("total", "", f"{self.params:,}", f"{self.macs:,}", "100.0"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for i, row in enumerate(rows):
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])] + [
                c.rjust(w) for c, w in zip(row[2:], widths[2:], strict=True)
            ]
            lines.append("  ".join(cells))
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _stage_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    stages = []
    for name, child in model.named_children():
        if name == "features" and isinstance(child, nn.Sequential):
            stages.extend((f"features.{n}", c) for n, c in child.named_children())
        else:
            stages.append((name, child))
    return stages


def _macs_of(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        return output.numel() // output.shape[0] * per_output
    if isinstance(module, nn.Linear):
        return output.numel() // output.shape[0] * module.in_features
    return 0


@torch.no_grad()
def profile(model: nn.Module, input_size: tuple[int, ...] | None = None) -> Profile:
    """Count parameters and conv + linear multiply-adds of ``model`` for one ``input_size`` image (C, H, W;
    default 224x224 in the model's own channels, the usual ImageNet size; a model that cannot take 224 px,
    LeNet-5, at its own ``default_input_size``). ``python -m cnnmodels.profile`` and the README's model table
    use each model's ``default_input_size`` instead (EfficientNet-B1's 240 px: 0.687 GMACs, against 0.570 at
    224; a small-input model's 32 px), as torchvision's numbers do: pass it for those.

    The model runs once in eval mode (so training-only branches such as GoogLeNet's auxiliary heads add no
    MACs, as in torchvision's numbers, nor ``inference_params``) on a zero tensor on the model's device; its mode
    is restored.
    """
    if input_size is None:  # (a 1-channel model failed on a 3-channel default)
        default = tuple(getattr(model, "default_input_size", (3, 224, 224)))
        # 224 px, unless the model cannot take it (LeNet-5's 32-35 px): its own size then
        largest = getattr(model, "max_input_size", None)
        input_size = (default[0], 224, 224) if largest is None or largest >= 224 else default
    if any(size < 0 for size in input_size):  # (torch.zeros' own error named no model and no option)
        raise ValueError(f"input_size holds a negative size: {tuple(input_size)}")
    stages = _stage_modules(model)
    module_to_stage: dict[nn.Module, str] = {}
    for stage_name, stage in stages:
        for m in stage.modules():
            module_to_stage.setdefault(m, stage_name)
    stage_macs = {name: 0 for name, _ in stages}
    stage_shapes: dict[str, tuple[int, ...]] = {}
    total = [0]

    def count(module, inputs, output):
        macs = _macs_of(module, inputs, output)
        total[0] += macs
        stage = module_to_stage.get(module)
        if stage is not None:
            stage_macs[stage] += macs

    def record_shape(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                stage_shapes[name] = tuple(output.shape[1:])

        return hook

    ran: set[nn.Module] = set()
    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles += [stage.register_forward_hook(record_shape(name)) for name, stage in stages]
    handles += [m.register_forward_hook(lambda module, inputs, output: ran.add(module)) for m in model.modules()]
    # Every module's own mode: model.train(was_training) would unfreeze a partly frozen model (BN kept in eval
    # mode for fine-tuning) and start its running statistics moving.
    modes = {module: module.training for module in model.modules()}
    try:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = parameter.dtype if parameter is not None else torch.float32
        model.eval()
        model(torch.zeros((1, *input_size), device=device, dtype=dtype))
    finally:
        for module, training in modes.items():
            module.training = training
        for h in handles:
            h.remove()
    stage_profiles = [
        StageProfile(name, sum(p.numel() for p in stage.parameters()), stage_macs[name], stage_shapes.get(name, ()))
        for name, stage in stages
    ]
    params = sum(p.numel() for p in model.parameters())
    used = {id(p): p.numel() for module in ran for p in module.parameters(recurse=False)}  # (shared ones once)
    return Profile(params=params, macs=total[0], input_size=tuple(input_size), stages=stage_profiles,
                   inference_params=sum(used.values()))


class _KernelRecorder(TorchDispatchMode):
    """Counts every ATen kernel call together with the shapes it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[tuple[str, tuple]] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        self.calls[(str(func.overloadpacket), shapes)] += 1
        return out


def training_step_kernels(model: nn.Module, input_size: tuple[int, ...] = (3, 64, 64),
                          batch_size: int = 2) -> collections.Counter[tuple[str, tuple]]:
    """The ATen kernels one training step (forward, cross-entropy, backward) calls, with their output shapes.

    Runs on meta tensors (a copy of ``model`` moved to the meta device), so no arithmetic is done and even
    the largest models take about a second. Two implementations with equal counters do the same work: any
    throughput difference between them is measurement noise.
    """
    from ..googlenet import googlenet_loss  # handles plain logits and GoogLeNet's aux outputs alike

    # Always a copy (of a meta model too: cheap): training the caller's model gave it .grad tensors, so a second
    # count of the same model recorded gradient accumulation the first had not, and left it in train mode.
    model = copy.deepcopy(model).to("meta")
    model.train()
    x = torch.randn(batch_size, *input_size, device="meta")
    y = torch.zeros(batch_size, dtype=torch.long, device="meta")
    with _KernelRecorder() as recorder:
        googlenet_loss(model(x), y).backward()
    return recorder.calls


def inception_example() -> tuple[Profile, Profile]:
    """The worked example of the GoogLeNet tutorial ("Image Classification (2): GoogLeNet, ResNet, DenseNet,
    SENet, EfficientNet"): one inception module on a 28x28x256 input with 128 1x1, 192 3x3
    and 96 5x5 filters, naive (Fig. 2a) and with 64-channel 1x1 reductions and pool projection (Fig. 2b)."""
    from ..googlenet import Inception

    naive = Inception(256, 128, 0, 192, 0, 96, 0, naive=True)
    reduced = Inception(256, 128, 64, 192, 64, 96, 64)
    return profile(naive, (256, 28, 28)), profile(reduced, (256, 28, 28))


def _format_inception_example() -> str:
    naive, reduced = inception_example()
    labels = {"branch1": "1x1 conv", "branch2": "3x3 conv", "branch3": "5x5 conv", "branch4": "3x3 max-pool"}
    reduced_labels = {
        "branch1": "1x1 conv",
        "branch2": "1x1 reduce (64) + 3x3 conv",
        "branch3": "1x1 reduce (64) + 5x5 conv",
        "branch4": "3x3 max-pool + 1x1 proj (64)",
    }
    lines = ["Inception module on a 28x28x256 input (filters: 1x1 128, 3x3 192, 5x5 96)", ""]
    sections = (("naive (Fig. 2a)", naive, labels), ("dimension-reduced (Fig. 2b)", reduced, reduced_labels))
    for title, prof, names in sections:
        lines.append(f"{title}: output 28x28x{_out_channels(prof)}")
        width = max(len(v) for v in names.values())
        for stage in prof.stages:
            if stage.name in names:
                lines.append(f"  {names[stage.name].ljust(width)}  {stage.macs:>15,} multiply-adds")
        lines.append(f"  {'total'.ljust(width)}  {prof.macs:>15,} multiply-adds")
        lines.append("")
    lines.append(f"reduction: {naive.macs:,} / {reduced.macs:,} = {naive.macs / reduced.macs:.2f}x")
    lines.append(
        "(The tutorial's worked figure for the dimension-reduced module, \"Image Classification (2): GoogLeNet, "
        "ResNet, DenseNet, SENet, EfficientNet\", prints 271,350,808 because it adds its 5x5 path "
        "12,845,056 + 120,422,400 as 133,266,456; the correct sum is 133,267,456.)"
    )
    return "\n".join(lines)


def _out_channels(prof: Profile) -> int:
    return sum(s.output_shape[0] for s in prof.stages if s.output_shape)


def main(argv: list[str] | None = None) -> int:
    from ..registry import create_model, list_models

    parser = argparse.ArgumentParser(prog="python -m cnnmodels.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help=f"model name, one of: {', '.join(list_models())}")
    parser.add_argument("--input-size", nargs=3, type=int, metavar=("C", "H", "W"),
                        help="input size (default: the model's own default input size)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--small-input", action="store_true", help="build the small-image variant")
    parser.add_argument("--inception-example", action="store_true",
                        help="reproduce the GoogLeNet tutorial's naive vs dimension-reduced inception module count")
    args = parser.parse_args(argv)
    if args.inception_example:
        print(_format_inception_example())
        return 0
    if not args.name:
        parser.error("give a model name or --inception-example")
    in_chans = args.input_size[0] if args.input_size else 3
    kwargs = {"small_input": True} if args.small_input else {}
    try:
        model = create_model(args.name, num_classes=args.num_classes, in_chans=in_chans, **kwargs)
    except (ValueError, TypeError) as err:
        parser.exit(2, f"error: {err}\n")
    input_size = tuple(args.input_size) if args.input_size else model.default_input_size
    try:
        prof = profile(model, input_size)
    except ValueError as err:  # an input size the model refuses (below its minimum, wrong channels)
        parser.exit(2, f"error: {err}\n")
    used = f" ({prof.inference_params:,} used at inference)" if prof.inference_params != prof.params else ""
    print(f"{args.name} at {'x'.join(map(str, input_size))}: {prof.params:,} parameters{used}, "
          f"{prof.macs:,} MACs ({prof.gmacs:.3f} G)")
    print(prof.table())
    return 0
