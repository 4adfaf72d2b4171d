"""LeNet-5 (LeCun, Bottou, Bengio, Haffner, "Gradient-based learning applied to document recognition", 1998).

Layout for a 32x32 input: C1 (6 maps, 5x5) -> S2 (2x2 subsampling) -> C3 (16 maps, 5x5) -> S4 -> C5 (120
maps, 5x5, i.e. fully connected to the 5x5 S4 maps) -> F6 (84 units) -> output.

Two variants:

* ``variant="modern"`` (default): the form most PyTorch code calls LeNet-5: C3 fully connected to S2,
  parameter-free max-pool subsampling, ReLU, and a linear output layer. With one input channel and 10
  classes it has 156 + 2,416 + 48,120 + 10,164 + 850 = **61,706** parameters.
* ``variant="paper"``: the 1998 network: C3 with the paper's partial connection table (Table I), trainable
  subsampling (sum of 2x2 times a coefficient plus a bias per map, then the squashing function), the scaled
  tanh ``1.7159 * tanh(2x/3)``, and the Euclidean RBF output layer with fixed +-1 prototypes. With one input
  channel it has exactly **60,000** trainable parameters (C1 156, S2 12, C3 1,516, S4 32, C5 48,120, F6
  10,164; the RBF prototypes are a fixed buffer). Its logits are negative squared distances to the
  prototypes, so cross-entropy training works unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ImageClassifier
from .registry import register_model

__all__ = ["LeNet5", "lenet5", "C3_CONNECTIONS"]

#: Table I of the paper: which S2 maps (columns 0-5) feed each of the 16 C3 maps.
C3_CONNECTIONS: tuple[tuple[int, ...], ...] = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (0, 4, 5), (0, 1, 5),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (0, 3, 4, 5), (0, 1, 4, 5), (0, 1, 2, 5),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)


class ScaledTanh(nn.Module):
    """The paper's squashing function f(a) = A tanh(S a), A = 1.7159, S = 2/3 (Appendix A)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.7159 * torch.tanh(x * (2.0 / 3.0))


class TrainableSubsampling(nn.Module):
    """S2/S4: the four inputs of each 2x2 window are summed, multiplied by a trainable coefficient and
    shifted by a trainable bias, one pair per feature map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        summed = self.pool(x) * 4.0
        return summed * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class PartialConv(nn.Module):
    """C3 with a sparse connection table: output map i sees only the input maps in ``connections[i]``."""

    def __init__(self, connections: tuple[tuple[int, ...], ...], kernel_size: int = 5) -> None:
        super().__init__()
        self.connections = connections
        self.convs = nn.ModuleList(nn.Conv2d(len(c), 1, kernel_size) for c in connections)
        # The table's index tensors per device, made from the tuples when first needed there. Not buffers:
        # non-persistent buffers are not in the state dict, so a model built on the meta device, moved with
        # to_empty and loaded strictly kept uninitialised indices (an out-of-bounds error, or wrong maps). Nor
        # made at every forward: a CPU index for a GPU input is a copy and a wait per output map.
        self._indices: dict[torch.device, list[torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices = self._indices.get(x.device)
        if indices is None:
            indices = self._indices[x.device] = [torch.tensor(c, device=x.device) for c in self.connections]
        return torch.cat([conv(x.index_select(1, index)) for index, conv in zip(indices, self.convs, strict=True)],
                         dim=1)


class RBFOutput(nn.Module):
    """Euclidean radial basis output units: logit_k = -||x - w_k||^2 with fixed +-1 prototypes w_k.

    The paper draws the prototypes as stylised 7x12 bitmaps of the characters; for an arbitrary class
    count we draw them as a fixed pseudo-random +-1 code (seeded, so every instance is identical).
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1998)
        codes = torch.randint(0, 2, (num_classes, in_features), generator=generator).float() * 2 - 1
        self.register_buffer("prototypes", codes)
        self.in_features = in_features
        self.out_features = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The squared differences summed, not cdist squared: cdist has no bfloat16 kernel on CPUs, and its square
        # root has no gradient where an output sits exactly on a prototype. In float32 under autocast: the logits
        # are sums of 84 squares (about -100), where bfloat16 keeps less than one unit.
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        return -(x.unsqueeze(-2) - self.prototypes.to(x.dtype)).pow(2).sum(-1)


class LeNet5(ImageClassifier):
    """LeNet-5 for 32x32 images (see the module docstring for the two variants)."""

    # C5's 5x5 kernels cover S4's whole map only from 32 to 35 px (S4 5x5 to 5.5x5.5): from 36 px C5 leaves a
    # map of more than one position, more features than F6 takes. Larger images are resized to the paper's 32.
    min_input_size = 32
    max_input_size = 35

    def __init__(self, num_classes: int = 10, in_chans: int = 1, variant: str = "modern") -> None:
        super().__init__()
        if variant not in ("modern", "paper"):
            raise ValueError(f"variant must be 'modern' or 'paper', got {variant!r}")
        self.variant = variant
        self.num_classes = num_classes
        self.default_input_size = (in_chans, 32, 32)
        paper = variant == "paper"
        act = ScaledTanh if paper else (lambda: nn.ReLU(inplace=True))
        self.c1 = nn.Conv2d(in_chans, 6, 5)
        self.act1 = act()
        self.s2 = TrainableSubsampling(6) if paper else nn.MaxPool2d(2)
        self.act2 = act() if paper else nn.Identity()
        self.c3 = PartialConv(C3_CONNECTIONS) if paper else nn.Conv2d(6, 16, 5)
        self.act3 = act()
        self.s4 = TrainableSubsampling(16) if paper else nn.MaxPool2d(2)
        self.act4 = act() if paper else nn.Identity()
        self.c5 = nn.Conv2d(16, 120, 5)
        self.act5 = act()
        self.f6 = nn.Linear(120, 84)
        self.act6 = act()
        self.output = RBFOutput(84, num_classes) if paper else nn.Linear(84, num_classes)
        self.classifier_name = "output"

    def input_size_for(self, image_size: int) -> int:
        """32 px for images smaller than 32 or larger than 35 (the paper's input), their own size between."""
        return image_size if self.min_input_size <= image_size <= self.max_input_size else 32

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.s2(self.act1(self.c1(x))))
        x = self.act4(self.s4(self.act3(self.c3(x))))
        return self.act5(self.c5(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.act6(self.f6(torch.flatten(x, 1)))
        return x if pre_logits else self.output(x)

    def reset_classifier(self, num_classes: int) -> None:
        if self.variant == "paper":
            self.output = RBFOutput(84, num_classes).to(self.f6.weight.device, self.f6.weight.dtype)
            self.num_classes = num_classes
        else:
            super().reset_classifier(num_classes)


@register_model()
def lenet5(*, num_classes: int = 1000, in_chans: int = 3, variant: str = "modern") -> LeNet5:
    """LeNet-5 (1998) for 32x32 inputs; ``variant="paper"`` for the exact 60,000-parameter original."""
    return LeNet5(num_classes=num_classes, in_chans=in_chans, variant=variant)
