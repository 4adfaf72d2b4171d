"""cnnmodels: every architecture trains at small input sizes; interface, options and GoogLeNet's aux heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ONE_PER_BLOCK_TYPE

import cnnmodels
from cnnmodels import GoogLeNetOutputs, create_model, googlenet_loss, profile


def small_model(name: str, in_chans: int = 3, num_classes: int = 10, **kwargs) -> torch.nn.Module:
    if name != "lenet5":
        kwargs.setdefault("small_input", True)
    return create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)


def fixed_small_batch(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The small-input model without dropout or stochastic depth, and 4 images at its smallest input."""
    torch.manual_seed(0)
    options = cnnmodels.model_options(name)
    kwargs = {key: 0.0 for key in ("dropout", "stochastic_depth_prob") if key in options}
    model = small_model(name, in_chans=1, **kwargs)
    side = model.min_input_size
    return model, torch.randn(4, 1, side, side), torch.tensor([0, 1, 2, 3])


@pytest.mark.slow
@pytest.mark.parametrize("name", ONE_PER_BLOCK_TYPE)
def test_one_model_per_block_type_overfits_a_fixed_small_batch(name):
    """Forward and backward at the model's smallest input; the loss falls over 20 optimizer steps.

    Dropout and stochastic depth are switched off so that the check is about the architecture's ability to
    learn, not about regularisation noise on a 4-image batch.
    """
    model, x, y = fixed_small_batch(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, fused=True)
    model.train()
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = googlenet_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < 0.8 * losses[0], losses
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def test_the_block_type_list_covers_every_model_file():
    assert {cnnmodels.get_model_builder(n).__module__ for n in ONE_PER_BLOCK_TYPE} == {
        cnnmodels.get_model_builder(n).__module__ for n in cnnmodels.list_models()}


@pytest.mark.parametrize("name", sorted(set(cnnmodels.list_models()) - set(ONE_PER_BLOCK_TYPE)))
def test_every_other_model_trains_a_step_with_a_finite_gradient_everywhere(name):
    """The deeper and wider variants repeat the blocks above in other counts and widths: one training step
    at the smallest input reaches every parameter with a finite gradient, and the loss is finite."""
    model, x, y = fixed_small_batch(name)
    model.train()
    loss = googlenet_loss(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["lenet5", "alexnet", "vgg11_bn", "googlenet", "resnet18", "densenet121",
                                  "se_resnet18", "se_googlenet", "efficientnet_b0", "efficientnet_b3"])
@torch.no_grad()
def test_training_from_scratch_starts_near_chance_with_few_classes(name):
    """The initial loss is about ln(num_classes): huge initial logits (EfficientNet's reference classifier
    init, scaled for 1000 classes, gave a loss of ~5 at 10 classes) cost the first epochs of a short run."""
    torch.manual_seed(0)
    model = small_model(name, in_chans=1).train()
    side = model.min_input_size
    logits = model(torch.randn(32, 1, side, side))
    logits = logits[0] if isinstance(logits, tuple) else logits
    loss = F.cross_entropy(logits, torch.randint(0, 10, (32,))).item()
    assert loss < 2.0 * math.log(10), loss


@pytest.mark.parametrize("name", ["lenet5", "alexnet", "vgg11_bn", "googlenet", "resnet18", "densenet121",
                                  "se_resnet18", "se_googlenet", "se_vgg11_bn", "efficientnet_b0", "efficientnet"])
@pytest.mark.parametrize("in_chans, side", [(1, 28), (3, 32)])
@torch.no_grad()
def test_small_images_run_at_28_and_32_pixels(name, in_chans, side):
    model = small_model(name, in_chans=in_chans).eval()
    if name == "lenet5":
        side = 32  # LeNet-5 is defined for 32x32 input; the pipeline resizes to default_input_size.
    features = model.forward_features(torch.randn(2, in_chans, side, side))
    assert features.ndim == 4 and torch.isfinite(features).all()
    assert model.forward_head(features).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "googlenet", "efficientnet_b0"])
@torch.no_grad()
def test_small_input_keeps_spatial_detail_before_the_last_stage(name):
    # At 32 px the ImageNet stems collapse the map to 1x1; the small-input stems keep at least 2x2.
    x = torch.randn(1, 3, 32, 32)
    small = create_model(name, small_input=True).eval().forward_features(x)
    standard = create_model(name).eval().forward_features(x)
    assert small.shape[-1] >= 2 and small.shape[-1] > standard.shape[-1]


@pytest.mark.parametrize("name", ["resnet50", "vgg11_bn", "densenet121", "efficientnet_b0", "googlenet", "lenet5"])
@torch.no_grad()
def test_forward_is_features_then_head_and_classifier_resets(name):
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(2, *model.default_input_size)
    torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)))
    pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pre_logits.shape == (2, model.get_classifier().in_features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    assert model.get_classifier().out_features == 3


@pytest.mark.parametrize("name, kwargs", [("googlenet", {"small_input": True}), ("lenet5", {"variant": "paper"})])
def test_a_reset_classifier_keeps_the_models_dtype(name, kwargs):
    """Every new head (GoogLeNet's auxiliary classifiers too) takes the model's dtype: a bfloat16 model still
    trains after ``reset_classifier``."""
    model = create_model(name, num_classes=10, **kwargs).to(torch.bfloat16).train()
    model.reset_classifier(3)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    outputs = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    for logits in outputs if isinstance(outputs, tuple) else (outputs,):
        assert logits.shape == (2, 3)


def test_googlenet_aux_heads_only_in_training_mode():
    model = small_model("googlenet")
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    model.train()
    out = model(x)
    assert isinstance(out, GoogLeNetOutputs)
    assert out.logits.shape == out.aux_logits1.shape == out.aux_logits2.shape == (4, 10)
    expected = F.cross_entropy(out.logits, y) + 0.3 * (F.cross_entropy(out.aux_logits1, y)
                                                       + F.cross_entropy(out.aux_logits2, y))
    torch.testing.assert_close(googlenet_loss(out, y), expected)
    model.eval()
    with torch.no_grad():
        plain = model(x)
    assert isinstance(plain, torch.Tensor) and plain.shape == (4, 10)
    no_aux = small_model("googlenet", aux_logits=False).train()
    assert isinstance(no_aux(x), torch.Tensor)
    model.train().aux_logits = False  # torchvision's switch, as fine-tuning code flips it
    assert isinstance(model(x), torch.Tensor)


def test_naive_inception_concatenates_without_reductions():
    naive = create_model("googlenet", inception="naive", aux_logits=False)
    # The pool branch keeps all input channels, so 3a outputs 64 + 128 + 32 + 192 and widths keep growing.
    assert naive.inception3a.out_channels == 416
    assert not isinstance(naive.inception3a.branch2, torch.nn.Sequential)
    assert naive.fc.in_features > 1024
    reduced = create_model("googlenet", aux_logits=False)
    assert reduced.inception3a.branch3[1].conv.kernel_size == (5, 5)
    assert create_model("googlenet", torchvision_compat=True).inception3a.branch3[1].conv.kernel_size == (3, 3)
    # torchvision's 2x2 pool before 5a in both modes: models trained with it keep their layout (googlenet.py)
    assert reduced.maxpool4.kernel_size == 2


def test_se_blocks_sit_where_the_paper_puts_them():
    se_resnet = create_model("se_resnet50")
    assert se_resnet.layer1[0].se.fc1.out_channels == 256 // 16
    se_googlenet = create_model("se_googlenet")
    assert se_googlenet.inception3a.se.fc1.in_channels == 256
    se_vgg = create_model("se_vgg11_bn")
    kinds = [type(m).__name__ for m in se_vgg.features]
    assert kinds[:4] == ["Conv2d", "BatchNorm2d", "ReLU", "SqueezeExcitation"]


def test_se_on_residual_branch_before_the_addition():
    block = create_model("se_resnet18", small_input=True).layer1[0].eval()
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        block.se.fc2.bias.fill_(-50.0)  # the gate closes: the branch vanishes, only relu(x) remains
        torch.testing.assert_close(block(x), torch.relu(x))


def test_zero_init_residual_makes_blocks_start_as_identity():
    model = create_model("resnet50", zero_init_residual=True)
    assert all(b.bn3.weight.abs().sum() == 0 for stage in (model.layer1, model.layer4) for b in stage)
    basic = create_model("resnet18", zero_init_residual=True)
    assert basic.layer2[1].bn2.weight.abs().sum() == 0


def test_densenet_memory_efficient_gives_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = create_model("densenet121", num_classes=5, small_input=True)
    efficient = create_model("densenet121", num_classes=5, small_input=True, memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 16, 16)
    for model in (plain, efficient):
        model.train()
        model(x).sum().backward()
    torch.testing.assert_close(efficient(x), plain(x))
    torch.testing.assert_close(efficient.features.conv0.weight.grad, plain.features.conv0.weight.grad)


def test_densenet_transitions_compress_by_half():
    model = create_model("densenet121")
    assert model.features.transition1.conv.in_channels == 64 + 6 * 32
    assert model.features.transition1.conv.out_channels == (64 + 6 * 32) // 2


def test_efficientnet_stochastic_depth_grows_linearly_and_is_off_in_eval():
    model = create_model("efficientnet_b0")
    probs = [m.stochastic_depth.p for m in model.modules() if hasattr(m, "stochastic_depth")]
    assert probs == pytest.approx([0.2 * i / 16 for i in range(16)])  # B0's 16 blocks, 0 up to 0.2 (exclusive)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        model.train()  # features only: the classifier's dropout would make the outputs differ on its own
        assert not torch.allclose(model.forward_features(x), model.forward_features(x))
        model.eval()
        torch.testing.assert_close(model(x), model(x))


def test_default_input_sizes():
    assert create_model("resnet18").default_input_size == (3, 224, 224)
    assert create_model("resnet18", in_chans=1, small_input=True).default_input_size == (1, 32, 32)
    assert create_model("efficientnet_b3").default_input_size == (3, 300, 300)
    assert create_model("lenet5", in_chans=1).default_input_size == (1, 32, 32)


def test_profile_leaves_every_modules_mode_as_it_was():
    """A partly frozen model (batch norm kept in eval mode while fine-tuning) stays so: profile() set every module
    back to the top-level mode, unfreezing it."""
    model = create_model("resnet18", num_classes=10, small_input=True).train()
    model.layer1.eval()
    profile(model, (3, 32, 32))
    assert model.training and model.layer2[0].bn1.training
    assert not model.layer1.training and not model.layer1[0].bn1.training


def test_lenet5_rbf_logits_are_computed_in_float32_under_bfloat16():
    """The paper variant's logits are sums of 84 squares (about -100): in bfloat16 they lost whole units."""
    from cnnmodels.lenet import RBFOutput

    rbf = RBFOutput(84, 10)
    x = (torch.randn(4, 84) * 1.7).to(torch.bfloat16)
    expected = -(x.float().unsqueeze(-2) - rbf.prototypes).pow(2).sum(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = rbf(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected)


def test_profile_reports_stages_that_sum_to_the_total():
    prof = profile(create_model("resnet18", num_classes=10, small_input=True), (3, 32, 32))
    assert sum(s.macs for s in prof.stages) == prof.macs
    assert sum(s.params for s in prof.stages) == prof.params
    assert [s.output_shape for s in prof.stages if s.name == "layer4"] == [(512, 4, 4)]
