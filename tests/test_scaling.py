"""Compound scaling math and the compound-scaled EfficientNet builder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cnnmodels import create_model, scaling
from cnnmodels.efficientnet import B0_STAGES
from cnnmodels.scaling import PAPER_COEFFICIENTS, CompoundCoefficients


def test_paper_coefficients_satisfy_the_constraint():
    assert PAPER_COEFFICIENTS.product == pytest.approx(1.2 * 1.1**2 * 1.15**2)
    assert PAPER_COEFFICIENTS.product == pytest.approx(1.92027, abs=1e-5)
    assert PAPER_COEFFICIENTS.satisfies(target=2.0, tolerance=0.1)
    assert not CompoundCoefficients(1.5, 1.2, 1.2).satisfies(target=2.0, tolerance=0.1)


@pytest.mark.parametrize("phi", [0, 1, 2, 3])
def test_multipliers_and_resolution_follow_the_rule(phi):
    m = PAPER_COEFFICIENTS.multipliers(phi, base_resolution=224)
    assert m.depth == pytest.approx(1.2**phi)
    assert m.width == pytest.approx(1.1**phi)
    assert m.resolution == round(224 * 1.15**phi)
    assert PAPER_COEFFICIENTS.flops_growth(phi) == pytest.approx(1.92027**phi, rel=1e-4)


@pytest.mark.parametrize("phi", [0, 1, 2, 3])
def test_compound_builder_applies_the_multipliers(phi):
    with torch.device("meta"):
        model = create_model("efficientnet", phi=phi, alpha=1.2, beta=1.1, gamma=1.15)
    assert model.default_input_size == (3, round(224 * 1.15**phi), round(224 * 1.15**phi))
    stages = list(model.features)[1:-1]
    for stage, base in zip(stages, B0_STAGES, strict=True):
        assert len(stage) == math.ceil(base.num_layers * 1.2**phi)
        assert stage[-1].out_channels == scaling.make_divisible(base.out_channels * 1.1**phi, 8)
    assert model.features[0][0].out_channels == scaling.make_divisible(32 * 1.1**phi, 8)


def test_compound_builder_at_phi_zero_is_b0():
    with torch.device("meta"):
        b0 = create_model("efficientnet_b0")
        scaled = create_model("efficientnet", phi=0)
    assert {k: v.shape for k, v in b0.state_dict().items()} == {k: v.shape for k, v in scaled.state_dict().items()}


def test_base_resolution_is_configurable():
    model = create_model("efficientnet", phi=2, gamma=1.15, base_resolution=32, small_input=True, num_classes=10)
    assert model.default_input_size[1] == round(32 * 1.15**2) == 42
    assert model(torch.randn(2, 3, 42, 42)).shape == (2, 10)


def test_rounding_rules_match_the_official_code():
    assert scaling.make_divisible(32 * 1.1) == 32  # 35.2 -> 32 (within 10%)
    assert scaling.make_divisible(16 * 1.4) == 24  # 22.4 -> 24
    assert scaling.make_divisible(10) == 16  # never below the divisor... and 8 would be >10% down
    assert scaling.scale_depth(3, 1.1) == 4  # rounded up
    assert scaling.scale_depth(1, 1.0) == 1


def test_feasible_grid_only_holds_triples_within_tolerance():
    grid = scaling.feasible_grid((1.0, 1.4), (1.0, 1.4), (1.0, 1.4), step=0.05, target=2.0, tolerance=0.1)
    assert grid, "the paper's region is feasible"
    assert all(abs(c.product - 2.0) <= 0.1 + 1e-9 for c in grid)
    assert any((c.alpha, c.beta, c.gamma) == (1.2, 1.1, 1.15) for c in grid)
    assert scaling.feasible_grid((1.5, 2.0), (1.5, 2.0), (1.5, 2.0), 0.1, target=2.0, tolerance=0.1) == []


def test_coefficients_below_one_are_rejected():
    with pytest.raises(ValueError, match="beta"):
        CompoundCoefficients(1.2, 0.9, 1.1)


def test_a_compound_member_never_asks_for_inputs_below_what_its_stem_takes():
    """16 px data without the small-input stem: phi 1 scales the resolution to 18, but the standard stem needs
    32; planning profiled the model at 18 px and the stage failed after validation had passed."""
    import cnnmodels

    model = cnnmodels.create_model("efficientnet", num_classes=10, phi=1.0, base_resolution=16, small_input=False)
    assert model.resolution == 18 and model.input_size_for(16) == 32
    assert cnnmodels.profile(model, (3, 32, 32)).macs > 0
    small = cnnmodels.create_model("efficientnet", num_classes=10, phi=1.0, base_resolution=16, small_input=True)
    assert small.input_size_for(16) == 18  # the scaled resolution where the model takes it
    # Its default input too: (3, 18, 18) was refused by the model itself, profile(model, default) included.
    assert model.default_input_size == (3, 32, 32) and small.default_input_size == (3, 18, 18)
    assert cnnmodels.profile(model, model.default_input_size).macs > 0


def test_a_stochastic_depth_out_of_range_is_refused_by_its_name():
    """A stochastic_depth_prob of 1.5 failed in a block with "drop probability must be in [0, 1), got 1.03125"
    (neither the option nor the value given)."""
    import cnnmodels

    for value in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=f"stochastic_depth_prob must be in \\[0, 1\\], got {value}"):
            cnnmodels.create_model("efficientnet_b0", stochastic_depth_prob=value)
    cnnmodels.create_model("efficientnet_b0", stochastic_depth_prob=1.0)  # its last block drops (n-1)/n: fine


@pytest.mark.parametrize("storage, nodes, mounts, warned", [
    ("/home/ray/runs/ray_results", 3, "overlay / overlay rw 0 0\n", True),  # the container's own disk
    ("/home/ray/runs/ray_results", 1, "overlay / overlay rw 0 0\n", False),  # a single node: nothing to share
    ("s3://bucket/ray", 3, "", False),
    # Shared mounts at the same path on every node: NFS/EFS, a FUSE-mounted bucket (the longest mount point wins).
    ("/mnt/efs/ray", 3, "overlay / overlay rw 0 0\nfs-1:/ /mnt/efs nfs4 rw 0 0\n", False),
    ("/mnt/bucket/ray", 2, "/dev/root / ext4 rw 0 0\ns3fs /mnt/bucket fuse.s3fs rw 0 0\n", False),
    ("/mnt/bucket/ray", 2, "/dev/root / ext4 rw 0 0\nmountpoint-s3 /mnt/bucket fuse rw 0 0\n", False),
    # ... but not every FUSE file system: a rootless container's root (fuse-overlayfs) is the node's own disk
    ("/home/u/ray", 3, "fuse-overlayfs / fuse.fuse-overlayfs rw 0 0\n", True),
    ("/mnt/jfs/ray", 3, "/dev/root / ext4 rw 0 0\nJuiceFS:vol /mnt/jfs fuse.JuiceFS rw 0 0\n", False),
    ("/mnt/mfs/ray", 3, "/dev/root / ext4 rw 0 0\nmfsmaster:9421 /mnt/mfs fuse.mfs rw 0 0\n", False),
    ("/mnt/efs-local/ray", 3, "/dev/root / ext4 rw 0 0\nfs-1:/ /mnt/efs nfs4 rw 0 0\n", True),  # not under it
    ("/mnt/my dir/ray", 3, "/dev/root / ext4 rw 0 0\nfs-1:/ /mnt/my\\040dir nfs rw 0 0\n", False),  # escaped space
    # Two mounts on one point (autofs, then the NFS share it mounted): the later is the one in use.
    ("/shared/ray", 3, "/dev/root / ext4 rw 0 0\n/etc/auto.direct /shared autofs rw 0 0\n"
                       "nfs:/export /shared nfs4 rw 0 0\n", False),
])
def test_a_node_local_storage_path_on_a_cluster_is_warned_of(storage, nodes, mounts, warned):
    """storage_path on one node's disk: Ray Train's workers on other nodes fail at their first checkpoint, after
    an epoch, once per train.max_failures retry; nothing said so before the stage started. (Any FUSE mount was
    taken for a shared one.)"""
    from pipelines.runtime import node_local_storage_warning

    message = node_local_storage_warning(storage, nodes, mounts)
    assert (message is not None) is warned
    if warned:
        assert storage in message and "Unable to set up cluster storage" in message


def test_a_run_of_more_workers_than_the_autoscaler_may_ever_run_is_counted_against_its_limits():
    """cluster.yaml's 4 x g5.xlarge (one GPU each) took train.num_workers: 8 with use_gpu: every worker fitted a
    node type, the autoscaler stopped at 4 nodes, and Ray Train retried the worker group without end."""
    from pipelines.runtime import NodeGroups, most_workers_placeable

    head, gpu_node = {"CPU": 8.0}, {"CPU": 4.0, "GPU": 1.0}
    cluster = NodeGroups([(gpu_node, 4)], 4)  # cluster.yaml: gpu_worker max_workers 4, max_workers 4
    one_gpu = {"CPU": 1.0, "GPU": 1.0}
    assert most_workers_placeable(one_gpu, False, [head], cluster) == 4
    assert most_workers_placeable(one_gpu, False, [head, gpu_node, gpu_node], cluster) == 4  # 2 up, 2 to add
    assert most_workers_placeable({"CPU": 1.0, "GPU": 0.5}, False, [head], cluster) == 8
    assert most_workers_placeable({"CPU": 6.0}, False, [head], cluster) == 1  # only the head holds 6 CPUs
    assert most_workers_placeable({"CPU": 1.0}, True, [head], cluster) == 5  # STRICT_SPREAD: one per node
    # The cluster's own cap: 4 worker nodes in all, the larger type first.
    mixed = NodeGroups([(gpu_node, 4), ({"CPU": 16.0}, 10)], 4)
    assert most_workers_placeable({"CPU": 1.0}, False, [head], mixed) == 8 + 4 * 16
    # Unknown limits or resources: nothing is refused.
    assert most_workers_placeable(one_gpu, False, [head], NodeGroups([(gpu_node, None)], None)) is None
    assert most_workers_placeable(one_gpu, False, [head], NodeGroups([({}, 4)], 4)) is None
    assert most_workers_placeable(one_gpu, False, [head, gpu_node], None) == 1  # no autoscaler: the nodes there
    # The head is no worker node, though it may have a worker type's shape; a node is one type's, not two.
    head_like = {"CPU": 4.0, "GPU": 1.0, "node:__internal_head__": 1.0}
    assert most_workers_placeable(one_gpu, False, [head_like], cluster) == 5
    assert most_workers_placeable({"CPU": 8.0}, False, [{"CPU": 8.0, "node:__internal_head__": 1.0},
                                                        {"CPU": 8.0}], NodeGroups([({"CPU": 8.0}, 2)], 2)) == 3
    spot_and_on_demand = NodeGroups([(gpu_node, 2), (gpu_node, 2)], None)
    assert most_workers_placeable(one_gpu, False, [head, gpu_node], spot_and_on_demand) == 4


def test_the_node_types_ray_up_leaves_on_the_head_count_as_nodes_it_can_add(tmp_path):
    """The GCS holds no autoscaler config for a `ray up` cluster in open-source Ray: cluster.yaml's GPU workers,
    at zero when a stage starts, were not counted (no CPU share from their shape, no warning of a node-local
    storage_path). `ray up` leaves its config, node types' resources filled in, on the head. Run in a process
    without Ray (this session's is one the tests started, which no node can join)."""
    import json
    import subprocess
    import sys

    import yaml

    launcher = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    launcher["available_node_types"]["head"]["resources"].update(CPU=8)  # as `ray up` fills them in
    launcher["available_node_types"]["gpu_worker"]["resources"] = {"CPU": 4, "GPU": 1, "memory": 1.2e10}
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(json.dumps(launcher))
    script = ("from pipelines.runtime import addable_node_groups as g, addable_node_types as a; "
              f"print(a({str(bootstrap)!r}), a({str(tmp_path / 'none.yaml')!r})); print(g({str(bootstrap)!r}))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "[{'CPU': 4.0, 'GPU': 1.0, 'memory': 12000000000.0}] None"
    # With how many of them, and of all workers, the autoscaler may run (cluster.yaml: 4 and 4).
    assert out.stdout.split("\n")[1] == ("NodeGroups(types=[({'CPU': 4.0, 'GPU': 1.0, 'memory': 12000000000.0}, 4)], "
                                         "max_workers=4)")
