"""DenseNet-BC (Huang, Liu, van der Maaten, Weinberger, "Densely connected convolutional networks", 2017).

Inside a dense block every layer receives the concatenation of all earlier feature maps and adds
``growth_rate`` (k) new ones. Each layer is a bottleneck BN-ReLU-Conv1x1 (``bn_size * k`` = 4k maps) then
BN-ReLU-Conv3x3 (k maps); transitions between blocks (BN, ReLU, 1x1 conv, 2x2 average pool) compress the
channels by ``compression`` (theta = 0.5). Module names match torchvision, so its state dicts load.

``memory_efficient=True`` recomputes the concatenation and bottleneck in the backward pass (gradient
checkpointing): much less activation memory, somewhat slower.

``small_input=True`` (16-64 px images): the 7x7 stride-2 stem becomes 3x3 stride 1 and the stem max-pool
is dropped, so a 32 px image reaches the last block at 4x4.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

from .layers import ImageClassifier, init_conv_bn_linear
from .registry import register_model

__all__ = ["DenseLayer", "DenseBlock", "Transition", "DenseNet", "build_densenet", "DENSENET_CONFIGS"]


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (4k) -> BN-ReLU-Conv3x3 (k) on the concatenation of all previous maps."""

    def __init__(
        self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float, memory_efficient: bool
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bottleneck(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        if self.memory_efficient and any(t.requires_grad for t in inputs):
            out = cp.checkpoint(lambda *xs: self.bottleneck(list(xs)), *inputs, use_reentrant=False)
        else:
            out = self.bottleneck(inputs)
        out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; the output concatenates the input and every layer's k new maps."""

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        drop_rate: float,
        memory_efficient: bool,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate, memory_efficient)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN, ReLU, 1x1 conv (compression), 2x2 average pool."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


#: The layer keys of torchvision's published DenseNet weight files (``denselayer1.norm.1.weight``, from an older
#: module layout), which torchvision renames as it loads them (``denselayer1.norm1.weight``).
_LEGACY_LAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _rename_legacy_keys(module, state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        match = _LEGACY_LAYER_KEY.match(key)
        if match:
            state_dict[match.group(1) + match.group(2)] = state_dict.pop(key)


class DenseNet(ImageClassifier):
    classifier_name = "classifier"
    # Measured on a 2-core Xeon (AVX-512), small-input densenet121: training steps 1.17x (28 px, batch 128)
    # and 1.22x (16 px, batch 32) faster in channels-last (the concatenations and 1x1 bottlenecks).
    channels_last_on_cpu = True

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        memory_efficient: bool = False,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        if not 0.0 <= drop_rate < 1.0:  # F.dropout checks it only in the first forward pass
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.num_classes = num_classes
        if small_input:
            stem = [
                ("conv0", nn.Conv2d(in_chans, num_init_features, kernel_size=3, stride=1, padding=1, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
            ]
        else:
            stem = [
                ("conv0", nn.Conv2d(in_chans, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        self.features = nn.Sequential(OrderedDict(stem))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate, memory_efficient)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_features = int(num_features * compression)
                self.features.add_module(f"transition{i + 1}", Transition(num_features, out_features))
                num_features = out_features
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        self.default_input_size = (in_chans, 32, 32) if small_input else (in_chans, 224, 224)
        self.min_input_size = 8 if small_input else 29
        init_conv_bn_linear(self, conv_mode="fan_in", linear="zero_bias")
        # torchvision's published weights (densenet121-a639ec97.pth...) load as torchvision loads them.
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x), inplace=True)  # norm5's output is a fresh tensor, as in torchvision

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return x if pre_logits else self.classifier(x)


#: (growth rate k, layers per block, initial features) of the ImageNet models.
DENSENET_CONFIGS: dict[int, tuple[int, tuple[int, ...], int]] = {
    121: (32, (6, 12, 24, 16), 64),
    161: (48, (6, 12, 36, 24), 96),
    169: (32, (6, 12, 32, 32), 64),
    201: (32, (6, 12, 48, 32), 64),
}


def build_densenet(depth: int, **kwargs) -> DenseNet:
    """DenseNet-``depth`` (121, 161, 169 or 201)."""
    growth_rate, block_config, num_init_features = DENSENET_CONFIGS[depth]
    return DenseNet(growth_rate, block_config, num_init_features, **kwargs)


@register_model()
def densenet121(
    *, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
    memory_efficient: bool = False, small_input: bool = False,
) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16); 7,978,856 parameters at 1000 classes."""
    return build_densenet(121, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                          memory_efficient=memory_efficient, small_input=small_input)


@register_model()
def densenet161(
    *, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
    memory_efficient: bool = False, small_input: bool = False,
) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96 initial features); 28,681,000 parameters."""
    return build_densenet(161, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                          memory_efficient=memory_efficient, small_input=small_input)


@register_model()
def densenet169(
    *, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
    memory_efficient: bool = False, small_input: bool = False,
) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32)."""
    return build_densenet(169, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                          memory_efficient=memory_efficient, small_input=small_input)


@register_model()
def densenet201(
    *, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
    memory_efficient: bool = False, small_input: bool = False,
) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32)."""
    return build_densenet(201, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                          memory_efficient=memory_efficient, small_input=small_input)
