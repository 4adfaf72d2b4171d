"""AlexNet (Krizhevsky, Sutskever, Hinton 2012), torchvision's single-tower variant.

torchvision (and this file) follow "One weird trick for parallelizing convolutional neural networks"
(Krizhevsky 2014): 64-192-384-256-256 filters, no grouping across two GPUs, no local response
normalisation. Module names match torchvision (``features.{0,3,6,8,10}``, ``classifier.{1,4,6}``), so its
state dicts load.

``small_input=True`` (images of 16-64 px): the 11x11 stride-4 first convolution becomes 3x3 stride 1 and
the adaptive pool before the classifier gives 3x3 instead of 6x6 (a 32 px image reaches the last pool at
7x7, not 1x1).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ImageClassifier, check_probability
from .registry import register_model

__all__ = ["AlexNet", "alexnet"]


class AlexNet(ImageClassifier):
    classifier_name = "classifier.6"

    def __init__(
        self, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5, small_input: bool = False
    ) -> None:
        super().__init__()
        check_probability("dropout", dropout)
        self.num_classes = num_classes
        stem = nn.Conv2d(in_chans, 64, 3, 1, 1) if small_input else nn.Conv2d(in_chans, 64, 11, 4, 2)
        self.features = nn.Sequential(
            stem,
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        )
        pool = 3 if small_input else 6
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(256 * pool * pool, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )
        self.default_input_size = (in_chans, 32, 32) if small_input else (in_chans, 224, 224)
        self.min_input_size = 16 if small_input else 63

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier[:-1](x) if pre_logits else self.classifier(x)


@register_model()
def alexnet(
    *, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5, small_input: bool = False
) -> AlexNet:
    """AlexNet, torchvision's single-tower layout (61,100,840 parameters at 1000 classes)."""
    return AlexNet(num_classes=num_classes, in_chans=in_chans, dropout=dropout, small_input=small_input)
