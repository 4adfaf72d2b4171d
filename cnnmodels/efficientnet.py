"""EfficientNet (Tan & Le, "EfficientNet: rethinking model scaling for convolutional neural networks", 2019).

The B0 baseline (Table 1 of the paper) is a stack of MBConv blocks (inverted residuals: 1x1 expansion,
depthwise kxk convolution, squeeze-and-excitation with SiLU, 1x1 linear projection) with stochastic depth
on the residual branches. Bigger models scale B0's depth, width and input resolution together.

* ``efficientnet_b0`` .. ``efficientnet_b7``: the official width/depth/resolution/dropout table (the one the
  TF reference code, torchvision and timm use); module names match torchvision, so its state dicts load.
* ``efficientnet``: the compound-scaling rule itself, ``create_model("efficientnet", phi=1, alpha=1.2,
  beta=1.1, gamma=1.15)``: depth multiplier ``alpha**phi``, width multiplier ``beta**phi``, input resolution
  ``round(base_resolution * gamma**phi)`` (see :mod:`cnnmodels.scaling`).

``small_input=True`` (16-64 px images): the stem convolution has stride 1 instead of 2, so a 32 px image
reaches the last stage at 2x2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
from torch import nn

from .layers import ConvNormAct, ImageClassifier, SqueezeExcitation, StochasticDepth, check_probability
from .registry import register_family, register_model
from .scaling import PAPER_COEFFICIENTS, CompoundCoefficients, scale_channels, scale_depth

__all__ = ["MBConvConfig", "MBConv", "EfficientNet", "B0_STAGES", "EFFICIENTNET_TABLE", "build_efficientnet",
           "compound_architecture"]


@dataclass(frozen=True)
class MBConvConfig:
    """One stage of MBConv blocks: expansion ratio, kernel, stride of the first block, channels, repeats."""

    expand_ratio: int
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int

    def scaled(self, width_multiplier: float, depth_multiplier: float) -> MBConvConfig:
        return replace(
            self,
            input_channels=scale_channels(self.input_channels, width_multiplier),
            out_channels=scale_channels(self.out_channels, width_multiplier),
            num_layers=scale_depth(self.num_layers, depth_multiplier),
        )


#: Table 1 of the paper (stages 2-8): MBConv1 k3 16, MBConv6 k3 24 x2, k5 40 x2, k3 80 x3, k5 112 x3,
#: k5 192 x4, k3 320.
B0_STAGES: tuple[MBConvConfig, ...] = (
    MBConvConfig(1, 3, 1, 32, 16, 1),
    MBConvConfig(6, 3, 2, 16, 24, 2),
    MBConvConfig(6, 5, 2, 24, 40, 2),
    MBConvConfig(6, 3, 2, 40, 80, 3),
    MBConvConfig(6, 5, 1, 80, 112, 3),
    MBConvConfig(6, 5, 2, 112, 192, 4),
    MBConvConfig(6, 3, 1, 192, 320, 1),
)

#: name -> (width multiplier, depth multiplier, resolution, dropout): the official B0-B7 table.
EFFICIENTNET_TABLE: dict[str, tuple[float, float, int, float]] = {
    "efficientnet_b0": (1.0, 1.0, 224, 0.2),
    "efficientnet_b1": (1.0, 1.1, 240, 0.2),
    "efficientnet_b2": (1.1, 1.2, 260, 0.3),
    "efficientnet_b3": (1.2, 1.4, 300, 0.3),
    "efficientnet_b4": (1.4, 1.8, 380, 0.4),
    "efficientnet_b5": (1.6, 2.2, 456, 0.4),
    "efficientnet_b6": (1.8, 2.6, 528, 0.5),
    "efficientnet_b7": (2.0, 3.1, 600, 0.5),
}


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-and-excitation (MBConv1 has no expansion conv)."""

    def __init__(
        self,
        config: MBConvConfig,
        stochastic_depth_prob: float,
        norm_layer: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        if config.stride not in (1, 2):
            raise ValueError(f"illegal stride {config.stride}")
        self.use_res_connect = config.stride == 1 and config.input_channels == config.out_channels
        expanded = scale_channels(config.input_channels, config.expand_ratio)
        layers: list[nn.Module] = []
        if expanded != config.input_channels:
            layers.append(ConvNormAct(config.input_channels, expanded, 1, norm_layer=norm_layer, activation=nn.SiLU))
        layers.append(
            ConvNormAct(expanded, expanded, config.kernel, config.stride, groups=expanded,
                        norm_layer=norm_layer, activation=nn.SiLU)
        )
        # EfficientNet squeezes to a quarter of the block's *input* channels, not of the expanded ones.
        layers.append(SqueezeExcitation(expanded, max(1, config.input_channels // 4), activation=nn.SiLU))
        layers.append(ConvNormAct(expanded, config.out_channels, 1, norm_layer=norm_layer, activation=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)
        self.out_channels = config.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = self.stochastic_depth(out)
            out += x
        return out


class EfficientNet(ImageClassifier):
    # Measured on a 2-core Xeon (AVX-512), batch 32 at 16-18 px: training steps 1.6-1.9x faster in
    # channels-last, thanks to the depthwise convolutions.
    channels_last_on_cpu = True

    classifier_name = "classifier.1"

    def __init__(
        self,
        width_multiplier: float = 1.0,
        depth_multiplier: float = 1.0,
        resolution: int = 224,
        dropout: float = 0.2,
        stochastic_depth_prob: float = 0.2,
        num_classes: int = 1000,
        in_chans: int = 3,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        small_input: bool = False,
        stages: tuple[MBConvConfig, ...] = B0_STAGES,
    ) -> None:
        super().__init__()
        # (each block's share, below it, failed naming neither the option nor the value; the last block's share
        # is (n - 1) / n of it, so 1 itself is fine, as in torchvision)
        check_probability("stochastic_depth_prob", stochastic_depth_prob)
        check_probability("dropout", dropout)
        self.num_classes = num_classes
        self.width_multiplier = width_multiplier
        self.depth_multiplier = depth_multiplier
        self.resolution = resolution
        scaled = [s.scaled(width_multiplier, depth_multiplier) for s in stages]

        stem_channels = scaled[0].input_channels
        layers: list[nn.Module] = [
            ConvNormAct(in_chans, stem_channels, 3, stride=1 if small_input else 2,
                        norm_layer=norm_layer, activation=nn.SiLU)
        ]
        total_blocks = sum(s.num_layers for s in scaled)
        block_id = 0
        for stage in scaled:
            blocks: list[nn.Module] = []
            for i in range(stage.num_layers):
                block_config = stage if i == 0 else replace(stage, input_channels=stage.out_channels, stride=1)
                # Drop probability grows linearly with depth, from 0 at the first block.
                prob = stochastic_depth_prob * block_id / total_blocks
                blocks.append(MBConv(block_config, prob, norm_layer))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
        head_channels = 4 * scaled[-1].out_channels
        layers.append(ConvNormAct(scaled[-1].out_channels, head_channels, 1, norm_layer=norm_layer,
                                  activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(head_channels, num_classes))
        self.min_input_size = _min_input_size(small_input)
        # Never below what the model takes (a base_resolution of 16 gave a default input the model refused).
        side = max(resolution, self.min_input_size)
        self.default_input_size = (in_chans, side, side)
        #: Whether ``resolution`` is part of the model's scaling (compound scaling, the B0-B7 table) and so
        #: the side it should see, rather than a default that follows the data.
        self.scales_resolution = not small_input
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                # The reference scales this range by 1/sqrt(out_features): with 1000 classes that is about
                # 1/sqrt(in_features) (0.032 vs 0.028 for B0), but with 10 classes it is 10x wider and the
                # initial logits are so large that training from scratch starts at a loss of ~5, not ln(10).
                # The fan-in keeps the ImageNet behaviour and is independent of the class count.
                init_range = 1.0 / math.sqrt(m.in_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.classifier(x)

    def input_size_for(self, image_size: int) -> int:
        """The scaled resolution where it is part of the model (compound scaling, B0-B7 at their table's
        resolution), but never below what the stem and stages can take (a small ``base_resolution`` without
        ``small_input``); with ``small_input`` B0-B7 follow the data instead."""
        if self.scales_resolution:
            return max(self.resolution, self.min_input_size)
        return super().input_size_for(image_size)


def build_efficientnet(name: str, *, small_input: bool = False, **kwargs) -> EfficientNet:
    """One of the official B0-B7 models by name (see :data:`EFFICIENTNET_TABLE`)."""
    width, depth, resolution, dropout = EFFICIENTNET_TABLE[name]
    kwargs.setdefault("dropout", dropout)
    if name in ("efficientnet_b5", "efficientnet_b6", "efficientnet_b7"):
        # B5-B7 were ported from TF with its BN settings (TF momentum 0.99 = PyTorch 0.01).
        kwargs.setdefault("norm_layer", partial(nn.BatchNorm2d, eps=0.001, momentum=0.01))
    if small_input:
        resolution = 32
    return EfficientNet(width, depth, resolution, small_input=small_input, **kwargs)


def _official(name: str, num_classes: int, in_chans: int, dropout: float | None,
              stochastic_depth_prob: float, small_input: bool) -> EfficientNet:
    extra = {} if dropout is None else {"dropout": dropout}
    return build_efficientnet(name, num_classes=num_classes, in_chans=in_chans, small_input=small_input,
                              stochastic_depth_prob=stochastic_depth_prob, **extra)


@register_model()
def efficientnet_b0(*, num_classes: int = 1000, in_chans: int = 3, dropout: float | None = None,
                    stochastic_depth_prob: float = 0.2, small_input: bool = False) -> EfficientNet:
    """EfficientNet-B0 (width 1.0, depth 1.0, 224 px); 5,288,548 parameters, 0.386 GMACs."""
    return _official("efficientnet_b0", num_classes, in_chans, dropout, stochastic_depth_prob, small_input)


@register_model()
def efficientnet_b1(*, num_classes: int = 1000, in_chans: int = 3, dropout: float | None = None,
                    stochastic_depth_prob: float = 0.2, small_input: bool = False) -> EfficientNet:
    """EfficientNet-B1 (width 1.0, depth 1.1, 240 px)."""
    return _official("efficientnet_b1", num_classes, in_chans, dropout, stochastic_depth_prob, small_input)


@register_model()
def efficientnet_b2(*, num_classes: int = 1000, in_chans: int = 3, dropout: float | None = None,
                    stochastic_depth_prob: float = 0.2, small_input: bool = False) -> EfficientNet:
    """EfficientNet-B2 (width 1.1, depth 1.2, 260 px)."""
    return _official("efficientnet_b2", num_classes, in_chans, dropout, stochastic_depth_prob, small_input)


@register_model()
def efficientnet_b3(*, num_classes: int = 1000, in_chans: int = 3, dropout: float | None = None,
                    stochastic_depth_prob: float = 0.2, small_input: bool = False) -> EfficientNet:
    """EfficientNet-B3 (width 1.2, depth 1.4, 300 px)."""
    return _official("efficientnet_b3", num_classes, in_chans, dropout, stochastic_depth_prob, small_input)


@register_model()
def efficientnet_b4(*, num_classes: int = 1000, in_chans: int = 3, dropout: float | None = None,
                    stochastic_depth_prob: float = 0.2, small_input: bool = False) -> EfficientNet:
    """EfficientNet-B4 (width 1.4, depth 1.8, 380 px)."""
    return _official("efficientnet_b4", num_classes, in_chans, dropout, stochastic_depth_prob, small_input)


@register_model()
def efficientnet_b5(*, num_classes: int = 1000, in_chans: int = 3, dropout: float | None = None,
                    stochastic_depth_prob: float = 0.2, small_input: bool = False) -> EfficientNet:
    """EfficientNet-B5 (width 1.6, depth 2.2, 456 px)."""
    return _official("efficientnet_b5", num_classes, in_chans, dropout, stochastic_depth_prob, small_input)


@register_model()
def efficientnet_b6(*, num_classes: int = 1000, in_chans: int = 3, dropout: float | None = None,
                    stochastic_depth_prob: float = 0.2, small_input: bool = False) -> EfficientNet:
    """EfficientNet-B6 (width 1.8, depth 2.6, 528 px)."""
    return _official("efficientnet_b6", num_classes, in_chans, dropout, stochastic_depth_prob, small_input)


@register_model()
def efficientnet_b7(*, num_classes: int = 1000, in_chans: int = 3, dropout: float | None = None,
                    stochastic_depth_prob: float = 0.2, small_input: bool = False) -> EfficientNet:
    """EfficientNet-B7 (width 2.0, depth 3.1, 600 px); 66,347,960 parameters."""
    return _official("efficientnet_b7", num_classes, in_chans, dropout, stochastic_depth_prob, small_input)


@register_model()
def efficientnet(
    *,
    num_classes: int = 1000,
    in_chans: int = 3,
    phi: float = 0.0,
    alpha: float = 1.2,
    beta: float = 1.1,
    gamma: float = 1.15,
    base_resolution: int | None = None,
    dropout: float = 0.2,
    stochastic_depth_prob: float = 0.2,
    small_input: bool = False,
) -> EfficientNet:
    """EfficientNet-B0 compound-scaled by ``phi`` with coefficients ``alpha`` (depth), ``beta`` (width)
    and ``gamma`` (resolution): depth ``alpha**phi``, width ``beta**phi``, input side
    ``round(base_resolution * gamma**phi)``. ``base_resolution`` defaults to 224, or 32 with
    ``small_input``."""
    if not math.isfinite(phi) or phi < 0:
        raise ValueError(f"phi must be a finite number >= 0, got {phi}")
    if base_resolution is None:
        base_resolution = 32 if small_input else 224
    if base_resolution < 8:
        raise ValueError(f"base_resolution must be >= 8, got {base_resolution}")
    multipliers = CompoundCoefficients(alpha, beta, gamma).multipliers(phi, base_resolution)
    model = EfficientNet(
        multipliers.width, multipliers.depth, multipliers.resolution, dropout=dropout,
        stochastic_depth_prob=stochastic_depth_prob, num_classes=num_classes, in_chans=in_chans,
        small_input=small_input,
    )
    model.compound = {"phi": phi, "alpha": alpha, "beta": beta, "gamma": gamma, "base_resolution": base_resolution}
    model.scales_resolution = True  # base_resolution * gamma**phi, whatever the stem
    return model


def _min_input_size(small_input: bool) -> int:
    """The smallest side the stem and stages take (five stride-2 stages; four with the small-input stem)."""
    return 16 if small_input else 32


def compound_architecture(phi: float, alpha: float, beta: float, gamma: float, base_resolution: int = 224,
                          small_input: bool = False) -> tuple[tuple[MBConvConfig, ...], int]:
    """What :func:`efficientnet` builds from these, without building it: the scaled stages and the input side it
    trains at (``input_size_for``: the scaled resolution, never below the smallest the model takes). Depths round
    up and widths to multiples of 8, so different coefficients can build the same network (at phi 1 every alpha
    in (1, 1.25] gives the block counts of the paper's 1.2: one more per stage than B0's, which only alpha 1 keeps);
    equal results mean the same network."""
    multipliers = CompoundCoefficients(alpha, beta, gamma).multipliers(phi, base_resolution)
    side = max(multipliers.resolution, _min_input_size(small_input))
    return tuple(s.scaled(multipliers.width, multipliers.depth) for s in B0_STAGES), side


# ``efficientnet_phi1`` names the compound-scaled member at phi = 1 (the pipeline's searched family).
register_family("efficientnet_phi", "efficientnet", "phi")
# ``efficientnet_paper_phi1``: the member with the paper's (1.2, 1.1, 1.15), the builder's defaults. A name of
# its own lets the pipeline train it next to the searched member of the same phi (``search.compare_paper``)
# without the two colliding in result files, registry aliases or MLflow runs.
register_family("efficientnet_paper_phi", "efficientnet", "phi", fixed=asdict(PAPER_COEFFICIENTS))
