"""cnnmodels: from-scratch PyTorch implementations of the classic CNN families.

LeNet-5, AlexNet, VGG, GoogLeNet, ResNet, DenseNet, SENet (SE blocks on ResNet, Inception and VGG) and
EfficientNet with compound scaling. Plain PyTorch: importing it needs neither Ray nor MLflow.

    >>> import cnnmodels
    >>> model = cnnmodels.create_model("resnet50", num_classes=10)
    >>> cnnmodels.profile(model).params
    23528522
"""

from . import alexnet, densenet, efficientnet, googlenet, lenet, resnet, scaling, senet, vgg  # noqa: F401  (registers)
from .googlenet import GoogLeNetOutputs, googlenet_loss
from .layers import ImageClassifier, SqueezeExcitation
from .profile import Profile, profile, training_step_kernels
from .registry import (
    create_model,
    family_member_name,
    family_of,
    get_model_builder,
    is_family_member,
    list_models,
    model_options,
    register_family,
    register_model,
    resolve_model_name,
)

__all__ = [
    "create_model",
    "list_models",
    "get_model_builder",
    "model_options",
    "register_model",
    "register_family",
    "resolve_model_name",
    "family_member_name",
    "is_family_member",
    "family_of",
    "profile",
    "Profile",
    "training_step_kernels",
    "ImageClassifier",
    "SqueezeExcitation",
    "GoogLeNetOutputs",
    "googlenet_loss",
    "scaling",
]
__version__ = "0.1.0"
