"""Squeeze-and-excitation networks (Hu, Shen, Sun, "Squeeze-and-excitation networks", CVPR 2018).

One reusable block, :class:`cnnmodels.layers.SqueezeExcitation` (global average pool, FC C->C/r, ReLU,
FC C/r->C, sigmoid, channel-wise scale; r = 16 as in all the paper's models), attached to three families:

* SE-ResNet (``se_resnet18`` .. ``se_resnet152``): SE on each residual branch, after its last BN and before
  the addition with the identity (the paper's Fig. 3). SE-ResNet-50 has 28,088,024 parameters at 1000
  classes (+2,530,992 over ResNet-50, the paper's "~10%"). The residual layout is torchvision's v1.5 (the
  stride on the 3x3 convolution, as timm's ``seresnet50``): 4.092 GMACs at 224 px, where the paper's v1 layout
  (the stride on the first 1x1, its 3.87 GFLOPs) has 3.860; the parameters are the same.
* SE-Inception (``se_googlenet``): SE on each inception module's concatenated output (Fig. 2).
* SE-VGG (``se_vgg11_bn`` .. ``se_vgg19_bn``): SE after the non-linearity that follows each convolution;
  with batch norm, as the paper's SE-VGG-16.

The SE models are built by the family modules with ``se_reduction`` set, so they share every other option
(``small_input``, ``zero_init_residual``, ``aux_logits``, ...).
"""

from __future__ import annotations

from .googlenet import GoogLeNet
from .registry import register_model
from .resnet import ResNet, build_resnet
from .vgg import VGG, build_vgg

__all__ = ["SE_REDUCTION"]

#: The paper's reduction ratio r.
SE_REDUCTION = 16


def _se_resnet(depth: int, num_classes: int, in_chans: int, se_reduction: int, zero_init_residual: bool,
               small_input: bool, stem_stride: int) -> ResNet:
    return build_resnet(depth, num_classes=num_classes, in_chans=in_chans, se_reduction=se_reduction,
                        zero_init_residual=zero_init_residual, small_input=small_input,
                        stem_stride=stem_stride)


@register_model()
def se_resnet18(*, num_classes: int = 1000, in_chans: int = 3, se_reduction: int = SE_REDUCTION,
                zero_init_residual: bool = False, small_input: bool = False,
                stem_stride: int = 1) -> ResNet:
    """SE-ResNet-18 (11,778,592 parameters at 1000 classes)."""
    return _se_resnet(18, num_classes, in_chans, se_reduction, zero_init_residual, small_input, stem_stride)


@register_model()
def se_resnet34(*, num_classes: int = 1000, in_chans: int = 3, se_reduction: int = SE_REDUCTION,
                zero_init_residual: bool = False, small_input: bool = False,
                stem_stride: int = 1) -> ResNet:
    """SE-ResNet-34 (21,958,868 parameters at 1000 classes)."""
    return _se_resnet(34, num_classes, in_chans, se_reduction, zero_init_residual, small_input, stem_stride)


@register_model()
def se_resnet50(*, num_classes: int = 1000, in_chans: int = 3, se_reduction: int = SE_REDUCTION,
                zero_init_residual: bool = False, small_input: bool = False,
                stem_stride: int = 1) -> ResNet:
    """SE-ResNet-50 (28,088,024 parameters at 1000 classes)."""
    return _se_resnet(50, num_classes, in_chans, se_reduction, zero_init_residual, small_input, stem_stride)


@register_model()
def se_resnet101(*, num_classes: int = 1000, in_chans: int = 3, se_reduction: int = SE_REDUCTION,
                 zero_init_residual: bool = False, small_input: bool = False,
                stem_stride: int = 1) -> ResNet:
    """SE-ResNet-101 (49,326,872 parameters at 1000 classes)."""
    return _se_resnet(101, num_classes, in_chans, se_reduction, zero_init_residual, small_input, stem_stride)


@register_model()
def se_resnet152(*, num_classes: int = 1000, in_chans: int = 3, se_reduction: int = SE_REDUCTION,
                 zero_init_residual: bool = False, small_input: bool = False,
                stem_stride: int = 1) -> ResNet:
    """SE-ResNet-152 (66,821,848 parameters at 1000 classes)."""
    return _se_resnet(152, num_classes, in_chans, se_reduction, zero_init_residual, small_input, stem_stride)


@register_model()
def se_googlenet(*, num_classes: int = 1000, in_chans: int = 3, se_reduction: int = SE_REDUCTION,
                 inception: str = "reduced", aux_logits: bool = True, dropout: float | None = None,
                 small_input: bool = False) -> GoogLeNet:
    """SE-Inception: GoogLeNet with an SE block on every inception module's output."""
    return GoogLeNet(num_classes=num_classes, in_chans=in_chans, inception=inception, aux_logits=aux_logits,
                     dropout=dropout, small_input=small_input, se_reduction=se_reduction)


def _se_vgg(depth: int, num_classes: int, in_chans: int, se_reduction: int, dropout: float,
            small_input: bool) -> VGG:
    return build_vgg(depth, True, num_classes=num_classes, in_chans=in_chans, dropout=dropout,
                     small_input=small_input, se_reduction=se_reduction)


@register_model()
def se_vgg11_bn(*, num_classes: int = 1000, in_chans: int = 3, se_reduction: int = SE_REDUCTION,
                dropout: float = 0.5, small_input: bool = False) -> VGG:
    """SE-VGG-11 with batch norm."""
    return _se_vgg(11, num_classes, in_chans, se_reduction, dropout, small_input)


@register_model()
def se_vgg13_bn(*, num_classes: int = 1000, in_chans: int = 3, se_reduction: int = SE_REDUCTION,
                dropout: float = 0.5, small_input: bool = False) -> VGG:
    """SE-VGG-13 with batch norm."""
    return _se_vgg(13, num_classes, in_chans, se_reduction, dropout, small_input)


@register_model()
def se_vgg16_bn(*, num_classes: int = 1000, in_chans: int = 3, se_reduction: int = SE_REDUCTION,
                dropout: float = 0.5, small_input: bool = False) -> VGG:
    """SE-VGG-16 with batch norm (the paper's Table 2 SE-VGG-16)."""
    return _se_vgg(16, num_classes, in_chans, se_reduction, dropout, small_input)


@register_model()
def se_vgg19_bn(*, num_classes: int = 1000, in_chans: int = 3, se_reduction: int = SE_REDUCTION,
                dropout: float = 0.5, small_input: bool = False) -> VGG:
    """SE-VGG-19 with batch norm."""
    return _se_vgg(19, num_classes, in_chans, se_reduction, dropout, small_input)
