"""ResNet (He, Zhang, Ren, Sun, "Deep residual learning for image recognition", 2015).

Residual blocks (``BasicBlock`` for ResNet-18/34, ``Bottleneck`` for 50/101/152) learn F(x) and output
relu(F(x) + x); a 1x1 projection shortcut (``downsample``) matches shapes where the stride or width changes.
He (Kaiming normal, fan-out) initialisation and batch norm after every convolution. The bottleneck puts the
stride on its 3x3 convolution ("ResNet v1.5", as torchvision). Module names match torchvision, so its state
dicts load.

``zero_init_residual=True`` starts every block's last BN scale at 0, so each residual block begins as
the identity (Goyal et al. 2017).

``small_input=True`` (16-64 px images, the CIFAR variant): the 7x7 stride-2 stem becomes a 3x3 stride-1
convolution and the stem max-pool is dropped, so a 32 px image reaches the last stage at 4x4.
``stem_stride=2`` keeps that 3x3 stem but strides it: a quarter of the multiply-adds of every later layer
(a 28 px image reaches the last stage at 2x2), the usual trade on 28-32 px data when time matters more
than the last percent (the Fashion-MNIST recipe, :mod:`pipelines.configs`).

``se_reduction`` adds a squeeze-and-excitation block on each residual branch before the addition
(SE-ResNet, see :mod:`cnnmodels.senet`).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ImageClassifier, SqueezeExcitation, init_conv_bn_linear
from .registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "build_resnet", "RESNET_LAYERS"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SqueezeExcitation(planes, reduction=se_reduction) if se_reduction is not None else None
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        out += identity
        return self.relu(out)

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a shortcut (ResNet-50/101/152)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.se = (SqueezeExcitation(planes * self.expansion, reduction=se_reduction) if se_reduction is not None
                   else None)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        out += identity
        return self.relu(out)

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3


class ResNet(ImageClassifier):
    classifier_name = "fc"

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_chans: int = 3,
        zero_init_residual: bool = False,
        small_input: bool = False,
        se_reduction: int | None = None,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        if stem_stride != 1 and not small_input:
            raise ValueError("stem_stride applies to the small-input stem only (small_input=True)")
        self.num_classes = num_classes
        self.inplanes = 64
        if small_input:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, se_reduction)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, se_reduction)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, se_reduction)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, se_reduction)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.default_input_size = (in_chans, 32, 32) if small_input else (in_chans, 224, 224)
        self.min_input_size = 8 * stem_stride if small_input else 32

        init_conv_bn_linear(self, conv_mode="fan_out", linear="default")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_norm().weight)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int, se_reduction: int | None
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, se_reduction)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, se_reduction=se_reduction) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)


RESNET_LAYERS: dict[int, tuple[type, tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def build_resnet(depth: int, *, se_reduction: int | None = None, **kwargs) -> ResNet:
    """ResNet-``depth`` (18, 34, 50, 101 or 152), optionally with SE blocks."""
    block, layers = RESNET_LAYERS[depth]
    return ResNet(block, layers, se_reduction=se_reduction, **kwargs)


@register_model()
def resnet18(
    *, num_classes: int = 1000, in_chans: int = 3, zero_init_residual: bool = False, small_input: bool = False,
    stem_stride: int = 1,
) -> ResNet:
    """ResNet-18: BasicBlock x (2, 2, 2, 2); 11,689,512 parameters at 1000 classes."""
    return build_resnet(18, num_classes=num_classes, in_chans=in_chans,
                        zero_init_residual=zero_init_residual, small_input=small_input, stem_stride=stem_stride)


@register_model()
def resnet34(
    *, num_classes: int = 1000, in_chans: int = 3, zero_init_residual: bool = False, small_input: bool = False,
    stem_stride: int = 1,
) -> ResNet:
    """ResNet-34: BasicBlock x (3, 4, 6, 3)."""
    return build_resnet(34, num_classes=num_classes, in_chans=in_chans,
                        zero_init_residual=zero_init_residual, small_input=small_input, stem_stride=stem_stride)


@register_model()
def resnet50(
    *, num_classes: int = 1000, in_chans: int = 3, zero_init_residual: bool = False, small_input: bool = False,
    stem_stride: int = 1,
) -> ResNet:
    """ResNet-50: Bottleneck x (3, 4, 6, 3); 25,557,032 parameters, 4.089 GMACs at 224."""
    return build_resnet(50, num_classes=num_classes, in_chans=in_chans,
                        zero_init_residual=zero_init_residual, small_input=small_input, stem_stride=stem_stride)


@register_model()
def resnet101(
    *, num_classes: int = 1000, in_chans: int = 3, zero_init_residual: bool = False, small_input: bool = False,
    stem_stride: int = 1,
) -> ResNet:
    """ResNet-101: Bottleneck x (3, 4, 23, 3)."""
    return build_resnet(101, num_classes=num_classes, in_chans=in_chans,
                        zero_init_residual=zero_init_residual, small_input=small_input, stem_stride=stem_stride)


@register_model()
def resnet152(
    *, num_classes: int = 1000, in_chans: int = 3, zero_init_residual: bool = False, small_input: bool = False,
    stem_stride: int = 1,
) -> ResNet:
    """ResNet-152: Bottleneck x (3, 8, 36, 3); 60,192,808 parameters at 1000 classes."""
    return build_resnet(152, num_classes=num_classes, in_chans=in_chans,
                        zero_init_residual=zero_init_residual, small_input=small_input, stem_stride=stem_stride)
