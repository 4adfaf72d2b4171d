"""GoogLeNet (Szegedy et al., "Going deeper with convolutions", 2014).

Nine inception modules (3a..5b) with the paper's filter table, two auxiliary classifiers on 4a and 4d
that exist only for training, and global average pooling before a single fully connected layer.

* ``inception="reduced"`` (default, the paper's Fig. 2b): 1x1 bottleneck convolutions reduce the channels
  before the 3x3 and 5x5 convolutions, and a 1x1 projection follows the 3x3 max-pool.
* ``inception="naive"`` (Fig. 2a): parallel 1x1, 3x3 and 5x5 convolutions and a 3x3 max-pool on the same
  input, concatenated; the pooled branch passes all input channels through, so the width grows from module
  to module (that growth is why the paper introduced the reductions).
* ``aux_logits=True`` (default): in training mode ``forward`` returns ``GoogLeNetOutputs(logits,
  aux_logits2, aux_logits1)`` (torchvision's order); in eval mode it returns the logits alone. Combine them
  with :func:`googlenet_loss` (main + 0.3 * (aux1 + aux2), the paper's weighting).
* Every convolution is followed by batch norm and ReLU (the 2014 paper predates batch norm; torchvision's
  weights use it too). The default follows the paper's 5x5 convolution in the third branch;
  ``torchvision_compat=True`` gives torchvision's layout instead: a 3x3 there (a known bug kept for its
  weights, pytorch/vision#906), BN eps 1e-3 and dropout 0.2, so its state dicts load.

``small_input=True`` (16-64 px images): the 7x7 stride-2 stem becomes 3x3 stride 1 and the first max-pool
is dropped, so a 32 px image reaches 5b at 4x4.

``se_reduction`` adds a squeeze-and-excitation block on each module's concatenated output (SE-Inception,
see :mod:`cnnmodels.senet`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ImageClassifier, SqueezeExcitation, check_probability
from .registry import register_model

__all__ = [
    "BasicConv2d",
    "Inception",
    "InceptionAux",
    "GoogLeNet",
    "GoogLeNetOutputs",
    "googlenet_loss",
    "INCEPTION_TABLE",
]

#: Table 1 of the paper: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj) per module.
INCEPTION_TABLE: dict[str, tuple[int, int, int, int, int, int]] = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


class GoogLeNetOutputs(NamedTuple):
    logits: torch.Tensor
    aux_logits2: torch.Tensor | None
    aux_logits1: torch.Tensor | None


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, bn_eps: float = 1e-5, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """One inception module: four parallel branches concatenated along the channels.

    ``naive=True`` drops the 1x1 reductions and the pool projection (``ch3x3red``, ``ch5x5red`` and
    ``pool_proj`` are then ignored and the pool branch keeps all ``in_channels``).
    """

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        naive: bool = False,
        kernel5: int = 5,
        bn_eps: float = 1e-5,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__()
        conv = lambda i, o, k: BasicConv2d(i, o, bn_eps=bn_eps, kernel_size=k, padding=k // 2)  # noqa: E731
        self.branch1 = conv(in_channels, ch1x1, 1)
        if naive:
            self.branch2 = conv(in_channels, ch3x3, 3)
            self.branch3 = conv(in_channels, ch5x5, kernel5)
            self.branch4 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True)
            self.out_channels = ch1x1 + ch3x3 + ch5x5 + in_channels
        else:
            self.branch2 = nn.Sequential(conv(in_channels, ch3x3red, 1), conv(ch3x3red, ch3x3, 3))
            self.branch3 = nn.Sequential(conv(in_channels, ch5x5red, 1), conv(ch5x5red, ch5x5, kernel5))
            self.branch4 = nn.Sequential(
                nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True), conv(in_channels, pool_proj, 1)
            )
            self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj
        self.se = SqueezeExcitation(self.out_channels, reduction=se_reduction) if se_reduction is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)
        return out if self.se is None else self.se(out)


class InceptionAux(nn.Module):
    """Auxiliary classifier: 4x4 average pool, 1x1 conv to 128, FC 1024 + ReLU, dropout 0.7, FC."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.7, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = BasicConv2d(in_channels, 128, bn_eps=bn_eps, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The paper's 5x5/3 average pool gives 4x4 from 14x14; the adaptive pool gives 4x4 from any size.
        x = self.conv(F.adaptive_avg_pool2d(x, (4, 4)))
        x = F.relu(self.fc1(torch.flatten(x, 1)), inplace=True)
        return self.fc2(self.dropout(x))


class GoogLeNet(ImageClassifier):
    classifier_name = "fc"
    # Measured on a 2-core Xeon (AVX-512), small-input googlenet: training steps 1.38x (28 px, batch 128)
    # and 1.19x (16 px, batch 32) faster in channels-last; SE-GoogLeNet 1.25x and 1.06x.
    channels_last_on_cpu = True

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        inception: str = "reduced",
        aux_logits: bool = True,
        torchvision_compat: bool = False,
        transform_input: bool = False,
        dropout: float | None = None,
        dropout_aux: float = 0.7,
        small_input: bool = False,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__()
        if inception not in ("reduced", "naive"):
            raise ValueError(f"inception must be 'reduced' or 'naive', got {inception!r}")
        if transform_input and in_chans != 3:
            raise ValueError("transform_input re-normalises ImageNet RGB input and needs in_chans=3")
        self.num_classes = num_classes
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        bn_eps = 1e-3 if torchvision_compat else 1e-5
        kernel5 = 3 if torchvision_compat else 5
        if dropout is None:
            dropout = 0.2 if torchvision_compat else 0.4
        check_probability("dropout", dropout)
        check_probability("dropout_aux", dropout_aux)

        if small_input:
            self.conv1 = BasicConv2d(in_chans, 64, bn_eps=bn_eps, kernel_size=3, stride=1, padding=1)
            self.maxpool1 = nn.Identity()
        else:
            self.conv1 = BasicConv2d(in_chans, 64, bn_eps=bn_eps, kernel_size=7, stride=2, padding=3)
            self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, bn_eps=bn_eps, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, bn_eps=bn_eps, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        channels = 192
        modules: dict[str, Inception] = {}
        aux_in: dict[str, int] = {}
        for name, row in INCEPTION_TABLE.items():
            module = Inception(channels, *row, naive=inception == "naive", kernel5=kernel5, bn_eps=bn_eps,
                               se_reduction=se_reduction)
            modules[name] = module
            channels = module.out_channels
            aux_in[name] = channels
        self.inception3a, self.inception3b = modules["3a"], modules["3b"]
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a, self.inception4b, self.inception4c = modules["4a"], modules["4b"], modules["4c"]
        self.inception4d, self.inception4e = modules["4d"], modules["4e"]
        # 2x2/2 as torchvision, in both modes; the paper's Table 1 pools 3x3/2 here. The same size at 224 px (14 ->
        # 7), not on odd maps (7 -> 4 against 3 at 28 px); a pool has no weights, so changing it would silently
        # change every GoogLeNet already trained and registered with this layout.
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a, self.inception5b = modules["5a"], modules["5b"]

        if aux_logits:
            self.aux1 = InceptionAux(aux_in["4a"], num_classes, dropout=dropout_aux, bn_eps=bn_eps)
            self.aux2 = InceptionAux(aux_in["4d"], num_classes, dropout=dropout_aux, bn_eps=bn_eps)
        else:
            self.aux1 = self.aux2 = None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(channels, num_classes)
        self.default_input_size = (in_chans, 32, 32) if small_input else (in_chans, 224, 224)
        self.min_input_size = 16 if small_input else 32
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transform_input:
            return x
        # Map ImageNet-normalised RGB to the (x - 0.5) / 0.5 scaling the TF-ported weights expect.
        ch0 = x[:, 0:1] * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
        ch1 = x[:, 1:2] * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
        ch2 = x[:, 2:3] * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
        return torch.cat((ch0, ch1, ch2), 1)

    def _trunk(self, x: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x = self._transform_input(x)
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux1 = self.aux1(x) if with_aux else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if with_aux else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        return x, aux1, aux2

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._trunk(x, with_aux=False)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.avgpool(x), 1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> GoogLeNetOutputs | torch.Tensor:
        self.check_input_size(x)
        # torchvision's switch too: fine-tuning code sets ``model.aux_logits = False`` to get plain logits.
        with_aux = self.training and self.aux_logits and self.aux1 is not None
        features, aux1, aux2 = self._trunk(x, with_aux)
        logits = self.forward_head(features)
        if with_aux:
            return GoogLeNetOutputs(logits, aux2, aux1)
        return logits

    def reset_classifier(self, num_classes: int) -> None:
        super().reset_classifier(num_classes)
        for aux in (self.aux1, self.aux2):
            if aux is not None:
                aux.fc2 = nn.Linear(aux.fc2.in_features, num_classes).to(aux.fc2.weight.device,
                                                                          aux.fc2.weight.dtype)


def googlenet_loss(
    outputs: GoogLeNetOutputs | torch.Tensor,
    target: torch.Tensor,
    criterion=F.cross_entropy,
    aux_weight: float = 0.3,
) -> torch.Tensor:
    """The paper's training loss: main + ``aux_weight`` * (aux1 + aux2); plain criterion for a tensor."""
    if isinstance(outputs, torch.Tensor):
        return criterion(outputs, target)
    loss = criterion(outputs.logits, target)
    for aux in (outputs.aux_logits1, outputs.aux_logits2):
        if aux is not None:
            loss = loss + aux_weight * criterion(aux, target)
    return loss


@register_model()
def googlenet(
    *,
    num_classes: int = 1000,
    in_chans: int = 3,
    inception: str = "reduced",
    aux_logits: bool = True,
    torchvision_compat: bool = False,
    transform_input: bool = False,
    dropout: float | None = None,
    small_input: bool = False,
) -> GoogLeNet:
    """GoogLeNet / Inception v1 (7,005,832 parameters without aux heads at 1000 classes; torchvision's
    layout with ``torchvision_compat=True``: 6,624,904, or 13,004,888 with the aux heads)."""
    return GoogLeNet(
        num_classes=num_classes, in_chans=in_chans, inception=inception, aux_logits=aux_logits,
        torchvision_compat=torchvision_compat, transform_input=transform_input, dropout=dropout,
        small_input=small_input,
    )
