"""cnnmodels: registry, exact parameter counts, MACs and torchvision state-dict compatibility."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision

import cnnmodels
from cnnmodels import create_model, profile, training_step_kernels


def n_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("alexnet", {}, 61_100_840),
        ("vgg16", {}, 138_357_544),
        ("vgg16_bn", {}, 138_365_992),
        ("resnet18", {}, 11_689_512),
        ("resnet50", {}, 25_557_032),
        ("resnet152", {}, 60_192_808),
        ("densenet121", {}, 7_978_856),
        ("densenet161", {}, 28_681_000),
        ("efficientnet_b0", {}, 5_288_548),
        ("efficientnet_b7", {}, 66_347_960),
        ("googlenet", {"torchvision_compat": True}, 13_004_888),
        ("googlenet", {"torchvision_compat": True, "aux_logits": False}, 6_624_904),
        ("googlenet", {"aux_logits": False}, 7_005_832),  # the paper's 5x5 branch
        ("se_resnet18", {}, 11_778_592),
        ("se_resnet50", {}, 28_088_024),
        ("se_resnet152", {}, 66_821_848),
        ("lenet5", {"num_classes": 10, "in_chans": 1}, 61_706),
    ],
)
def test_parameter_counts_match_references(name, kwargs, expected):
    with torch.device("meta"):  # shapes only: skips the (slow, irrelevant) random initialisation
        model = create_model(name, **kwargs)
    assert n_params(model) == expected


def test_lenet5_paper_variant_has_60000_trainable_parameters():
    model = create_model("lenet5", num_classes=10, in_chans=1, variant="paper")
    assert n_params(model, trainable_only=True) == 60_000
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_lenet5_paper_variant_built_on_meta_and_loaded_strictly_computes_the_same():
    """The fast-init pattern (build on meta, to_empty, strict load) must leave nothing uninitialised: C3's
    connection table once lived in non-persistent buffers, garbage after to_empty (an out-of-bounds error)."""
    torch.manual_seed(0)
    reference = create_model("lenet5", num_classes=10, in_chans=1, variant="paper").eval()
    with torch.device("meta"):
        fast = create_model("lenet5", num_classes=10, in_chans=1, variant="paper")
    fast = fast.to_empty(device="cpu")
    fast.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(fast.eval()(x), reference(x))


def test_se_adds_the_papers_ten_percent_to_resnet50():
    extra = n_params(create_model("se_resnet50")) - n_params(create_model("resnet50"))
    assert extra == 2_530_992


#: ../shared/reference/models.md, section 1: torchvision's parameter counts and `_ops` (conv + linear GMACs at 224 px).
TORCHVISION_REFERENCE = {
    "alexnet": (61_100_840, 0.714), "vgg11": (132_863_336, 7.609), "vgg11_bn": (132_868_840, 7.609),
    "vgg13": (133_047_848, 11.308), "vgg13_bn": (133_053_736, 11.308), "vgg16": (138_357_544, 15.470),
    "vgg16_bn": (138_365_992, 15.470), "vgg19": (143_667_240, 19.632), "vgg19_bn": (143_678_248, 19.632),
    "resnet18": (11_689_512, 1.814), "resnet34": (21_797_672, 3.664), "resnet50": (25_557_032, 4.089),
    "resnet101": (44_549_160, 7.801), "resnet152": (60_192_808, 11.514), "densenet121": (7_978_856, 2.834),
    "densenet161": (28_681_000, 7.728), "densenet169": (14_149_480, 3.360), "densenet201": (20_013_928, 4.291),
}
#: The same section's EfficientNet numbers: parameters, the paper's resolution (the models' default input; torchvision
#: crops B2 at 288, not 260) and GMACs there, and GMACs at 224 px.
EFFICIENTNET_REFERENCE = {
    "efficientnet_b0": (5_288_548, 224, 0.386, 0.386), "efficientnet_b1": (7_794_184, 240, 0.687, 0.570),
    "efficientnet_b2": (9_109_994, 260, 0.994, 0.659), "efficientnet_b3": (12_233_232, 300, 1.827, 0.963),
    "efficientnet_b4": (19_341_616, 380, 4.394, 1.504), "efficientnet_b5": (30_389_784, 456, 10.266, 2.356),
    "efficientnet_b6": (43_040_704, 528, 19.068, 3.360), "efficientnet_b7": (66_347_960, 600, 37.746, 5.170),
}


def _on_meta(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):  # shapes only: counting needs no weights or arithmetic
        return create_model(name, **kwargs)


@pytest.mark.parametrize("name", sorted(TORCHVISION_REFERENCE))
def test_every_reference_count_and_macs_at_224(name):
    params, gmacs = TORCHVISION_REFERENCE[name]
    model = _on_meta(name)
    assert n_params(model) == params
    assert profile(model).macs / 1e9 == pytest.approx(gmacs, abs=0.0005)


@pytest.mark.parametrize("name", sorted(EFFICIENTNET_REFERENCE))
def test_efficientnet_counts_and_macs_at_its_resolution_and_at_224(name):
    params, resolution, gmacs_there, gmacs_at_224 = EFFICIENTNET_REFERENCE[name]
    model = _on_meta(name)
    assert n_params(model) == params and model.default_input_size == (3, resolution, resolution)
    assert profile(model, (3, resolution, resolution)).macs / 1e9 == pytest.approx(gmacs_there, abs=0.0005)
    assert profile(model).macs / 1e9 == pytest.approx(gmacs_at_224, abs=0.0005)
    if name == "efficientnet_b2":  # torchvision's `_ops`, at its 288 px crop
        assert profile(model, (3, 288, 288)).macs / 1e9 == pytest.approx(1.088, abs=0.0005)


def test_se_resnets_match_the_computed_reference():
    """SE-ResNet-34/101 have no torchvision model to compare against: the reference's counts computed from the
    architecture; SE-ResNet-50 is ResNet-50 v1.5's 4.089 GMACs plus the SE blocks' 2.5 MMACs."""
    assert n_params(_on_meta("se_resnet34")) == 21_958_868
    assert n_params(_on_meta("se_resnet101")) == 49_326_872
    assert profile(_on_meta("se_resnet50")).macs / 1e9 == pytest.approx(4.089 + 0.0025, abs=0.0005)


@pytest.mark.parametrize("name, gmacs", [("resnet50", 4.089), ("efficientnet_b0", 0.386), ("alexnet", 0.714),
                                         ("densenet121", 2.834)])
def test_macs_at_224_match_torchvision_ops(name, gmacs):
    assert profile(create_model(name)).macs / 1e9 == pytest.approx(gmacs, rel=0.005)


def test_googlenet_macs_and_inference_params_exclude_training_only_aux_heads():
    """The parameter count included the auxiliary heads (13.0 M) beside MACs without them: the report's
    accuracy-vs-parameters plot put GoogLeNet at twice the size torchvision and the paper give it."""
    googlenet = profile(create_model("googlenet", torchvision_compat=True))
    assert googlenet.macs / 1e9 == pytest.approx(1.498, rel=0.005)
    assert (googlenet.params, googlenet.inference_params) == (13_004_888, 6_624_904)
    resnet = profile(create_model("resnet18"))
    assert resnet.inference_params == resnet.params == 11_689_512


def test_profile_defaults_to_the_models_own_channels():
    """The default was 3x224x224 whatever the model: a 1-channel model failed with a channel mismatch."""
    assert profile(create_model("resnet18", in_chans=1, num_classes=10)).input_size == (1, 224, 224)
    assert profile(create_model("efficientnet_b3")).input_size == (3, 224, 224)  # torchvision's convention
    assert profile(create_model("lenet5")).input_size[1:] == (32, 32)  # it cannot take 224 px: its own size


TORCHVISION_ARCHS = [
    "alexnet",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "googlenet",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "densenet121", "densenet161", "densenet169", "densenet201",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
]


def _randomise_norm_stats(model: torch.nn.Module) -> None:
    # Fresh BN layers are the identity in eval mode; random statistics make the comparison meaningful.
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)


def _fast_random_weights(model: torch.nn.Module) -> None:
    # torchvision's own init of VGG's 100M-parameter classifier takes seconds; a fan-in scaled uniform
    # fill is as good for comparing two implementations and an order of magnitude cheaper.
    generator = torch.Generator().manual_seed(0)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.ndim > 1:
            bound = (3.0 / (tensor[0].numel())) ** 0.5
            tensor.uniform_(-bound, bound, generator=generator)
        elif name.endswith("bias"):
            tensor.uniform_(-0.1, 0.1, generator=generator)


@pytest.mark.parametrize("name", TORCHVISION_ARCHS)
@torch.no_grad()
def test_torchvision_state_dict_loads_strictly_and_gives_same_outputs(name):
    torch.manual_seed(0)
    tv_kwargs = {"init_weights": True} if name == "googlenet" else {}
    with torch.device("meta"):
        reference = torchvision.models.get_model(name, weights=None, num_classes=10, **tv_kwargs)
    reference = reference.to_empty(device="cpu").eval()
    _fast_random_weights(reference)
    _randomise_norm_stats(reference)
    ours_kwargs = {"torchvision_compat": True} if name == "googlenet" else {}
    with torch.device("meta"):  # every tensor is overwritten by the strict load below
        ours = create_model(name, num_classes=10, **ours_kwargs)
    ours = ours.to_empty(device="cpu").eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    expected = reference(x)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().max() > 1e-3  # the comparison is not between two near-zero outputs


@torch.no_grad()
def test_torchvision_published_densenet_weights_load_with_their_legacy_keys():
    """torchvision's DenseNet weight files name the layers' modules the old way (``denselayer1.norm.1.weight``)
    and torchvision renames them as it loads them; a strict load of such a file failed here."""
    import re

    torch.manual_seed(0)
    reference = torchvision.models.densenet121(weights=None, num_classes=10).eval()
    _randomise_norm_stats(reference)
    # As in the files: saved by a torch before batch norm counted its batches (no num_batches_tracked, no
    # version metadata: batch norm fills it in as it loads).
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
              for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy  # the published files' layout
    ours = create_model("densenet121", num_classes=10).eval()
    ours.load_state_dict(legacy, strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)


def test_option_values_of_the_wrong_type_are_refused():
    """``small_input="no"`` built the small-input stem (a non-empty string is true), ``se_reduction=0`` the plain
    ResNet-50 under the SE name, ``num_classes=True`` a one-class head."""
    with pytest.raises(TypeError, match="small_input must be true or false, got 'no'"):
        create_model("resnet18", small_input="no")
    with pytest.raises(TypeError, match="stem_stride must be an integer, got 2.0"):
        create_model("resnet18", small_input=True, stem_stride=2.0)
    with pytest.raises(TypeError, match="dropout must be a number, got True"):
        create_model("efficientnet_b0", dropout=True)
    # NaN passes nn.Dropout's range check: the model built, and its every forward (eval too) failed in dropout.
    for name in ("vgg11", "alexnet", "googlenet", "efficientnet", "se_vgg11_bn", "se_googlenet"):
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\], got nan"):
            create_model(name, dropout=float("nan"))
    with pytest.raises(ValueError, match=r"dropout_aux must be in \[0, 1\], got nan"):
        cnnmodels.googlenet.GoogLeNet(dropout_aux=float("nan"))
    with pytest.raises(ValueError, match="se_reduction must be a positive integer, got 0"):
        create_model("se_resnet50", se_reduction=0)
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got True"):
        create_model("resnet18", num_classes=True)
    assert create_model("efficientnet", phi=1, alpha=1, beta=1.2, gamma=1.2, num_classes=10)  # ints for floats
    # DenseNet applies its dropout functionally: a bad rate passed the build and failed the first forward pass.
    for rate in (5, 1.0, -0.1):
        with pytest.raises(ValueError, match="drop_rate must be in"):
            create_model("densenet121", drop_rate=rate)
    assert create_model("densenet121", drop_rate=0.2, num_classes=3)


def test_the_paper_family_keeps_the_papers_coefficients():
    """``efficientnet_paper_phi1`` built with other coefficients was accepted and recorded under the paper's name."""
    assert cnnmodels.resolve_model_name("efficientnet_paper_phi1")[1] == {"phi": 1.0, "alpha": 1.2, "beta": 1.1,
                                                                          "gamma": 1.15}
    with pytest.raises(ValueError, match="got alpha=1.4, but the name means alpha=1.2"):
        create_model("efficientnet_paper_phi1", alpha=1.4)
    assert create_model("efficientnet_paper_phi1", alpha=1.2, num_classes=10)  # the paper's own: fine


# One architecture per block type; the deeper variants stack the same blocks.
@pytest.mark.parametrize("name", ["alexnet", "vgg11_bn", "googlenet", "resnet18", "resnet101", "densenet121",
                                  "efficientnet_b0"])
def test_training_step_runs_the_same_kernels_as_torchvision(name):
    # Same kernels on the same shapes, forward and backward: equal cost by construction, so any
    # throughput gap bench/models.py shows is measurement noise. Meta tensors make this free to check.
    with torch.device("meta"):
        ours = create_model(name, num_classes=10, **({"torchvision_compat": True} if name == "googlenet" else {}))
        reference = torchvision.models.get_model(name, weights=None, num_classes=10,
                                                 **({"init_weights": True} if name == "googlenet" else {}))
    ours_calls, reference_calls = training_step_kernels(ours), training_step_kernels(reference)
    assert ours_calls == reference_calls, (
        f"only ours: {(ours_calls - reference_calls).most_common(5)}; "
        f"only torchvision: {(reference_calls - ours_calls).most_common(5)}")


def test_kernel_counter_sees_a_one_kernel_difference_and_leaves_the_model_alone():
    def conv_relu(inplace: bool) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(inplace=inplace), torch.nn.Flatten())

    model = conv_relu(inplace=False)
    calls = training_step_kernels(model, input_size=(3, 8, 8))
    assert next(model.parameters()).device.type == "cpu"  # counted on a meta copy
    assert calls[("aten.relu", ((2, 4, 6, 6),))] == 1
    assert calls != training_step_kernels(conv_relu(inplace=True), input_size=(3, 8, 8))
    # A model already on meta is counted on a copy too: counting it twice gives the same counter (gradients left
    # on it added their accumulation to the second count) and leaves it in eval mode.
    with torch.device("meta"):
        on_meta = conv_relu(inplace=False).eval()
    assert training_step_kernels(on_meta, input_size=(3, 8, 8)) == training_step_kernels(on_meta, input_size=(3, 8, 8))
    assert not on_meta.training and all(p.grad is None for p in on_meta.parameters())


def test_unknown_model_name_lists_closest_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet05'.*'resnet50'"):
        create_model("resnet05")


def test_unknown_keyword_raises_type_error_naming_it():
    with pytest.raises(TypeError, match=r"'small_inputs'.*did you mean 'small_input'"):
        create_model("resnet18", small_inputs=True)


def test_bad_option_values_are_rejected():
    with pytest.raises(ValueError, match="inception"):
        create_model("googlenet", inception="fancy")
    with pytest.raises(ValueError, match="gamma"):
        create_model("efficientnet", phi=1, gamma=0.9)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", num_classes=0)


def test_list_models_covers_every_family_and_filters():
    names = cnnmodels.list_models()
    for expected in ["lenet5", "alexnet", "vgg19_bn", "googlenet", "resnet152", "densenet201", "se_resnet50",
                     "se_googlenet", "se_vgg16_bn", "efficientnet_b7", "efficientnet"]:
        assert expected in names
    assert cnnmodels.list_models("se_*") == sorted(n for n in names if n.startswith("se_"))


def test_cnnmodels_imports_neither_ray_nor_mlflow():
    code = ("import sys, cnnmodels; cnnmodels.create_model('resnet18'); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_family_members_are_named_by_the_registry():
    """``efficientnet_phi1`` is the compound-scaled builder at phi 1; the naming rule lives in cnnmodels."""
    assert cnnmodels.resolve_model_name("resnet18") == ("resnet18", {})
    assert cnnmodels.resolve_model_name("efficientnet_phi0p5") == ("efficientnet", {"phi": 0.5})
    assert cnnmodels.family_member_name("efficientnet", 2.0) == "efficientnet_phi2"
    assert cnnmodels.family_member_name("efficientnet", 0.5) == "efficientnet_phi0p5"
    assert cnnmodels.is_family_member("efficientnet_phi1") and not cnnmodels.is_family_member("efficientnet_b1")
    assert "efficientnet_phi1" not in cnnmodels.list_models()
    torch.manual_seed(0)
    member = create_model("efficientnet_phi1", num_classes=10, alpha=1.3)
    torch.manual_seed(0)
    direct = create_model("efficientnet", num_classes=10, phi=1.0, alpha=1.3)
    assert member.default_input_size == direct.default_input_size == (3, 258, 258)
    assert n_params(member) == n_params(direct)
    assert cnnmodels.model_options("efficientnet_phi2")["phi"] == 2.0
    assert n_params(create_model("efficientnet_phi1", num_classes=10, phi=1.0)) > 0  # the same phi: fine
    with pytest.raises(ValueError, match=r"got phi=2.0, but the name means phi=1.0; pass 'efficientnet'"):
        create_model("efficientnet_phi1", num_classes=10, phi=2.0)  # would be a phi-2 model named phi1
    with pytest.raises(ValueError, match="did you mean"):
        cnnmodels.resolve_model_name("efficientnet_phiX")
    # A name stands for one model: a phi its name cannot spell exactly, or no number at all, gets no name.
    for phi in (1.2345678, float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="named for finite phi >= 0 of at most 6 significant digits"):
            cnnmodels.family_member_name("efficientnet", phi)
    for phi in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match=f"phi must be a finite number >= 0, got {phi}"):
            create_model("efficientnet", num_classes=10, phi=phi)


def test_the_paper_family_has_names_of_its_own():
    """``efficientnet_paper_phi1``: the builder's defaults (the paper's coefficients) at phi 1, named apart from
    the searched ``efficientnet_phi1`` so that both can be trained side by side."""
    assert cnnmodels.family_member_name("efficientnet", 1.0, prefix="efficientnet_paper_phi") == \
        "efficientnet_paper_phi1"
    assert cnnmodels.family_member_name("efficientnet", 1.0) == "efficientnet_phi1"  # the first family stays default
    assert cnnmodels.resolve_model_name("efficientnet_paper_phi1p5") == (
        "efficientnet", {"phi": 1.5, "alpha": 1.2, "beta": 1.1, "gamma": 1.15})
    assert cnnmodels.family_of("efficientnet_paper_phi2") == "efficientnet_paper_phi"
    assert cnnmodels.family_of("efficientnet_phi2") == "efficientnet_phi"
    assert cnnmodels.family_of("resnet18") is None
    paper = create_model("efficientnet_paper_phi1", num_classes=10)
    assert paper.compound == {"phi": 1.0, "alpha": 1.2, "beta": 1.1, "gamma": 1.15, "base_resolution": 224}
    with pytest.raises(ValueError, match="no registered family under the prefix 'efficientnet_b'"):
        cnnmodels.family_member_name("efficientnet", 1.0, prefix="efficientnet_b")


@pytest.mark.parametrize("name, kwargs, image_size, expected", [
    ("lenet5", {}, 16, 32),  # raised to LeNet-5's 32x32
    ("lenet5", {}, 224, 32),  # ... and lowered to it: C5 and F6 take 32 to 35 px
    ("lenet5", {}, 35, 35),
    ("resnet18", {"small_input": True}, 16, 16),
    ("resnet18", {}, 16, 32),
    ("alexnet", {}, 32, 63),
    ("efficientnet_b0", {}, 16, 224),  # B0-B7 train at their table's resolution
    ("efficientnet_b0", {"small_input": True}, 28, 28),  # ... unless adapted to small images
    ("efficientnet", {"phi": 1.0, "gamma": 1.15, "base_resolution": 16, "small_input": True}, 16, 18),
])
def test_input_size_for_comes_from_the_model(name, kwargs, image_size, expected):
    with torch.device("meta"):
        model = create_model(name, num_classes=10, in_chans=1, **kwargs)
    assert model.input_size_for(image_size) == expected


def test_a_too_small_input_names_the_models_minimum():
    lenet = create_model("lenet5", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match=r"lenet5 needs inputs of at least 32x32 pixels, got 28x28"):
        lenet(torch.zeros(1, 1, 28, 28))
    assert lenet(torch.zeros(1, 1, 35, 35)).shape == (1, 10)
    with pytest.raises(ValueError, match=r"lenet5 takes inputs of at most 35x35 pixels, got 36x36"):
        lenet(torch.zeros(1, 1, 36, 36))  # not a shape error in F6's matrix product
    googlenet = create_model("googlenet", num_classes=10).train()
    with pytest.raises(ValueError, match="at least 32x32"):
        googlenet(torch.zeros(2, 3, 16, 16))
    # The check survives torch.fx tracing (the server folds batch norm with it) as one opaque call.
    from torch.fx.experimental.optimization import fuse

    folded = fuse(create_model("resnet18", num_classes=10).eval())
    assert folded(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="resnet18 needs inputs of at least 32x32"):
        folded(torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize("name", ["resnet18", "se_resnet18"])
def test_a_strided_small_input_stem_quarters_the_work_and_keeps_the_weights(name):
    full = create_model(name, num_classes=10, in_chans=1, small_input=True)
    strided = create_model(name, num_classes=10, in_chans=1, small_input=True, stem_stride=2)
    # Same modules and shapes (a checkpoint of one loads into the other); every layer after the stem sees a
    # quarter of the positions.
    assert {k: v.shape for k, v in full.state_dict().items()} == {k: v.shape for k, v in strided.state_dict().items()}
    ratio = profile(strided, (1, 28, 28)).macs / profile(full, (1, 28, 28)).macs
    assert 0.24 < ratio < 0.27
    assert strided(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="stem_stride applies to the small-input stem only"):
        create_model(name, stem_stride=2)
    with pytest.raises(ValueError, match="stem_stride must be 1 or 2"):
        create_model(name, small_input=True, stem_stride=3)
