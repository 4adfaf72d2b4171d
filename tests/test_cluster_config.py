"""cluster.yaml against Ray's own launcher schema (no cloud calls), and every shipped preset."""

from __future__ import annotations

import copy
import json
import time
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
        # A GPU worker must fit cluster.yaml's GPU node, or it waits for good: the autoscaler has no node to
        # add for it (imagefolder-gpu's 4 loader processes asked for 5 CPUs of a 4-vCPU g5.xlarge).
        from pipelines.planning import auto_cpus_per_worker

        node = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]["gpu_worker"]
        vcpus = GPU_NODE_VCPUS[node["node_config"]["InstanceType"]]
        assert auto_cpus_per_worker(cfg, cluster_cpus=vcpus) <= vcpus, preset
        assert cfg.serve.num_cpus <= vcpus
        # cluster.yaml starts without GPU nodes: "auto" concurrency would count none and run one model at a
        # time, and the autoscaler would add one node for it.
        assert cfg.train.max_concurrent_models != "auto" and cfg.search.max_concurrent_trials != "auto", preset
        assert node["min_workers"] == 0
    else:  # the CPU presets run on the machine at hand: a local Ray, local storage and tracking, its CPUs
        from pipelines.planning import auto_cpus_per_worker

        assert cfg.ray.address is None and "://" not in cfg.paths.storage, preset
        assert cfg.tracking_uri.startswith("sqlite:///"), preset
        assert 0 < auto_cpus_per_worker(cfg, cluster_cpus=2) <= 2, preset


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "pipelines" / "configs").glob("*.yaml")))
def test_no_preset_trains_the_same_network_twice(preset, monkeypatch, tmp_path):
    """imagefolder-gpu listed efficientnet_b0 beside search.phis [0, 1, 2]: at phi 0 every multiplier is 1,
    so efficientnet_phi0 at 224 px is efficientnet_b0 (4,020,358 parameters each), one more 40-epoch run on
    two spot GPUs for nothing."""
    import torch

    import cnnmodels
    from pipelines.config import load_config
    from pipelines.planning import resolve_models
    from pipelines.search_space import PAPER

    monkeypatch.setenv("CNNZOO_STORAGE_PATH", "s3://bucket/prefix")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    monkeypatch.setenv("CNNZOO_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("CNNZOO_SERVE_TOKEN", "preset-test-token")
    cfg = load_config(ROOT / "pipelines" / "configs" / preset)
    networks = {}
    for choice in resolve_models(cfg, dict(zip(("alpha", "beta", "gamma"), PAPER, strict=True))):
        with torch.device("meta"):
            model = cnnmodels.create_model(choice.arch, num_classes=10, **choice.kwargs)
        signature = (str(model), model.input_size_for(cfg.data.image_size))
        assert signature not in networks, f"{choice.name} is {networks.get(signature)} again"
        networks[signature] = choice.name


#: vCPUs of the GPU instance types cluster.yaml may use (AWS's instance type table).
GPU_NODE_VCPUS = {"g5.xlarge": 4, "g5.2xlarge": 8, "g5.4xlarge": 16, "g6.xlarge": 4, "g6.2xlarge": 8,
                  "g4dn.xlarge": 4, "g4dn.2xlarge": 8}


# --- the registry outlives the cluster; least privilege; the network ---------------------------------------

AWS = ROOT / "docs" / "aws"


def _policy(name: str) -> list[dict]:
    return json.loads((AWS / name).read_text())["Statement"]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _allowed(statements: list[dict], action: str) -> list[dict]:
    return [s for s in statements if s["Effect"] == "Allow" and action in _as_list(s["Action"])]


def test_head_and_workers_have_their_own_instance_profiles(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]["node_config"]["IamInstanceProfile"]["Arn"]
    worker = types["gpu_worker"]["node_config"]["IamInstanceProfile"]["Arn"]
    assert head != worker
    assert head.endswith(":instance-profile/cnnzoo-ray-head") and worker.endswith(":instance-profile/cnnzoo-ray-worker")


def test_only_the_head_may_launch_instances_and_it_may_pass_only_the_worker_role(cluster):
    head, worker = _policy("head-policy.json"), _policy("worker-policy.json")
    worker_profile = cluster["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"]["Arn"]
    account, profile = worker_profile.split(":")[4], worker_profile.rsplit("/", 1)[1]
    passes = _allowed(head, "iam:PassRole")
    assert len(passes) == 1 and passes[0]["Resource"] == f"arn:aws:iam::{account}:role/{profile}"
    assert passes[0]["Condition"]["StringEquals"]["iam:PassedToService"] == "ec2.amazonaws.com"
    for action in ("ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances"):
        assert _allowed(head, action), action
    # Terminating is limited to this cluster's instances.
    for statement in _allowed(head, "ec2:TerminateInstances"):
        assert statement["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == cluster["cluster_name"]
    # Workers: objects in the bucket's Ray storage prefix, and nothing of EC2, IAM or SSM.
    actions = {a for s in worker for a in _as_list(s["Action"])}
    assert actions and all(a.startswith("s3:") for a in actions), actions
    objects = [r for s in worker for r in _as_list(s["Resource"]) if r.count("/")]
    # The Ray storage prefix, and the one marker key above it (exact, no wildcard: see the next test).
    marker = "arn:aws:s3:::YOUR-BUCKET/cnnzoo/"
    assert objects and all(r.startswith(f"{marker}ray/") or r == marker for r in objects), objects
    wildcards = [s["Sid"] for s in head + worker if "*" in _as_list(s["Resource"])]
    assert wildcards == ["AutoscalerDescribes"]  # EC2's Describe calls take no resource ARN; nothing else is open


def test_workers_may_put_every_directory_marker_pyarrow_writes_above_a_checkpoint(cluster):
    """Ray Train persists a checkpoint with pyarrow's ``create_dir(recursive=True)``, which on S3 puts an empty
    marker object for every level of the path from the bucket down (``cnnzoo/``, ``cnnzoo/ray/``, ...), existing
    or not: without ``cnnzoo/`` every checkpoint upload from a GPU worker was refused (403)."""
    import fnmatch
    import re

    storage = re.search(r"CNNZOO_STORAGE_PATH=(s3://[^'\s]+)", "\n".join(cluster["setup_commands"])).group(1)
    bucket, _, prefix = storage.removeprefix("s3://").partition("/")
    levels = f"{prefix}/experiment/trial/checkpoint_000000".split("/")
    puts = [r for s in _allowed(_policy("worker-policy.json"), "s3:PutObject") for r in _as_list(s["Resource"])]
    for key in ["/".join(levels[:i]) + "/" for i in range(1, len(levels) + 1)] + [f"{prefix}/x/model.pt"]:
        assert any(fnmatch.fnmatchcase(f"arn:aws:s3:::{bucket}/{key}", r) for r in puts), key
    assert not any(fnmatch.fnmatchcase(f"arn:aws:s3:::{bucket}/cnnzoo/mlflow-state/mlflow.db", r) for r in puts)


def test_every_node_boots_an_ami_whose_driver_runs_the_cuda_12_image(cluster):
    """Without an ImageId, Ray launches its default Deep Learning AMI (Ubuntu 18.04, a CUDA 11 driver), too old
    for the CUDA 12 in the rayproject/ray -gpu image and torch's wheels. The head resolves the workers' AMI
    parameter when it launches them, so its role may read that parameter, and no other."""
    from ray.autoscaler._private.aws.config import DEFAULT_AMI

    images = {name: node["node_config"]["ImageId"] for name, node in cluster["available_node_types"].items()}
    for name, image in images.items():
        assert image.startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-"), name
        assert "ubuntu-22.04" in image or "ubuntu-24.04" in image, name
        assert image not in DEFAULT_AMI.values()
    [reads] = _allowed(_policy("head-policy.json"), "ssm:GetParameters")
    parameter = images["gpu_worker"].removeprefix("resolve:ssm:")
    assert parameter.startswith(reads["Resource"].split(":parameter", 1)[1].rstrip("*"))


def test_ssh_is_admitted_only_from_a_configured_address(cluster):
    # Ray creates a missing group with SSH from 0.0.0.0/0 on top of provider.security_group's rules, so the
    # nodes name a group made beforehand and Ray must not configure one of its own.
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    assert any(r.get("IpRanges") == [{"CidrIp": "0.0.0.0/0"}] for r in _create_default_inbound_rules(set(), []))
    assert "security_group" not in cluster["provider"]
    for name, node_type in cluster["available_node_types"].items():
        assert node_type["node_config"]["SecurityGroupIds"], name
    ingress = json.loads((AWS / "ssh-ingress.json").read_text())
    ssh = [rule for rule in ingress if rule["FromPort"] <= 22 <= rule["ToPort"]]
    assert ssh and all(rule["IpProtocol"] == "tcp" for rule in ssh)
    cidrs = [r["CidrIp"] for rule in ssh for r in rule["IpRanges"]] + [
        r["CidrIpv6"] for rule in ssh for r in rule.get("Ipv6Ranges", [])]
    assert cidrs and not {"0.0.0.0/0", "::/0"} & set(cidrs), cidrs
    assert all(rule["FromPort"] == rule["ToPort"] == 22 for rule in ingress)  # nothing else from outside


def test_the_mlflow_store_outlives_the_container_and_the_cluster(cluster):
    head_options = cluster["docker"].get("run_options", []) + cluster["docker"].get("head_run_options", [])
    mounts = [o for o in head_options if o.startswith("-v ") and o.endswith(":/home/ray/mlflow")]
    assert len(mounts) == 1, head_options
    host_dir = mounts[0].split()[1].split(":")[0]
    assert any(host_dir in command for command in cluster["initialization_commands"])  # made before docker runs
    start = "\n".join(cluster["head_start_ray_commands"])
    assert '"${CNNZOO_MLFLOW_BACKEND_URI:-sqlite:////home/ray/mlflow/mlflow.db}"' in start
    assert "MLFLOW_BACKEND_STORE_URI=" in start and "--backend-store-uri" not in start  # the password stays off argv
    assert "pipelines.mlflow_state restore" in start and "pipelines.mlflow_state backup" in start
    assert start.index("mlflow_state restore") < start.index("mlflow server")
    setup = "\n".join(cluster["head_setup_commands"])
    assert "fetch-backend-uri" in setup and "CNNZOO_MLFLOW_BACKUP_URI=s3://" in setup
    assert any("[postgres" in c and "aws]" in c for c in cluster["setup_commands"])
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the project supports 3.10

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("psycopg[binary]") for r in extras["postgres"])


@pytest.mark.parametrize("preset", ["cifar10-gpu.yaml", "imagefolder-gpu.yaml"])
def test_the_gpu_presets_workdir_and_the_serve_token_outlive_the_head_container(cluster, preset):
    """The workdir (tracking writes still pending, the search's result, the train records) and the Serve token
    lived in the container's own filesystem: a rebooted head or a second `ray up` lost them (and clients got
    401 with the token they held)."""
    workdir = yaml.safe_load((ROOT / "pipelines" / "configs" / preset).read_text())["workdir"]
    mounts = dict(reversed(o.split()[1].split(":")) for o in cluster["docker"]["head_run_options"]
                  if o.startswith("-v "))
    made = "\n".join(cluster["initialization_commands"])
    for target in (workdir, "/home/ray/.cnnzoo"):
        assert target in mounts, (target, mounts)
        assert mounts[target] in made  # made by the ubuntu user before docker runs
    assert "serve_token" in "\n".join(cluster["head_setup_commands"])


def test_a_second_ray_up_replaces_the_exports_it_wrote(cluster, tmp_path):
    """Each export was written only when ~/.bashrc lacked it, and a second `ray up` reuses the container: a first
    `ray up` with YOUR-BUCKET still in the file kept that bucket for good, whatever the file said later."""
    import subprocess

    exports = [c for c in cluster["setup_commands"] + cluster["head_setup_commands"] if "~/.bashrc" in c]
    assert len(exports) == 6
    (tmp_path / ".bashrc").write_text("# the image's own\nalias ll='ls -l'\n")

    def ray_up(bucket: str) -> str:
        for command in exports:
            subprocess.run(["bash", "-c", command.replace("YOUR-BUCKET", bucket)], check=True,
                           env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
        return (tmp_path / ".bashrc").read_text()

    ray_up("YOUR-BUCKET")
    bashrc = ray_up("my-bucket")
    assert "YOUR-BUCKET" not in bashrc and bashrc.count("s3://my-bucket/") == 2
    assert bashrc.count("export CNNZOO_STORAGE_PATH=") == 1 and bashrc.count("CNNZOO_MLFLOW_BACKEND_URI=") == 1
    assert bashrc.startswith("# the image's own\nalias ll='ls -l'\n")  # the rest of the file is left alone


def test_local_secrets_and_state_are_not_synced_to_the_nodes(cluster):
    assert cluster["rsync_filter"] == [".gitignore"]
    ignored = (ROOT / ".gitignore").read_text().split()
    for pattern in (".venv/", "*.db", ".env", "runs/", "*.pem"):
        assert pattern in ignored, pattern


def test_only_the_head_declares_the_trial_driver_resource(cluster):
    from pipelines.trials import DRIVER_NODE_RESOURCE

    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"].get(DRIVER_NODE_RESOURCE, 0) >= 100
    for name, node_type in types.items():
        if name != cluster["head_node_type"]:
            assert DRIVER_NODE_RESOURCE not in node_type.get("resources", {}), name


def test_the_tracking_server_answers_through_a_tunnel_at_any_local_port(cluster):
    """Only 127.0.0.1:5000 passed MLflow's Host check: a tunnel at another local port got 403 "Invalid Host
    header". The workers' address (the head's private IP) passes, an outside name does not."""
    import re
    import shlex

    from mlflow.server.security_utils import is_allowed_host_header

    server = next(c for c in cluster["head_start_ray_commands"] if "mlflow server" in c)
    listed = shlex.split(re.search(r'--allowed-hosts ("[^"]+")', server).group(1))[0]
    allowed = listed.replace("$HEAD_IP", "10.0.1.23").split(",")
    for host in ("127.0.0.1:5000", "127.0.0.1:5001", "localhost:15000", "10.0.1.23:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example.com:5000")
    assert not is_allowed_host_header(allowed, "10.0.1.24:5000")


def test_every_spot_worker_drains_itself_on_ec2s_notice(cluster):
    """The spot workers' reclaims counted against train.max_failures: nothing read EC2's notice (see
    tests/test_cluster.py for the watcher against a real two-node Ray)."""
    from pipelines import spot_notice

    start = cluster["worker_start_ray_commands"]
    joined = next(i for i, command in enumerate(start) if "ray start --address=$RAY_HEAD_IP:6379" in command)
    watcher = [c for c in start[joined + 1:] if "python -m pipelines.spot_notice --address $RAY_HEAD_IP:6379" in c]
    assert len(watcher) == 1 and watcher[0].strip().endswith("&")  # after joining, in the background
    assert spot_notice.METADATA_URL == "http://169.254.169.254"
    spot_types = [n for n in cluster["available_node_types"].values()
                  if n["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot_types  # (what the watcher is for)


def test_a_trial_driver_asks_for_the_driver_node_only_where_a_node_declares_it():
    from pipelines.trials import DRIVER_NODE_RESOURCE, TRIAL_DRIVER_RESOURCES, trial_driver_resources

    laptop = {"CPU": 8.0, "memory": 1e10}
    assert trial_driver_resources(laptop) == TRIAL_DRIVER_RESOURCES
    cluster = {"CPU": 24.0, "GPU": 4.0, DRIVER_NODE_RESOURCE: 1000.0}
    # No CPU beside it: a head started with --num-cpus=0 (Ray's advice for large clusters) never placed the
    # 0.01-CPU drivers, and the stage waited for good.
    assert trial_driver_resources(cluster) == {DRIVER_NODE_RESOURCE: 1.0}
    assert trial_driver_resources({"CPU": 8.0, DRIVER_NODE_RESOURCE: 1000.0, "GPU": 1.0}).get("CPU", 0) == 0


# --- the sqlite fallback's backups --------------------------------------------------------------------------


def test_an_mlflow_registry_backed_up_and_restored_keeps_its_models_and_aliases(tmp_path, monkeypatch):
    """A real MLflow sqlite store with a registered model and an alias: backed up (to a local path standing
    in for the bucket) and restored onto a new, empty head, it still answers for the alias."""
    from mlflow import MlflowClient

    from pipelines.mlflow_state import backup, main, restore

    monkeypatch.delenv("CNNZOO_MLFLOW_BACKEND_URI", raising=False)
    db = tmp_path / "old-head" / "mlflow.db"
    db.parent.mkdir()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    client.create_registered_model("zoo")
    run = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "artifacts")))
    version = client.create_model_version("zoo", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("zoo", "champion", version.version)
    bucket = tmp_path / "bucket" / "cnnzoo" / "mlflow-state" / "mlflow.db"
    assert backup(db, str(bucket)) > 0 and bucket.is_file()
    assert not list(bucket.parent.glob("*.partial*"))

    new = tmp_path / "new-head" / "mlflow.db"
    assert main(["restore", "--db", str(new), "--uri", str(bucket)]) == 0 and new.is_file()
    restored = MlflowClient(tracking_uri=f"sqlite:///{new}")
    assert restored.get_model_version_by_alias("zoo", "champion").version == version.version
    assert restore(new, str(bucket)) is False  # never over an existing store
    assert restore(tmp_path / "other" / "mlflow.db", str(tmp_path / "bucket" / "missing.db")) is False
    # A backup that is not sqlite at all: refused with the message, nothing left behind.
    (tmp_path / "bucket" / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(RuntimeError, match="is not a sound sqlite database"):
        restore(tmp_path / "third" / "mlflow.db", str(tmp_path / "bucket" / "junk.db"))
    assert not list((tmp_path / "third").iterdir())


def test_two_backups_at_once_both_succeed(tmp_path, monkeypatch):
    """The 10-minute loop and a manual backup before `ray down` shared one ``.partial`` key: the one that moved
    second found it gone (FileNotFoundError) or moved the other's snapshot."""
    import sqlite3

    import pipelines.mlflow_state as state

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as connection:
        connection.execute("create table t (x)")
        connection.execute("insert into t values (1)")
    target = str(tmp_path / "bucket" / "mlflow.db")
    real_filesystem = state._filesystem
    nested = []

    class FirstMoveRunsAnotherBackup:
        def __init__(self, filesystem):
            self.filesystem = filesystem

        def __getattr__(self, name):
            return getattr(self.filesystem, name)

        def move(self, source, destination):
            if not nested:
                nested.append(0)
                nested[0] = state.backup(db, target)  # the other backup, from start to end, in between
            return self.filesystem.move(source, destination)

    def filesystem(uri):
        fs, path = real_filesystem(uri)
        return FirstMoveRunsAnotherBackup(fs), path

    monkeypatch.setattr(state, "_filesystem", filesystem)
    assert state.backup(db, target) > 0 and nested and nested[0] > 0
    with sqlite3.connect(target) as copy:
        assert copy.execute("select x from t").fetchall() == [(1,)]
    assert [p.name for p in (tmp_path / "bucket").iterdir()] == ["mlflow.db"]  # no partial left behind


def _store_one_migration_behind(db: Path) -> tuple[str, str]:
    """A sqlite MLflow store at the schema one migration before the installed MLflow's: (that revision, the
    head revision)."""
    from alembic import command
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config, create_sqlalchemy_engine_with_retry
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    url = f"sqlite:///{db}"
    engine = create_sqlalchemy_engine_with_retry(url)
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(url)
    script = ScriptDirectory.from_config(config)
    head = script.get_current_head()
    previous = script.get_revision(head).down_revision
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, previous)
    engine.dispose()
    return previous, head


def test_a_store_from_an_older_mlflow_is_migrated_before_the_server_starts(tmp_path, monkeypatch, cluster):
    """Every new head installs the newest MLflow below 4 while the registry outlives the cluster: a store at
    an older schema stopped the server from starting ("out-of-date database schema"), unseen by `ray up`."""
    import sqlite3

    from pipelines.mlflow_state import main

    monkeypatch.delenv("CNNZOO_MLFLOW_BACKEND_URI", raising=False)
    db = tmp_path / "mlflow.db"
    previous, head = _store_one_migration_behind(db)
    assert main(["upgrade", "--db", str(db)]) == 0

    def revision(path: Path) -> str:
        with sqlite3.connect(path) as connection:
            return connection.execute("select version_num from alembic_version").fetchone()[0]

    assert revision(db) == head and previous != head
    [copy] = tmp_path.glob(f"mlflow.db.before-upgrade-{previous}-*")
    assert revision(copy) == previous  # the copy from before the migration, named after its revision
    assert main(["upgrade", "--db", str(db)]) == 0 and revision(db) == head  # at the head: nothing to do
    # The head runs this at every start: the copy from before the migration is not replaced by the migrated store.
    assert revision(copy) == previous and list(tmp_path.glob("mlflow.db.before-*")) == [copy]
    # A store a newer MLflow migrated (a head pinned to an older one): refused, neither copied nor changed.
    with sqlite3.connect(db) as connection:
        connection.execute("update alembic_version set version_num = 'ffffffffffff'")
    assert main(["upgrade", "--db", str(db)]) == 1 and revision(db) == "ffffffffffff"
    assert list(tmp_path.glob("mlflow.db.before-*")) == [copy]
    # A path with a '#' (sqlite's URI cut it there and opened an empty database at "run")
    odd = tmp_path / "run#2" / "mlflow.db"
    odd.parent.mkdir()
    _store_one_migration_behind(odd)
    assert main(["upgrade", "--db", str(odd)]) == 0 and revision(odd) == head
    [odd_copy] = odd.parent.glob(f"mlflow.db.before-upgrade-{previous}-*")
    assert revision(odd_copy) == previous and not (tmp_path / "run").exists()
    start = [c for c in cluster["head_start_ray_commands"]]
    position = {key: next(i for i, c in enumerate(start) if key in c)
                for key in ("mlflow_state restore", "mlflow_state upgrade", "mlflow server", "mlflow_state wait",
                            "ray start")}
    assert position["mlflow_state restore"] < position["mlflow_state upgrade"] < position["mlflow server"]
    assert position["mlflow server"] < position["mlflow_state wait"] < position["ray start"]


def test_waiting_for_the_tracking_server_fails_with_its_log_when_it_does_not_answer(tmp_path, capsys):
    """`ray up` started the server in the background and returned: a server that died at start (a wrong
    database password, an old schema) was found only by the first job, and one still starting failed it."""
    import http.server
    import socket
    import threading

    from pipelines.mlflow_state import main, wait_until_serving

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the handler's API
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert wait_until_serving(url, timeout_s=10) < 5
        assert main(["wait", "--url", url, "--timeout", "10"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    log = tmp_path / "server.log"
    log.write_text("starting\nmlflow.exceptions.MlflowException: Detected out-of-date database schema\n")
    with pytest.raises(TimeoutError, match="out-of-date database schema"):
        wait_until_serving(closed, timeout_s=1.5, log=log)
    assert main(["wait", "--url", closed, "--timeout", "1", "--log", str(log)]) == 1
    assert "did not answer /health" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="reads Linux's /proc")
def test_a_second_ray_up_stops_the_tracking_server_and_backup_loop_it_finds(cluster, tmp_path, monkeypatch):
    """The start commands used `pkill -f ... || true`: on an image without procps nothing was stopped, and a
    second `ray up` left the old server on the port and started a second backup loop."""
    import subprocess
    import sys
    import uuid

    import pipelines.mlflow_state as state

    # This test's own stand-ins only: a developer's `mlflow server` (or the outage test's) must live on.
    token = uuid.uuid4().hex
    monkeypatch.setattr(state, "HEAD_SERVICES", tuple(f"{pattern} {token}" for pattern in state.HEAD_SERVICES))

    def start(*argv: str) -> subprocess.Popen:
        return subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # With the command lines of the real ones (python -c's arguments follow the code). The server's child
    # (MLflow's uvicorn, which holds the port) ignores SIGTERM here: it is killed with its parent at the deadline.
    server = start(sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                   "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); "
                   "time.sleep(600)", "mlflow", "server", token)
    loop = start("sh", "-c", f"while sleep 600; do python -m pipelines.mlflow_state backup {token}; done")
    bystander = start(sys.executable, "-c", "import time; time.sleep(600)", "mlflow", "ui", token)
    try:
        deadline, child = time.monotonic() + 30, None
        while child is None and time.monotonic() < deadline:  # (its start takes seconds on a busy machine)
            child = next((int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and (p / "stat").exists()
                          and _parent_of(p) == server.pid), None)
            time.sleep(0.1)
        assert child is not None, "the stand-in server's child never started"
        time.sleep(0.5)  # (the stand-ins started after it: their processes are up by now)
        monkeypatch.setattr(state, "STOP_TIMEOUT_S", 2.0)
        assert state.main(["stop"]) == 0
        assert server.wait(timeout=20) is not None and loop.wait(timeout=20) is not None
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}").exists() and _state_of(child) != "Z" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{child}").exists() or _state_of(child) == "Z"  # killed with the server
        assert bystander.poll() is None  # only the head's services
    finally:
        for process in (server, loop, bystander):
            process.kill()
            process.wait()
    start_commands = cluster["head_start_ray_commands"]
    assert not any("pkill" in c for c in start_commands)
    assert [i for i, c in enumerate(start_commands) if "mlflow_state stop" in c] == [1]  # after `ray stop`


def _stat_fields(path: Path) -> list[str]:
    return path.read_text().rsplit(")", 1)[1].split()


def _parent_of(process: Path) -> int:
    try:
        return int(_stat_fields(process / "stat")[1])
    except (OSError, IndexError, ValueError):
        return -1


def _state_of(pid: int) -> str:
    try:
        return _stat_fields(Path(f"/proc/{pid}/stat"))[0]
    except (OSError, IndexError):
        return ""


def test_the_state_commands_name_a_missing_setting_and_skip_a_managed_backend(tmp_path, monkeypatch, capsys):
    from pipelines.mlflow_state import main

    monkeypatch.delenv("CNNZOO_MLFLOW_BACKUP_URI", raising=False)
    monkeypatch.delenv("CNNZOO_MLFLOW_BACKEND_URI", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["backup", "--db", str(tmp_path / "mlflow.db")])
    assert exit_info.value.code == 2 and "--uri" in capsys.readouterr().err
    assert main(["backup", "--db", str(tmp_path / "absent.db"), "--uri", str(tmp_path / "b.db")]) == 1
    monkeypatch.setenv("CNNZOO_MLFLOW_BACKEND_URI", "postgresql+psycopg://u@db.internal/mlflow")
    assert main(["backup", "--db", str(tmp_path / "absent.db")]) == 0
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("cut_short_by", ["the upload", "the move"])
def test_a_backup_cut_short_leaves_no_partial_object_behind(tmp_path, monkeypatch, cut_short_by):
    """The backup loop's SIGTERM (cluster.yaml stops it at every `ray up`) or a network error mid-upload left a
    truncated ``mlflow.db.partial-<id>`` in the bucket: a stream's close writes what it was given, each attempt
    uses a fresh name, and nothing ever deleted them."""
    import sqlite3

    import pipelines.mlflow_state as state

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as connection:
        connection.execute("create table t (x)")
        connection.executemany("insert into t values (?)", [(b"x" * 1000,)] * 3000)  # ~3 MB: several chunks
    bucket = tmp_path / "bucket"
    real_filesystem = state._filesystem

    class CutShort:
        def __init__(self, filesystem):
            self.filesystem = filesystem

        def __getattr__(self, name):
            return getattr(self.filesystem, name)

        def open_output_stream(self, path):
            stream = self.filesystem.open_output_stream(path)
            if cut_short_by != "the upload":
                return stream
            write = stream.write

            class Stream:  # SystemExit(143), as the loop's SIGTERM handler raises, after the first chunk
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    stream.close()

                def write(self, chunk):
                    write(chunk)
                    raise SystemExit(143)

            return Stream()

        def move(self, source, destination):
            raise OSError("connection reset by peer")

    monkeypatch.setattr(state, "_filesystem", lambda uri: (CutShort(real_filesystem(uri)[0]), real_filesystem(uri)[1]))
    with pytest.raises((SystemExit, OSError)):
        state.backup(db, str(bucket / "mlflow.db"))
    assert list(bucket.iterdir()) == []
