"""cluster.yaml against Ray's own launcher schema (no cloud calls), and every shipped preset."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema(cluster):
    _validate(cluster)
    assert cluster["docker"]["image"].startswith("rayproject/ray:") and cluster["docker"]["image"].endswith("-gpu")
    assert "ray-ml" not in cluster["docker"]["image"]
    workers = cluster["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1
    assert workers["node_config"]["InstanceType"].startswith("g")


def test_nothing_listens_on_a_public_address(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "mlflow server --host $HEAD_IP" in head and "0.0.0.0" not in head
    assert "--serve-artifacts" in head and "sqlite:" in head


@pytest.mark.parametrize("mutation", [
    lambda c: c.update(max_worker=4),                                         # misspelled top-level key
    lambda c: c["docker"].update(imagee=c["docker"]["image"]),                # misspelled nested key
    lambda c: c.update(head_node_type="no-such-type"),                        # dangling reference
])
def test_a_broken_copy_fails_validation(cluster, mutation):
    broken = copy.deepcopy(cluster)
    mutation(broken)
    import jsonschema

    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate(broken)


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "pipelines" / "configs").glob("*.yaml")))
def test_every_preset_is_a_valid_config(preset, monkeypatch, tmp_path):
    from pipelines.config import load_config

    monkeypatch.setenv("CNNZOO_STORAGE_PATH", "s3://bucket/prefix")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    monkeypatch.setenv("CNNZOO_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("CNNZOO_SERVE_TOKEN", "preset-test-token")
    cfg = load_config(ROOT / "pipelines" / "configs" / preset)
    if cfg.train.use_gpu:
        assert cfg.paths.storage == "s3://bucket/prefix" and cfg.tracking_uri == "http://10.0.0.1:5000"
        assert cfg.ray.address == "auto"
