"""Building blocks shared by several families, and the common classifier interface."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "ImageClassifier",
    "check_input_size",
    "ConvNormAct",
    "SqueezeExcitation",
    "StochasticDepth",
    "stochastic_depth",
    "init_conv_bn_linear",
]


@torch.fx.wrap  # traced as one call (its comparisons would otherwise be control flow on proxies)
def check_input_size(x: torch.Tensor, min_size: int, model_name: str, max_size: int | None = None) -> None:
    """Raise ``ValueError`` naming the model's limits when ``x`` is smaller than ``min_size`` (or larger than
    ``max_size``) on a side.

    Without it a too-small image fails deep inside a convolution ("Kernel size can't be greater than
    actual input size"), and a too-large one for a fixed-size head in a matrix product ("mat1 and mat2 shapes
    cannot be multiplied"): neither says what to change.
    """
    height, width = x.shape[-2], x.shape[-1]
    if height < min_size or width < min_size:
        raise ValueError(f"{model_name} needs inputs of at least {min_size}x{min_size} pixels, got {height}x{width}")
    if max_size is not None and (height > max_size or width > max_size):
        raise ValueError(f"{model_name} takes inputs of at most {max_size}x{max_size} pixels, got {height}x{width}")


def check_probability(name: str, p: float) -> float:
    """``p`` when it is a probability; a ValueError naming the option otherwise. NaN passes ``nn.Dropout``'s
    own range check: the model built, and its every forward pass (eval too) failed naming neither."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")
    return p


class ImageClassifier(nn.Module):
    """Interface every cnnmodels architecture implements (the timm convention).

    Subclasses set ``default_input_size`` (C, H, W), ``num_classes``, ``classifier_name`` (the dotted
    path of the final ``nn.Linear``) and implement :meth:`forward_features` and :meth:`forward_head`.
    """

    default_input_size: tuple[int, int, int] = (3, 224, 224)
    #: Smallest square input side the network accepts without a spatial size dropping to zero.
    min_input_size: int = 32
    #: Largest square input side, for networks whose head is sized for one input (LeNet-5); None: any.
    max_input_size: int | None = None
    num_classes: int = 1000
    classifier_name: str = "fc"
    #: Whether training in channels-last memory format is faster on CPUs too (it is on GPUs for every
    #: family). oneDNN's depthwise convolutions and the Inception/DenseNet concatenations are faster in it;
    #: plain 3x3 stacks (VGG, ResNet, AlexNet) are not.
    channels_last_on_cpu: bool = False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map before global pooling."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooling and classifier; with ``pre_logits=True`` the features fed to the last linear layer."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x)
        return self.forward_head(self.forward_features(x))

    def check_input_size(self, x: torch.Tensor) -> None:
        """``ValueError`` naming :attr:`min_input_size` (:attr:`max_input_size`) when ``x`` is too small (large)
        for this model."""
        check_input_size(x, self.min_input_size, getattr(self, "model_name", type(self).__name__),
                         self.max_input_size)

    def input_size_for(self, image_size: int) -> int:
        """The square side this model trains and serves at for images of ``image_size`` pixels: the
        images' own size, raised to :attr:`min_input_size` where they are smaller (lowered to
        :attr:`max_input_size` where larger). Models whose input resolution is part of their scaling
        (EfficientNet) override this."""
        side = max(image_size, self.min_input_size)
        return side if self.max_input_size is None else min(side, self.max_input_size)

    def get_classifier(self) -> nn.Linear:
        """The final linear layer."""
        return self.get_submodule(self.classifier_name)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final linear layer with a freshly initialised one (for fine-tuning)."""
        _replace_linear(self, self.classifier_name, num_classes)
        self.num_classes = num_classes


def _replace_linear(root: nn.Module, dotted_name: str, num_classes: int) -> None:
    parent_name, _, child_name = dotted_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child_name) if not child_name.isdigit() else parent[int(child_name)]
    new = nn.Linear(old.in_features, num_classes).to(old.weight.device, old.weight.dtype)
    if child_name.isdigit():
        parent[int(child_name)] = new
    else:
        setattr(parent, child_name, new)


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + activation, as torchvision's ``Conv2dNormActivation``.

    Indices 0/1/2 match torchvision so that state dicts load (``features.0.0.weight``, ...).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        activation: Callable[..., nn.Module] | None = nn.ReLU,
    ) -> None:
        padding = (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            norm_layer(out_channels),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation block (Hu et al. 2018): recalibrates channels by a learned gate.

    squeeze: global average pool to one value per channel; excitation: FC(C -> C/r), activation,
    FC(C/r -> C), sigmoid; the input is scaled channel-wise by the gate. The two FC layers are 1x1
    convolutions with bias (``fc1``/``fc2``, torchvision's names), so the block applies to any
    (N, C, H, W) feature map. ``reduction=16`` is the paper's r; EfficientNet passes an explicit
    ``squeeze_channels`` (a quarter of the block's input channels) and SiLU.
    """

    def __init__(
        self,
        channels: int,
        squeeze_channels: int | None = None,
        reduction: int = 16,
        activation: Callable[..., nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        if squeeze_channels is None:
            if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
                # (0 built the plain model under the SE name: the SE blocks were left out without a word)
                raise ValueError(f"se_reduction must be a positive integer, got {reduction!r}")
            squeeze_channels = max(1, channels // reduction)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = activation(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return x * self.scale_activation(scale)


def stochastic_depth(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Drop whole residual branches per sample with probability ``p`` (Huang et al. 2016).

    Survivors are scaled by ``1 / (1 - p)`` so the expectation is unchanged; identity in eval mode.
    """
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
    mask.bernoulli_(keep)
    return x * mask.div_(keep)


class StochasticDepth(nn.Module):
    """Module form of :func:`stochastic_depth` ("row" mode: one decision per sample)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def init_conv_bn_linear(
    module: nn.Module,
    *,
    conv_mode: str = "fan_out",
    linear: str = "default",
) -> None:
    """He (Kaiming normal) init for convolutions, BN weight 1 / bias 0, and the chosen linear init.

    ``linear``: ``"default"`` keeps PyTorch's init, ``"normal"`` uses N(0, 0.01) with zero bias (VGG),
    ``"zero_bias"`` keeps the default weights and zeroes the bias (DenseNet).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=conv_mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear == "normal":
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
            elif linear == "zero_bias":
                nn.init.zeros_(m.bias)
