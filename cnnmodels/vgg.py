"""VGG (Simonyan & Zisserman, "Very deep convolutional networks for large-scale image recognition", 2014).

Configurations A (VGG-11), B (13), D (16) and E (19), with or without batch norm. Module names and
Sequential indices match torchvision (``features.{i}``, ``classifier.{0,3,6}``), so its state dicts load.

``small_input=True`` (16-64 px images, the CIFAR variant): the five max-pools are kept but round up (a 32
px image reaches the last stage at 2x2, a 28 px one too), the adaptive pool gives 1x1 and the classifier
is 512-512-classes instead of 25088-4096-4096-classes.

``se_reduction`` inserts a squeeze-and-excitation block after the non-linearity that follows each
convolution (SE-VGG, see :mod:`cnnmodels.senet`).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ImageClassifier, SqueezeExcitation, check_probability, init_conv_bn_linear
from .registry import register_model

__all__ = ["VGG", "VGG_CONFIGS", "make_vgg_features", "build_vgg"]

#: Filters per conv layer; "M" is a 2x2 max-pool. Keys are the paper's column names.
VGG_CONFIGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
_DEPTH_TO_CONFIG = {11: "A", 13: "B", 16: "D", 19: "E"}


def make_vgg_features(
    config: list[int | str],
    in_chans: int,
    batch_norm: bool,
    se_reduction: int | None = None,
    ceil_mode: bool = False,
) -> nn.Sequential:
    """The convolutional part: conv 3x3 (+ BN) + ReLU (+ SE) per entry, max-pool per ``"M"``."""
    layers: list[nn.Module] = []
    channels = in_chans
    for value in config:
        if value == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=ceil_mode))
            continue
        layers.append(nn.Conv2d(channels, value, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(value))
        layers.append(nn.ReLU(inplace=True))
        if se_reduction is not None:
            layers.append(SqueezeExcitation(value, reduction=se_reduction))
        channels = value
    return nn.Sequential(*layers)


class VGG(ImageClassifier):
    classifier_name = "classifier.6"

    def __init__(
        self,
        config: list[int | str],
        num_classes: int = 1000,
        in_chans: int = 3,
        batch_norm: bool = False,
        dropout: float = 0.5,
        small_input: bool = False,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__()
        check_probability("dropout", dropout)
        self.num_classes = num_classes
        # Rounding pooled sizes up lets odd sizes such as 28 px pass all five pools (28-14-7-4-2-1).
        self.features = make_vgg_features(config, in_chans, batch_norm, se_reduction, ceil_mode=small_input)
        pool, hidden = (1, 512) if small_input else (7, 4096)
        last_channels = [v for v in config if v != "M"][-1]
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        self.classifier = nn.Sequential(
            nn.Linear(last_channels * pool * pool, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self.default_input_size = (in_chans, 32, 32) if small_input else (in_chans, 224, 224)
        self.min_input_size = 16 if small_input else 32
        init_conv_bn_linear(self, conv_mode="fan_out", linear="normal")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier[:-1](x) if pre_logits else self.classifier(x)


def build_vgg(depth: int, batch_norm: bool, *, se_reduction: int | None = None, **kwargs) -> VGG:
    """VGG-``depth`` (11, 13, 16 or 19) with or without batch norm."""
    return VGG(VGG_CONFIGS[_DEPTH_TO_CONFIG[depth]], batch_norm=batch_norm, se_reduction=se_reduction, **kwargs)


@register_model()
def vgg11(*, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5, small_input: bool = False) -> VGG:
    """VGG-11 (configuration A)."""
    return build_vgg(11, False, num_classes=num_classes, in_chans=in_chans, dropout=dropout, small_input=small_input)


@register_model()
def vgg11_bn(*, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5, small_input: bool = False) -> VGG:
    """VGG-11 (configuration A) with batch norm."""
    return build_vgg(11, True, num_classes=num_classes, in_chans=in_chans, dropout=dropout, small_input=small_input)


@register_model()
def vgg13(*, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5, small_input: bool = False) -> VGG:
    """VGG-13 (configuration B)."""
    return build_vgg(13, False, num_classes=num_classes, in_chans=in_chans, dropout=dropout, small_input=small_input)


@register_model()
def vgg13_bn(*, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5, small_input: bool = False) -> VGG:
    """VGG-13 (configuration B) with batch norm."""
    return build_vgg(13, True, num_classes=num_classes, in_chans=in_chans, dropout=dropout, small_input=small_input)


@register_model()
def vgg16(*, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5, small_input: bool = False) -> VGG:
    """VGG-16 (configuration D)."""
    return build_vgg(16, False, num_classes=num_classes, in_chans=in_chans, dropout=dropout, small_input=small_input)


@register_model()
def vgg16_bn(*, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5, small_input: bool = False) -> VGG:
    """VGG-16 (configuration D) with batch norm."""
    return build_vgg(16, True, num_classes=num_classes, in_chans=in_chans, dropout=dropout, small_input=small_input)


@register_model()
def vgg19(*, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5, small_input: bool = False) -> VGG:
    """VGG-19 (configuration E)."""
    return build_vgg(19, False, num_classes=num_classes, in_chans=in_chans, dropout=dropout, small_input=small_input)


@register_model()
def vgg19_bn(*, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5, small_input: bool = False) -> VGG:
    """VGG-19 (configuration E) with batch norm."""
    return build_vgg(19, True, num_classes=num_classes, in_chans=in_chans, dropout=dropout, small_input=small_input)
