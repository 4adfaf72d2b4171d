"""Config schema: defaults, overrides and errors that exit 2 before Ray starts."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, load_config, read_yaml

PRESETS = Path(__file__).resolve().parents[1] / "pipelines" / "configs"


def test_default_config_is_the_embedded_quickstart():
    embedded = yaml.safe_load(resources.files("pipelines.configs").joinpath("quickstart.yaml").read_text())
    cfg = load_config()
    assert read_yaml(None) == embedded
    assert cfg.name == embedded["name"] == "quickstart"
    assert cfg.data.dataset == "digits" and cfg.ray.address is None
    assert cfg.train.models == embedded["train"]["models"]
    assert cfg.tracking_uri.startswith("sqlite:///") and cfg.tracking_uri.endswith("mlflow.db")
    for model in ("lenet5", "alexnet", "vgg11_bn", "googlenet", "resnet18", "densenet121", "se_resnet18"):
        assert model in cfg.train.models
    assert cfg.search.phis  # the EfficientNet family comes from the search


def test_set_overrides_parse_yaml_values(tmp_path, cuda_devices):
    # The quickstart's per-model settings for alexnet are ignored when alexnet is not selected.
    cuda_devices(1)
    cfg = load_config(None, ["train.models=[resnet18, lenet5]", "train.epochs=5", "train.lr=0.1",
                             f"workdir={tmp_path}", "search.alpha=[1.0, 1.3]", "train.use_gpu=true",
                             "ray.num_gpus=1"])
    assert cfg.train.models == ["resnet18", "lenet5"]
    assert cfg.train.epochs == 5 and cfg.train.lr == 0.1 and cfg.train.use_gpu is True
    assert cfg.search.alpha == (1.0, 1.3)
    assert cfg.paths.run_dir == tmp_path.resolve() / "quickstart"
    assert cfg.paths.storage == str(tmp_path.resolve() / "ray_results")


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: mine\ntrain:\n  models: [lenet5]\n  epochs: 2\n")
    cfg = load_config(path, ["train.epochs=3"])
    assert cfg.name == "mine" and cfg.train.models == ["lenet5"] and cfg.train.epochs == 3


def test_a_bundled_preset_goes_by_its_name_and_a_local_file_comes_first(tmp_path, monkeypatch):
    """`--config fashion-mnist` (or fashion-mnist.yaml outside the repository, an installed package's presets
    being elsewhere) said "file not found" with no hint where the presets are."""
    monkeypatch.chdir(tmp_path)
    for name in ("fashion-mnist", "fashion-mnist.yaml"):
        assert load_config(name, ["train.epochs=1"]).data.dataset == "fashion-mnist"
    (tmp_path / "fashion-mnist.yaml").write_text("name: mine\n")
    for name in ("fashion-mnist", "fashion-mnist.yaml"):  # a file of that name here is the one meant (an edited copy)
        assert load_config(name).name == "mine"
    with pytest.raises(ConfigError, match="bundled presets go by their names: cifar10-gpu, fashion-mnist"):
        load_config("fashon-mnist")
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/fashion-mnist.yaml")  # a path is a path


def test_exponent_floats_read_as_numbers(tmp_path):
    """PyYAML alone reads ``3e-4`` as a string (YAML 1.1); learning rates are written that way."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-4\n  weight_decay: 1e-5\n")
    cfg = load_config(path, ["search.tolerance=5e-2"])
    assert cfg.train.lr == 3e-4 and cfg.train.weight_decay == 1e-5 and cfg.search.tolerance == 5e-2
    assert load_config(None, ["name='1e3'"]).name == "1e3"


def test_model_overrides_change_only_that_model(make_config):
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models

    cfg = make_config("train.models=[lenet5, resnet18]", "train.lr=0.01",
                      "train.model_overrides={lenet5: {lr: 2e-4, epochs: 3, optimizer: sgd}}")
    runs = {r.model_name: r for r in plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg))}
    assert (runs["lenet5"].hyper.lr, runs["lenet5"].hyper.epochs, runs["lenet5"].hyper.optimizer) == (2e-4, 3, "sgd")
    assert (runs["resnet18"].hyper.lr, runs["resnet18"].hyper.epochs) == (0.01, cfg.train.epochs)


@pytest.mark.parametrize("preset", sorted(p.name for p in (Path(__file__).parents[1] / "pipelines" / "configs")
                                           .glob("*.yaml")))
def test_no_preset_trains_alexnet_at_a_rate_that_leaves_it_at_chance(preset):
    """AlexNet has no batch norm: at SGD lr 0.1 (and 0.01) it stays at chance (docs/benchmarks.md). The CPU
    presets gave it a recipe of its own; cifar10-gpu.yaml trained it at the zoo's SGD 0.1."""
    from pipelines.config import TrainConfig

    train = yaml.safe_load((Path(__file__).parents[1] / "pipelines" / "configs" / preset).read_text())["train"]
    if "alexnet" not in train.get("models", []):
        return
    recipe = {"optimizer": train.get("optimizer", TrainConfig().optimizer), "lr": train.get("lr", TrainConfig().lr),
              **(train.get("model_overrides") or {}).get("alexnet", {})}
    assert not (recipe["optimizer"] == "sgd" and float(recipe["lr"]) >= 0.01), recipe


def test_integers_read_as_yaml_1_2_reads_them():
    """PyYAML follows YAML 1.1: `train.epochs=010` trained 8 epochs (octal)."""
    from pipelines.config import load_config

    cfg = load_config(None, ["train.epochs=010", "train.batch_size=0x40", "serve.port=8_024", "train.seed=0_7"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.serve.port, cfg.train.seed) == (10, 64, 8024, 7)


def test_an_override_of_a_yaml_alias_changes_only_the_key_it_names(tmp_path):
    """PyYAML gives an alias (``vgg11_bn: *slow``) the anchor's own dict: ``--set`` of one model's learning rate
    changed the other's too, its fingerprint and training with it, without a word."""
    from pipelines.config import load_config

    config = tmp_path / "shared.yaml"
    config.write_text("train:\n  models: [alexnet, vgg11_bn]\n  model_overrides:\n"
                      "    alexnet: &slow {optimizer: adamw, lr: 0.0003}\n    vgg11_bn: *slow\n")
    cfg = load_config(str(config), [f"workdir={tmp_path}", "train.model_overrides.alexnet.lr=0.001"])
    assert cfg.train.model_overrides["alexnet"]["lr"] == 0.001
    assert cfg.train.model_overrides["vgg11_bn"]["lr"] == 0.0003


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["train.modles=[resnet18]"], "train.modles", "did you mean 'train.models'"),
        (["nmae=x"], "nmae", "did you mean 'name'"),
        (["train.epochs=three"], "train.epochs", "valid integer"),
        (["train.epochs=true"], "train.epochs", "valid integer"),
        (["train.epochs=0"], "train.epochs", "greater than or equal to 1"),
        (["train.models=[resnet19]"], "train.models", "did you mean 'resnet18'"),
        (["data.dataset=cifar"], "data.dataset", "did you mean 'cifar10'"),
        (["data.dataset=imagefolder"], "data.root", "needs data.root"),
        (["data.dataset=imagefolder", "data.root=/no/such/dir"], "data.root", "does not exist"),
        (["search.alpha=[1.5, 2.0]", "search.beta=[1.5, 2.0]", "search.gamma=[1.5, 2.0]"], "search",
         "satisfies |alpha * beta^2 * gamma^2 - 2.0| <= 0.1"),
        (["search.alpha=[1.3, 1.1]"], "search.alpha", "above high end"),
        (["search.gamma=[0.9, 1.2]"], "search.gamma", "below 1"),
        (["tracking.uri=./mlruns"], "tracking.uri", "file store"),
        (["train.model_options={resnet18: {small_inputs: true}}"], "train.model_options", "did you mean 'small_input'"),
        # A negative coefficient at a fractional phi (a complex "scale") and 0 at a negative phi: tracebacks, exit 1
        (["search.phi=0.5", "train.model_options.efficientnet={alpha: -1.2}"], "train.model_options.efficientnet",
         "alpha must be a finite number >= 1"),
        (["train.models=[efficientnet]", "train.model_options.efficientnet={phi: -1, alpha: 0}"],
         "train.model_options.efficientnet", "must be a finite number >= "),
        (["serve.port=70000"], "serve.port", "less than or equal to 65535"),
        # Unquoted "::" (an IPv6 host) reads as a YAML mapping: the message said "valid string" and no more.
        (["serve.host=::"], "serve.host", "YAML read a mapping there: quote the value (serve.host: '...')"),
        (["name=[a]"], "name", "YAML read a list there: quote the value"),
        (["data.augment=crops"], "data.augment", "must be true, false, flip or crop"),
        (["train.model_overrides={resnet18: {cpu_bf16: maybe}}"], "train.model_overrides.resnet18.cpu_bf16",
         "must be true, false or auto"),
        (["train.model_overrides={alexnet: {lrr: 0.001}}"], "train.model_overrides.alexnet.lrr", "did you mean 'lr'"),
        (["train.model_overrides={alexnet: {lr: -1.0}}"], "train.model_overrides.alexnet.lr", "greater than 0"),
        (["train.model_overrides={resnet180: {lr: 0.1}}"], "train.model_overrides.resnet180", "did you mean"),
        (["train.model_options={alexnett: {dropout: 0.1}}"], "train.model_options.alexnett", "did you mean 'alexnet'"),
        (["train.model_options={resnet18: {stem_stride: 3}}"], "train.model_options.resnet18", "must be 1 or 2"),
        (["train.small_input=false", "train.model_options={resnet18: {stem_stride: 2}}"],
         "train.model_options.resnet18", "small-input stem only"),
        (["train.use_gpu=true", "train.num_workers=2", "train.gpus_per_worker=0.5", "ray.num_gpus=2"],
         "train.gpus_per_worker", "one whole GPU per worker"),
        (["train.gpus_per_worker=2.0", "train.use_gpu=true"], "train.gpus_per_worker", "less than or equal to 1"),
        (["search.gpus_per_trial=0.25", "train.num_workers=2", "train.use_gpu=true", "ray.num_gpus=2"],
         "search.gpus_per_trial", "needs train.num_workers: 1"),
        # Requests a Ray of the command's own can never place: the stage waited for good.
        (["train.cpus_per_worker=8", "ray.num_cpus=2"], "train.cpus_per_worker", "more than the 2 of the local Ray"),
        (["ray.address=local", "ray.num_cpus=2", "train.num_workers=2", "train.batch_size=64",
          "train.cpus_per_worker=1.5"], "train.cpus_per_worker", "2 worker(s) x 1.5 CPUs"),
        (["ray.num_cpus=2", "train.num_workers=2", "train.cpus_per_worker=1"], "train.cpus_per_worker",
         "(and 0.01 for the trial) is more than the 2"),
        (["train.use_gpu=true", "ray.num_gpus=1", "ray.num_cpus=8", "train.num_workers=2", "train.batch_size=64"],
         "train.gpus_per_worker", "2 worker(s) x 1 GPU is more than the 1"),
        (["train.use_gpu=true", "ray.num_gpus=1", "ray.num_cpus=4", "data.loader_workers=4"], "data.loader_workers",
         "x 5 CPUs (and 0.01 for the trial) is more than the 4"),
        (["train.num_workers=2", "train.batch_size=64", "train.placement_strategy=STRICT_SPREAD"],
         "train.placement_strategy", "a local Ray has one"),
        (["ray.num_cpus=2", "serve.num_cpus=4"], "serve.num_cpus", "no replica would ever be placed"),
        (["ray.num_cpus=2", "serve.num_replicas=8"], "serve.num_replicas", "8 replicas x 0.5 CPUs (serve.num_cpus)"),
        (["ray.num_cpus=2", "serve.autoscaling=true", "serve.min_replicas=6", "serve.max_replicas=6"],
         "serve.min_replicas", "the app would never start"),
        (["ray.address=local", "train.use_gpu=true", "ray.num_gpus=0"], "train.use_gpu", "no GPU"),
        (["train.batch_size=1"], "train.batch_size", "1 image(s) per worker and step"),
        (["train.trial_retries=-1"], "train.trial_retries", "greater than or equal to 0"),
        (["train.num_workers=2", "train.model_overrides={vgg11_bn: {batch_size: 2}}"],
         "train.model_overrides.vgg11_bn.batch_size", "use at least 4"),
        (["search.step=1e-320"], "search.step", "more than 10^12 points"),
        (["data.dataset=cifar10", "data.root=s3://bucket/cifar10"], "data.root", "local or mounted directory"),
        (["serve.autoscaling=true", "serve.min_replicas=3"], "serve.min_replicas", "above serve.max_replicas (2)"),
        (["serve.max_upload_mb=1e-9"], "serve.max_upload_mb", "under 1 KB"),
        (["search.compare_paper=true", "search.phis=[0]"], "search.compare_paper", "needs a phi above 0"),
        (["data.root=/tmp/run #2"], "data.root", "reads as the start of a comment"),  # it set /tmp/run
        (["train.epochs=1:30"], "train.epochs", "base-60 number in YAML 1.1"),  # it set 90
        (["train.lr=1:30.5"], "train.lr", "base-60 number in YAML 1.1"),  # it set 90.5
        (["train.epochs=0x_"], "train.epochs", "'0x' is not a readable integer"),  # a traceback
        (["train.epochs=" + "9" * 4400], "train.epochs", "is not a readable integer"),  # a traceback (Python's limit)
        (["ray.num_cpus=1" + "0" * 310], "ray.num_cpus", "too large an integer"),  # a traceback (OverflowError)
        (["search.alpha=[1, 1" + "0" * 310 + "]"], "search.alpha", "too large an integer"),  # a traceback
        (["serve.max_upload_mb=1e303"], "serve.max_upload_mb", "above 1,048,576 MB"),  # every replica failed
        # Settings that take a word too: the message named only the boolean or integer
        (["train.small_input=maybe"], "train.small_input", "must be true, false or auto (got 'maybe')"),
        (["train.max_concurrent_models=abc"], "train.max_concurrent_models", "must be a whole number or auto"),
        (["search.max_concurrent_trials=auto2"], "search.max_concurrent_trials", "must be a whole number or auto"),
        # The family a search can pick, past what train.model_options may scale B0 by (1.4 ** 12: 56.7x the depth)
        (["search.phis=[0, 12]"], "search.phis", "phi 12 with search.alpha up to 1.4 would scale B0's depth by 56.7"),
        (["search.phi=9"], "search.phi", "above 16"),
        (["serve.checkpoints={a: /x.pt}", "serve.models=[b]"], "serve.models", "b: not among serve.checkpoints (a)"),
        (["train.use_gpu=true", "ray.num_gpus=0"], "train.use_gpu", "no GPU"),
        # Values that passed validation and failed (or ran out of memory) later:
        (["search.step=1e-9"], "search.step", "(at most 2,000,000)"),
        (["train.simulate_failure_at_epoch=2", "train.epochs=2"], "train.simulate_failure_at_epoch",
         "never comes: epochs count from 0 and the longest model trains 2 (up to epoch 1); use 1 to 1"),
        (["train.simulate_failure_at_epoch=0"], "train.simulate_failure_at_epoch", "greater than or equal to 1"),
        (["train.models=[lenet5]", "train.epochs=2", "train.model_overrides={resnet18: {epochs: 10}}",
          "train.simulate_failure_at_epoch=5"], "train.simulate_failure_at_epoch", "the longest model trains 2"),
        (["train.epochs=2", "train.model_overrides={efficientnet: {epochs: 6}}", "train.simulate_failure_at_epoch=6"],
         "train.simulate_failure_at_epoch", "the longest model trains 6"),  # the families take the baseline's
        (["train.model_overrides={efficientnet: {warmup_epochs: 5}}", "search.epochs=6", "train.epochs=2"],
         "train.model_overrides.efficientnet.warmup_epochs", "longer than efficientnet_phi0's 2 epochs"),
        (["search.alpha=[1.15, 1.25]", "search.beta=[1.05, 1.15]", "search.gamma=[1.12, 1.18]", "search.step=0.1",
          "search.tolerance=0.005"], "search.step", "has no feasible triple"),
        (["data.seed=-1"], "data.seed", "greater than or equal to 0"),
        (["train.seed=99999999999999999999"], "train.seed", "less than or equal to 4294967295"),
        (["train.lr=.inf"], "train.lr", "finite number"),
        (["train.cpus_per_worker=.nan"], "train.cpus_per_worker", "finite number"),
        (["tracking.pending_timeout_s=.inf"], "tracking.pending_timeout_s", "finite number"),
        (["train.models=[efficientnet_phi1.0]"], "train.models", "unknown model 'efficientnet_phi1.0'"),
        (["train.models=[efficientnet_phi-1]"], "train.models", "unknown model"),
        (["search.phis=[1, 1.0000001]"], "search.phis", "must be unique"),
        (["search.phis=[40]"], "search.phis", "between 0 and 12"),
        (["search.phis=[0.33333333]"], "search.phis", "at most 6 significant digits"),
        (["tracking.registered_model=a/b"], "tracking.registered_model", "should match pattern"),
        (["search.max_concurrent_trials=0"], "search.max_concurrent_trials", "must be >= 1"),
        (["serve.max_ongoing_requests=4"], "serve.max_ongoing_requests", "could never fill a batch"),
        (["data.dataset=imagefolder", "data.root=''"], "data.root", "needs data.root"),
        (["data.dataset=imagefolder", "data.root=s3://bucket/images"], "data.root", "mounted directory"),
        (["workdir=/etc/hostname"], "workdir", "is a file"),
        (["serve.num_gpus=1", "ray.num_gpus=0"], "serve.num_gpus", "no GPU"),
        (["train.model_options={alexnet: {num_classes: 5}}"], "train.model_options.alexnet.num_classes",
         "set from the data set"),
        (["search.mode=optuna", "search.tolerance=1.0"], "search.tolerance", "reaches below 1"),
        (["search.grace_period=5", "search.epochs=2"], "search.grace_period", "above search.epochs (2)"),
        (["search.phi=60"], "search.phi", "less than or equal to 12"),
        (["train.num_workers=3", "train.batch_size=128"], "train.batch_size", "use 126 or 129"),
        (["train.num_workers=4", "train.batch_size=2"], "train.batch_size", "use at least 8"),
        (["train.num_workers=2", "train.model_overrides={resnet18: {batch_size: 33}}"],
         "train.model_overrides.resnet18.batch_size", "use 32 or 34"),
        (["ray.address=garbage"], "ray.address", "not an address Ray can join"),
        (["ray.address=10.0.0.1"], "ray.address", "host:6379"),
        (["ray.address=10.0.0.1:70000"], "ray.address", "not an address Ray can join"),
        (["ray.address=http://10.0.0.1:8265"], "ray.address", "dashboard address"),
        (["ray.address=ray://10.0.0.1:10001"], "ray.address", "Ray Client address, which the pipeline does not"),
        (["storage_path=s3://bucket/ray?endpoint_override=minio:9000"], "storage_path", "AWS_ENDPOINT_URL"),
        (["tracking.uri=postgres://mlflow:secret@db/mlflow"], "tracking.uri", "did you mean 'postgresql'"),
        (["tracking.uri=sqllite:///runs/mlflow.db"], "tracking.uri", "no tracking store for the scheme 'sqllite'"),
        # Values that passed and failed (or lost everything) once Ray had started, or after the training:
        (["tracking.uri=sqlite://"], "tracking.uri", "in-memory sqlite database"),
        (["tracking.uri='sqlite:///:memory:'"], "tracking.uri", "in-memory sqlite database"),
        (["tracking.uri=SQLITE:///runs/mlflow.db"], "tracking.uri", "in lower case"),
        (["train.model_options={alexnet: {dropout: .nan}}"], "train.model_options.alexnet.dropout", "not a finite"),
        (["train.model_options={vgg11_bn: {dropout: [.inf]}}"], "train.model_options.vgg11_bn.dropout", "finite"),
        (["train.models=[efficientnet_phi40]"], "train.models", "phi is at most 12"),
        (["search.phis=[0, -0.0]"], "search.phis", "must be unique"),
        (["train.cpus_per_worker=1e-9"], "train.cpus_per_worker", "below Ray's smallest resource amount"),
        (["train.use_gpu=true", "train.gpus_per_worker=0.00001"], "train.gpus_per_worker", "0.0001"),
        (["serve.num_cpus=0.00001"], "serve.num_cpus", "0.0001"),
        (["serve.max_image_pixels=40"], "serve.max_image_pixels", "every upload would be refused"),
        (["serve.host=http://127.0.0.1"], "serve.host", "not an IP address or host name"),
        (["serve.host=localhost:8000", "serve.allow_unauthenticated=true"], "serve.host", "no scheme, no port"),
        (["storage_path=${CNNZOO_TEST_STORE:/mnt/x}"], "storage_path", "malformed environment reference"),
        (["storage_path=${CNNZOO_TEST_STORE-/mnt/x}"], "storage_path", "malformed environment reference"),
        (["workdir=$HOME/runs"], "workdir", "write ${HOME}"),
        (["workdir=${CNNZOO_TEST_UNSET:-$HOME/runs}"], "workdir", "write ${HOME}"),  # in a default too
        (["tracking.uri=sqlite:///$HOME/mlflow.db"], "tracking.uri", "write ${HOME}"),
        (["serve.checkpoints={a: $HOME/model.pt}"], "serve.checkpoints.a", "write ${HOME}"),
        (["tracking.uri=sqlite+pysqlite://"], "tracking.uri", "in-memory sqlite database"),
        (["train.models=[efficientnet]", "train.model_options={efficientnet: {phi: 40}}"],
         "train.model_options.efficientnet.phi", "above 12"),
        (["train.models=[efficientnet_phi-0]"], "train.models", "unknown model"),  # B0 under a second name
        (["data.dataset=imagefolder", "data.root=/data/$USER/flowers"], "data.root", "write ${USER}"),
        # Passed, then failed once Ray had started (or leaked a secret into every run's logged config):
        (["storage_path=s3://KEY:SECRET@bucket/runs"], "storage_path", "a key or password in the storage URI"),
        (["storage_path=abfss://runs@acct.dfs.core.windows.net/x"], "storage_path",
         "cannot store runs with the scheme 'abfss'"),
        (["storage_path=S3://bucket/runs"], "storage_path", "did you mean 's3'"),
        (["storage_path=s4://bucket/runs"], "storage_path", "cannot store runs with the scheme 's4'"),
        (["storage_path=s3:/bucket/runs"], "storage_path", "'s3://bucket/runs'"),  # else the local ./s3:/bucket
        (["tracking.uri=sqlite://runs/mlflow.db"], "tracking.uri", "sqlite:///runs/mlflow.db"),
        (["train.model_options={efficientnet: {beta: 1e9}}"], "train.model_options.efficientnet.beta", "above 10"),
        (["train.models=[efficientnet]", "train.model_options={efficientnet: {alpha: 5, phi: 3}}"],
         "train.model_options.efficientnet.alpha",
         "scales B0's depth by 125"),  # (alpha 1000 built for minutes)
        (["workdir=/proc/cnnzoo/runs"], "workdir", "nothing can be written in /proc"),
        (["workdir=/tmp/w%41b"], "workdir", "a '?' or a '%' and two hex digits"),  # (sqlite:///.../w%41b: wAb)
        (["workdir=/tmp/run?1"], "workdir", "a '?' or a '%' and two hex digits"),
        (["name=mlflow.db"], "name", "what the workdir keeps"),
        (["serve.batch_wait_timeout_s=20"], "serve.batch_wait_timeout_s", "over half of serve.request_timeout_s"),
        # Tracebacks (OSError, RuntimeError, ValueError, RecursionError) or failures once Ray had started:
        (["name=" + "a" * 150], "name", "at most 100 characters"),
        (["tracking.registered_model=" + "a" * 150], "tracking.registered_model", "at most 100 characters"),
        (["workdir=/tmp/" + "a" * 300], "workdir", "over 255 bytes"),
        (["storage_path=/tmp/" + "a" * 300], "storage_path", "over 255 bytes"),
        (["data.dataset=imagefolder", "data.root=/tmp/" + "a" * 300], "data.root", "over 255 bytes"),
        (["workdir=~cnnzoo-no-such-user/runs"], "workdir", "~cnnzoo-no-such-user is no user's home"),
        (['workdir="/tmp/a\\0b"'], "workdir", "NUL byte"),
        (["train.models=&x [*x]"], "config", "a YAML alias refers to the value it is in"),
        (["=5"], "--set", "malformed key ''"),
        (["storage_path=file:/tmp/x"], "storage_path", "'file:///tmp/x'"),  # (file://tmp/x names a host)
        (["storage_path=file://tmp/x"], "storage_path", "three slashes"),
        (["storage_path=file:///tmp/x#y"], "storage_path", "cannot hold '#'"),
        (["storage_path=file:///tmp/a%00b"], "storage_path", "NUL byte"),  # (a ValueError traceback)
        (["storage_path=file:///tmp/" + "%61" * 300], "storage_path", "over 255 bytes"),
        (["storage_path=file://"], "storage_path", "names no directory"),
        (["storage_path=s3:///x"], "storage_path", "the bucket is missing"),
        (["storage_path=gs://"], "storage_path", "the bucket is missing"),
        (["storage_path='s3://bucket x/y'"], "storage_path", "cannot hold spaces"),
        (["tracking.uri=http://"], "tracking.uri", "the server's host is missing"),
        (["tracking.uri=http://mlflow:abc"], "tracking.uri", "not a URL MLflow can reach"),
        (["tracking.uri=https://[::1"], "tracking.uri", "not a URL MLflow can reach"),
        (["tracking.uri=sqlite:////tmp/" + "a" * 300 + "/mlflow.db"], "tracking.uri", "over 255 bytes"),
        (["serve.max_ongoing_requests=2147483648"], "serve.max_ongoing_requests", "less than or equal to 2147483647"),
        (["serve.num_replicas=2147483648", "serve.num_cpus=0"], "serve.num_replicas", "less than or equal to"),
        (["train.models=[efficientnet]", "train.model_options={efficientnet: {base_resolution: 100000}}"],
         "train.model_options.efficientnet.base_resolution", "above 1024"),
        (["train.models=[efficientnet]", "train.model_options={efficientnet: {base_resolution: 1024, phi: 6}}"],
         "serve.max_resized_pixels", "efficientnet ("),
        (["data.loader_workers=100000"], "data.loader_workers", "more than four per CPU"),
        (["data.dataset=imagefolder", "data.root=/etc/hostname"], "data.root", "is a file, not a directory"),
        (["data.dataset=fashion-mnist", "data.root=/etc/hostname", "data.download=false"], "data.root", "is a file"),
    ],
)
def test_config_errors_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key.startswith(key), str(info.value)
    assert fragment in str(info.value)


def test_a_long_integer_token_is_not_echoed_by_the_yaml_error(tmp_path):
    """A token of hex digits read as a too large integer: the error quoted its first 40 characters, past the
    masking of quoted values (which the "..." inside the quotes broke)."""
    token = "0x" + "ab12" * 70
    path = tmp_path / "c.yaml"
    path.write_text(f"serve:\n  auth_token: {token}\n")
    with pytest.raises(ConfigError, match="a value of 282 characters is too large an integer") as refused:
        load_config(path, [])
    assert "ab12ab12" not in str(refused.value)
    for tagged in ('!!int "my secret token"', "!!int \"sec'retXYZ\"", '!!int "pw d:1"'):  # (unmasked when quoted)
        path.write_text(f"serve:\n  auth_token: {tagged}\n")
        with pytest.raises(ConfigError, match="a value of") as refused:
            load_config(path, [])
        assert "secret" not in str(refused.value) and "retXYZ" not in str(refused.value) and "pw d" not in \
            str(refused.value)


def test_more_gpus_declared_than_cuda_sees_are_refused_where_a_stage_uses_one(cuda_devices):
    """Ray hands a worker or replica a GPU it was told of: one CUDA does not see failed once placed ("Found no
    NVIDIA driver"), after Ray's start, or after the training for a replica."""
    cuda_devices(0)
    for overrides, fix in ((["train.use_gpu=true", "ray.num_gpus=1"], "set train.use_gpu: false"),
                           (["serve.num_gpus=0.5", "ray.num_gpus=2"], "serve.num_gpus: 0")):
        with pytest.raises(ConfigError, match="CUDA sees 0 on this machine") as refused:
            load_config(None, overrides)
        assert refused.value.key == "ray.num_gpus" and fix in str(refused.value)
    load_config(None, ["ray.num_gpus=4"])  # no stage asks for one: Ray may be told of any
    load_config(None, ["ray.address=auto", "train.use_gpu=true"])  # a cluster's GPUs are its nodes'
    cuda_devices(1)
    with pytest.raises(ConfigError, match="set ray.num_gpus: 1 or leave it out"):
        load_config(None, ["train.use_gpu=true", "ray.num_gpus=2"])
    assert load_config(None, ["train.use_gpu=true", "ray.num_gpus=1"]).ray.num_gpus == 1


def test_a_percent_sign_that_sqlite_keeps_is_a_valid_workdir(tmp_path):
    """Only '?' and '%XX' break the default sqlite URI: "50%off" works with MLflow and must not be refused."""
    from pipelines.tracking import Tracker

    cfg = load_config(None, [f"workdir={tmp_path / 'lr_50%off'}"])
    tracker = Tracker.for_config(cfg)
    run_id = tracker.start_run("probe", {"stage": "train"})
    assert tracker.client.get_run(run_id).info.experiment_id == tracker.experiment_id
    assert cfg.paths.mlflow_db.is_file() and "%off" in str(cfg.paths.mlflow_db)


def test_a_workdir_under_a_file_or_a_read_only_directory_is_refused(tmp_path, monkeypatch):
    import os

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file") as info:
        load_config(None, [f"workdir={tmp_path / 'file' / 'runs'}"])
    assert info.value.key == "workdir"
    with pytest.raises(ConfigError, match="is a file") as info:
        load_config(None, [f"workdir={tmp_path}", f"storage_path={tmp_path / 'file'}"])
    assert info.value.key == "storage_path"
    # Where the stages run, this user must be able to write there; check-config may validate a cluster's config
    # (/home/ray/runs) on another machine, so only the commands that write check it.
    from pipelines.config import check_writable_locations

    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    cfg = load_config(None, [f"workdir={read_only / 'runs'}"])
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != read_only and real_access(path, mode))
    with pytest.raises(ConfigError, match=f"may not write in {read_only}") as info:  # (root may write anywhere)
        check_writable_locations(cfg)
    assert info.value.key == "workdir"
    from pipelines.__main__ import main

    assert main(["train", "--set", f"workdir={read_only / 'runs'}"]) == 2
    assert main(["check-config", "--set", f"workdir={read_only / 'runs'}"]) == 0
    # report and register only read the storage: a read-only mount of the cluster's is no reason to refuse them
    cfg = load_config(None, [f"workdir={tmp_path / 'work'}", f"storage_path={read_only / 'storage'}"])
    with pytest.raises(ConfigError, match="may not write in") as info:
        check_writable_locations(cfg)
    assert info.value.key == "storage_path"
    check_writable_locations(cfg, storage=False)
    # (run of the report alone, which starts no Ray, as report: it fails for want of trained models, exit 1)
    assert main(["run", "--stages", "report", "--set", f"workdir={tmp_path / 'work'}",
                 "--set", f"storage_path={read_only / 'storage'}"]) == 1
    monkeypatch.undo()
    cfg = load_config(None, [f"workdir={tmp_path / 'new' / 'runs'}"])  # made later, by the stage
    check_writable_locations(cfg)
    # A user name in the authority is no credential (refused for the scheme here, not as a password)
    with pytest.raises(ConfigError, match="cannot store runs with the scheme 'hdfs'"):
        load_config(None, ["storage_path=hdfs://hadoop@namenode:8020/runs"])
    assert not (tmp_path / "new").exists() and cfg.paths.run_dir == tmp_path / "new" / "runs" / "quickstart"


def test_a_mistyped_token_or_password_is_not_echoed_and_a_key_given_twice_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["serve.auth_token=8675309123"])  # YAML reads it as a number
    assert info.value.key == "serve.auth_token" and "8675309123" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["tracking.uri=postgres://mlflow:s3cret@db/mlflow"])  # a typo in a URI with a password
    assert info.value.key == "tracking.uri" and "s3cret" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["serve.auth_token=@dm1n-s3cret"])  # not valid YAML (PyYAML quotes the text)
    assert info.value.key == "serve.auth_token" and "s3cret" not in str(info.value)
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  epochs: 7\ntrain:\n  lr: 0.1\n")  # YAML would keep the second, dropping epochs
    with pytest.raises(ConfigError, match="duplicate key 'train'"):
        load_config(str(twice), [])


def test_a_section_set_empty_on_the_command_line_is_its_defaults():
    """``--set ray=`` (as an empty section in a file) was "Input should be a valid dictionary"."""
    from pipelines.config import RayConfig

    assert load_config(None, ["ray.num_cpus=3", "ray="]).ray == RayConfig()


def test_a_section_whose_keys_are_all_commented_out_keeps_its_defaults(tmp_path):
    """``ray:`` with only comments under it reads as None in YAML: "ray: Input should be a valid dictionary"."""
    preset = tmp_path / "preset.yaml"
    preset.write_text("ray:\n  # address: auto\ntrain:\n  epochs: 2\n")
    cfg = load_config(str(preset), [])
    assert cfg.ray.address is None and cfg.train.epochs == 2


def test_a_database_password_in_the_tracking_uri_is_masked_wherever_it_is_shown():
    """check-config's output, the config.yaml logged with every stage's run and the MLflow UI hint printed after
    a run showed the password of a database tracking URI in the clear."""
    from pipelines.config import redact_uri
    from pipelines.tracking import ui_hint

    uri = "postgresql+psycopg://mlflow:s3cret@db.internal:5432/mlflow?sslmode=require"
    cfg = load_config(None, [f"tracking.uri={uri}", "serve.auth_token=t0ken"])
    assert cfg.tracking_uri == uri  # what the stages connect with
    dumped = cfg.to_yaml()
    assert "s3cret" not in dumped and "t0ken" not in dumped
    assert "postgresql+psycopg://mlflow:***@db.internal:5432/mlflow?sslmode=require" in dumped
    assert "s3cret" not in ui_hint(uri, "1") and "mlflow:***@db.internal" in ui_hint(uri, "1")
    for plain in ("http://10.0.0.1:5000", "sqlite:////tmp/mlflow.db", "https://user@host/x", "databricks"):
        assert redact_uri(plain) == plain
    assert redact_uri("https://u:p@a@host/x") == "https://u:***@host/x"  # the host follows the last @
    assert redact_uri("http://host:5000/a@b") == "http://host:5000/a@b"  # no user-info in an HTTP URI's path
    assert redact_uri("postgresql://u:ab/cd@db/x") == "postgresql://u:***@db/x"  # SQLAlchemy: "/" in a password
    assert redact_uri("mysql://db/x?user=u&password=p&ssl=1") == "mysql://db/x?user=u&password=***&ssl=1"
    with pytest.raises(ConfigError) as info:  # a whole section set at once: its text is not echoed either
        load_config(None, ["tracking={uri: 'postgresql://u:s3cret@db/x'"])
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("override, key, secret", [
    # A database URI missing a slash reads as a file path: the error showed all of it.
    ("tracking.uri=postgresql+psycopg:/mlflow:s3cret@db.internal:5432/mlflow", "tracking.uri", "s3cret"),
    ("tracking.uri=postgresql://mlflow:s3cret@${CNNZOO_TEST_UNSET_HOST}/mlflow", "tracking.uri", "s3cret"),
    ("serve.auth_token=t0kenpart-${CNNZOO_TEST_UNSET_SUFFIX}", "serve.auth_token", "t0kenpart"),
    ("storage_path=s3://bucket/ray?access_key=AKIA&secret_key=wJalrSECRET", "storage_path", "wJalrSECRET"),
    # Refused for a '#', a space or a missing slash before the options' check: each error showed the whole URI.
    ("storage_path=s3://bucket/ray?secret_key=wJalrSECRET#x", "storage_path", "wJalrSECRET"),
    ("storage_path='s3://bucket/ray?secret_key=wJalrSECRET x'", "storage_path", "wJalrSECRET"),
    ("storage_path=s3:/bucket/ray?secret_key=wJalrSECRET", "storage_path", "wJalrSECRET"),
    ("storage_path=s3://KEY:wJalrSECRET@/ray", "storage_path", "wJalrSECRET"),  # (the bucket missing first)
    ("storage_path=s3:/KEY:wJalrSECRET@bucket/ray", "storage_path", "wJalrSECRET"),
    # An unencoded '/' in the password: urllib's refusal quoted the part before it as the port
    ("tracking.uri=https://mlflow:s3cr/3tpw@mlflow.internal/", "tracking.uri", "s3cr"),
])
def test_config_errors_never_echo_a_secret(override, key, secret, monkeypatch):
    monkeypatch.delenv("CNNZOO_TEST_UNSET_HOST", raising=False)
    monkeypatch.delenv("CNNZOO_TEST_UNSET_SUFFIX", raising=False)
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.key == key and secret not in str(info.value)


@pytest.mark.parametrize("line", ["  auth_token: @Zx9kQ2s", "  auth_token: !Zx9kQ2s", "  auth_token: `Zx9kQ2s"])
def test_a_config_file_that_is_not_yaml_is_refused_without_quoting_its_line(tmp_path, line):
    """PyYAML's error quotes the line at fault: a token starting with @, ! or ` is not valid YAML, and the
    refusal printed it (the --set path hid it)."""
    config = tmp_path / "secret.yaml"
    config.write_text(f"serve:\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(config), [])
    assert info.value.key == "--config" and "line 2" in str(info.value) and "Zx9kQ2s" not in str(info.value)
    config.write_text("train:\n\tepochs: 2\n")  # what is at fault is still named where it is no value
    with pytest.raises(ConfigError, match=r"found character '\\t' that cannot start any token \(line 2"):
        load_config(str(config), [])


def test_the_masks_check_config_prints_are_refused_as_a_token_or_password(tmp_path):
    """check-config's output (and each run's logged config.yaml) loaded back: the token became the public mask
    '**********' and the database password '***', silently."""
    cfg = load_config(None, ["serve.auth_token=t0ken", "tracking.uri=postgresql://u:pw@db/x", "serve.host=0.0.0.0"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(cfg.to_yaml())
    with pytest.raises(ConfigError) as info:
        load_config(str(printed), [])
    assert info.value.key == "tracking.uri" and "mask" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(str(printed), ["tracking.uri=postgresql://u:pw@db/x"])
    assert info.value.key == "serve.auth_token" and "mask" in str(info.value)
    for uri in ("http://u:***@mlflow:5000", "mysql://db/x?user=u&password=***"):
        with pytest.raises(ConfigError, match="mask"):
            load_config(None, [f"tracking.uri={uri}"])
    for real in ("postgresql://u:***x@db/x", "mysql://db/x?password=***x"):  # a password that only starts so
        assert load_config(None, [f"tracking.uri={real}"]).tracking_uri == real


def test_a_list_as_a_yaml_key_or_a_huge_coefficient_range_exits_2(tmp_path, capsys):
    """Both ended in a traceback, exit 1: PyYAML raises TypeError for an unhashable key, and coefficient
    ranges of 1e200 overflowed the feasibility arithmetic (OverflowError)."""
    from pipelines.__main__ import main

    listed = tmp_path / "listed.yaml"
    listed.write_text("train:\n  ? [epochs]\n  : 3\n")
    assert main(["check-config", "--config", str(listed)]) == 2
    assert "--config" in capsys.readouterr().err
    huge = [f"search.{axis}=[1, 1e200]" for axis in ("alpha", "beta", "gamma")]
    assert main(["check-config", *[arg for o in huge for arg in ("--set", o)], "--set", "search.mode=optuna"]) == 2
    assert "search.alpha" in capsys.readouterr().err


def test_a_decode_budget_below_a_trained_models_own_input_is_refused_before_training():
    """EfficientNet-B4 takes 380 px whatever data.image_size: under serve.max_resized_pixels every request to
    it would be refused, which `run` found at its serve stage, after training everything."""
    base = ["data.image_size=224", "serve.max_resized_pixels=60000"]
    with pytest.raises(ConfigError) as info:
        load_config(None, [*base, "train.models=[resnet18, efficientnet_b4]", "search.phis=[]"])
    assert info.value.key == "serve.max_resized_pixels" and "efficientnet_b4 (380 px)" in str(info.value)
    with pytest.raises(ConfigError, match=r"efficientnet_phi3 \(at least 298 px\)"):  # 224 * 1.1^3, gamma >= 1.1
        load_config(None, [*base, "train.models=[resnet18]", "search.phis=[1, 3]", "search.gamma=[1.1, 1.3]"])
    assert load_config(None, [*base, "train.models=[resnet18]", "search.phis=[1]"])  # 224 px: fits


def test_a_warm_up_longer_than_the_run_is_refused(caplog):
    """warmup_epochs 5 of 3 epochs: the learning rate peaked at 0.6 of train.lr and stayed there."""
    cases = [(["train.warmup_epochs=5", "train.epochs=3"], "train.warmup_epochs", "lenet5's 3 epochs"),
             (["train.model_overrides={lenet5: {warmup_epochs: 3}}"], "train.model_overrides.lenet5.warmup_epochs",
              "lenet5's 2 epochs"),
             (["train.warmup_epochs=1.5", "train.epochs=3", "search.epochs=1"], "train.warmup_epochs",
              "the search's 1 epochs per trial")]
    for overrides, key, fragment in cases:
        with pytest.raises(ConfigError) as info:
            load_config(None, ["train.models=[lenet5]", *overrides])
        assert info.value.key == key and fragment in str(info.value), overrides
    # A model left out of train.models may keep a short run in a preset's overrides; the search's baseline is
    # held to the search's epochs only, unless train.models trains it too.
    load_config(None, ["train.models=[lenet5]", "train.warmup_epochs=1.5", "train.epochs=1", "search.epochs=3",
                       "train.model_overrides={alexnet: {epochs: 1}, lenet5: {epochs: 5}}", "search.phis=[]"])
    # A warm-up as long as the run reaches the peak at its last step: the fashion-mnist preset's 1-epoch smoke
    # runs (warmup_epochs 1) and the GPU presets' 2-epoch ones.
    assert load_config(PRESETS / "fashion-mnist.yaml", ["train.epochs=1"]).train.warmup_epochs == 1
    # Checking the models to train says nothing about a search that has not run.
    with caplog.at_level(logging.INFO, logger="pipelines"):
        load_config(None, ["search.compare_paper=true"])
    assert "found the paper's" not in caplog.text


def test_cli_config_errors_exit_2_before_ray_starts(tmp_path):
    # One interpreter runs every case; Ray must never be initialised in it. In a directory of its own: the default
    # workdir is ./runs, where a quick start running from the checkout holds its stages' locks.
    script = """
import os, socket, sys, tempfile, ray
from pipelines.__main__ import main
binary = os.path.join(tempfile.mkdtemp(), "model.pt")
held = socket.socket()  # another program on the serve port: found before the local Ray's start, not after it
held.bind(("127.0.0.1", 0))
held.listen()
port = held.getsockname()[1]
started = []  # every ray.init call (one that failed later shut Ray down again: is_initialized says nothing)
ray_init = ray.init
ray.init = lambda *args, **kwargs: started.append(1) or ray_init(*args, **kwargs)
open(binary, "wb").write(bytes(range(128, 256)))  # --config pointed at a checkpoint: not text
cases = [
    ["train", "--config", binary],
    ["run", "--stages", ","],  # a mangled shell variable: started every stage, serving included
    ["run", "--stages", ""],  # --stages "$STAGES" with the variable unset: the same
    ["train", "--set", "train.modles=[resnet18]"],
    ["run", "--set", "train.epochs=-1"],
    ["search", "--set", "search.alpha=[1.5,2.0]", "--set", "search.beta=[1.5,2.0]", "--set", "search.gamma=[1.5,2.0]"],
    ["search", "--set", "search.alpha=[1.3,1.1]"],
    ["search", "--set", "search.beta=[0.5,1.1]"],
    ["train", "--set", "data.dataset=mnist"],
    ["train", "--set", "data.dataset=imagefolder", "--set", "data.root=/does/not/exist"],
    ["train", "--config", "/does/not/exist.yaml"],
    ["run", "--stages", "search,fly"],
    # A local Ray stops, and serving with it, when the command returns.
    ["run", "--no-block"],
    ["serve", "--no-block", "--set", "ray.address=local"],
    # Two files: one was used and the other dropped without a word.
    ["check-config", "QUICKSTART_YAML", "--config", "fashion-mnist"],
    ["serve", "--set", f"serve.port={port}"],
    ["run", "--stages", "train,serve", "--set", f"serve.port={port}"],
]
codes = [main(argv) for argv in cases]
os.environ["RAY_ADDRESS"] = "http://127.0.0.1:8265"  # exported for `ray job submit`, as Ray's job docs say
codes.append(main(["train"]))
codes.append(main(["check-config"]))  # needs no Ray: the address does not matter to it
os.environ["RAY_ADDRESS"] = "ray://127.0.0.1:10001"  # Ray Client, which ray.address refuses: read by "auto" too
codes.append(main(["train", "--set", "ray.address=auto"]))
print(codes)
sys.exit(0 if codes == [2] * (len(cases) + 1) + [0, 2] and not ray.is_initialized() and not started else 1)
"""
    script = script.replace("QUICKSTART_YAML", str(Path(__file__).resolve().parents[1] / "pipelines" / "configs"
                                                   / "quickstart.yaml"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    for fragment in ("config error: train.modles: unknown key; did you mean 'train.models'?",
                     "train.epochs", "search.alpha: low end 1.3 is above high end 1.1", "search.beta",
                     "data.dataset: unknown dataset 'mnist'", "data.root", "--config", "--stages",
                     "--no-block: needs a Ray cluster that outlives this command",
                     "RAY_ADDRESS: 'http://127.0.0.1:8265' is a dashboard address", "RAY_ADDRESS: 'ray://127.0.0.1",
                     "--config: cannot read", "--stages: ',' names no stage",
                     "--config: check-config was given two files", "is already in use on this node"):
        assert fragment in out.stderr


def test_ctrl_c_while_the_config_is_checked_exits_130_without_a_traceback(monkeypatch, caplog):
    """The config check builds models on the meta device (about 2 s with torch's import): a Ctrl-C then printed
    a KeyboardInterrupt traceback and the process died by the signal."""
    import pipelines.__main__ as cli

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_config", interrupted)
    assert cli.main(["check-config"]) == cli.EXIT_INTERRUPTED


def test_check_config_prints_the_resolved_config(tmp_path, pipelines_cli):
    out = pipelines_cli("check-config", "--set", "train.epochs=7", "--set", f"workdir={tmp_path}")
    assert out.returncode == 0 and not out.started_ray, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["train"]["epochs"] == 7
    assert resolved["train"]["models"][0] == "lenet5"
    # What run trains: the quickstart's 7 models and the searched family at phi 0 and 1 (it said "7 model(s)")
    assert "config OK: 7 model(s) and up to 2 EfficientNet family member(s) of the search" in out.stderr
    from pipelines.planning import family_members

    assert family_members(load_config(None, ["search.phis=[0, 1, 2]", "search.compare_paper=true",
                                             "train.models=[lenet5, efficientnet_phi1]"])) == [
        "efficientnet_phi0", "efficientnet_phi2", "efficientnet_paper_phi1", "efficientnet_paper_phi2"]
    # tracking.uri and registered_model are null above: the verdict says what they resolve to
    assert resolved["tracking"]["uri"] is None
    assert f"tracking sqlite:///{tmp_path}/mlflow.db," in out.stderr
    assert "registered model quickstart" in out.stderr


def test_configuration_reference_doc_is_current():
    from pathlib import Path

    from pipelines.config import config_reference

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert config_reference() in doc, "regenerate docs/configuration.md from pipelines.config.config_reference()"


def test_a_failed_stage_exits_1_with_one_line_and_no_traceback(tmp_path, pipelines_cli):
    """report needs no Ray: with RAY_ADDRESS at an address nothing answers it runs (and fails on the records)."""
    nowhere = {"RAY_ADDRESS": "http://127.0.0.1:1"}
    out = pipelines_cli("report", "--set", f"workdir={tmp_path}", env=nowhere)
    assert out.returncode == 1 and not out.started_ray, out.stdout + out.stderr
    assert "error: LookupError: no trained models under" in out.stderr
    assert "run the train stage first" in out.stderr and "Traceback" not in out.stderr
    # `run` of the report alone needs no Ray either (it started one, and refused this RAY_ADDRESS); --no-block,
    # which is about serving, is no reason to refuse it without a cluster.
    out = pipelines_cli("run", "--stages", "report", "--no-block", "--set", f"workdir={tmp_path}", env=nowhere)
    assert out.returncode == 1 and "error: LookupError: no trained models under" in out.stderr, out.stderr
    assert not out.started_ray


@pytest.mark.slow
def test_a_failed_command_says_which_writes_it_left_pending_and_how_to_send_them(tmp_path, capsys, monkeypatch):
    """A failed stage ended on its one error line: the writes it had kept pending for MLflow (sent by the next
    command of the config) were never mentioned, so a user who did not re-run never learned of `register`."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # nothing listens on port 9: refused at once
    from pipelines.__main__ import main
    from pipelines.config import load_config
    from pipelines.tracking_queue import TrackingQueue

    overrides = [f"workdir={tmp_path}", "name=p", "tracking.uri=http://127.0.0.1:9", "tracking.pending_timeout_s=1"]
    queue = TrackingQueue.for_config(load_config(None, overrides))
    queue.put("set_tags", queue.new_run("lenet5", {"stage": "train"}), tags={"note": "written in an outage"})
    assert len(queue.flush(timeout_s=1)) == 2
    assert main(["report", *[a for o in overrides for a in ("--set", o)]]) == 1
    err = capsys.readouterr().err
    assert "error: LookupError: no trained models under" in err
    assert "kept in" in err and "python -m pipelines register --set workdir=" in err, err


def test_a_failure_message_keeps_its_later_lines_on_the_one_line():
    """Ray's errors put the fix on their later lines ("To fix this, either:" then the options): the first line
    alone ended at the colon."""
    from pipelines.__main__ import _one_line

    err = ValueError("Invalid Ray address. To fix this, either:\n  - unset RAY_ADDRESS\n  - or use host:6379")
    assert _one_line(err) == ("ValueError: Invalid Ray address. To fix this, either: - unset RAY_ADDRESS "
                              "- or use host:6379")
    assert _one_line(RuntimeError("x" * 1000)).endswith("x...") and len(_one_line(RuntimeError("x" * 1000))) < 430
    assert _one_line(KeyError()) == "KeyError"
    # This project's own messages are read whole: a missing Fashion-MNIST's (~480 characters) lost its second fix.
    from pipelines.data import DataError

    missing = DataError("Fashion-MNIST IDX files not found " + "in /a/long/path " * 25 + "; or set data.root to ...")
    assert _one_line(missing).endswith("or set data.root to ...") and len(_one_line(missing)) > 430
    assert _one_line(DataError("y" * 5000)).endswith("y...")  # (not without end)
    # Ray wraps a task's error in its remote traceback (with colour codes): the line ended in the traceback's
    # first frames, the cause ("Failed to bind to address") cut off.
    import ray.exceptions

    wrapped = ray.exceptions.RayTaskError("ProxyActor.ready", "Traceback (most recent call last):\n  File x\n"
                                          "\x1b[36mray::ProxyActor.ready()\x1b[39m",
                                          RuntimeError("Failed to bind to address '127.0.0.1:8000'"))
    for err in (wrapped, wrapped.as_instanceof_cause()):
        assert _one_line(err) == "RuntimeError: Failed to bind to address '127.0.0.1:8000'"
    assert _one_line(RuntimeError("\x1b[31mred\x1b[0m")) == "RuntimeError: red"


@pytest.mark.slow
def test_ctrl_c_while_training_exits_130_and_leaves_the_model_untrained(tmp_path):
    """The README's promise: Ctrl-C exits 130, the model not counted as trained (a re-run resumes it from its
    checkpoints: the stage's resume is tested in test_train.py). Ray Tune's own SIGINT handler would turn the
    first Ctrl-C into a graceful stop: exit 0, the stage's MLflow run FINISHED, the model counted as trained
    although it had not finished."""
    import signal

    from pipelines.results import load_results
    from pipelines.tracking import Tracker

    overrides = [f"workdir={tmp_path}", "name=interrupted", "train.models=[lenet5]", "train.epochs=50",
                 "data.image_size=16", "data.train_subset=300", "ray.include_dashboard=false", "ray.num_cpus=1",
                 "train.progress_interval_s=0.01"]
    command = [sys.executable, "-m", "pipelines", "train"] + [a for o in overrides for a in ("--set", o)]
    # SIGINT at its default in the child: a suite started in the background (`cmd &`) has it ignored, and
    # Python keeps an inherited ignore, so the Ctrl-C would never arrive.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    output, progress = [], "[lenet5] epoch 1/50: batch "
    try:
        for line in process.stdout:
            output.append(line)
            # Training, with a checkpoint to resume from; the worker's progress lines within the epoch reached this
            # console (through Ray's log monitor, which may deliver them after the driver's epoch line).
            epoch_done = "lenet5: epoch " in "".join(output)
            if (epoch_done and progress in "".join(output)) or "lenet5: epoch 5/50" in line:
                process.send_signal(signal.SIGINT)
                break
        rest, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    log = "".join(output) + rest
    assert process.returncode == 130, log
    assert "interrupted; re-run the same command to resume" in log
    assert progress in log and " img/s, epoch ETA " in log, log  # long epochs are never silent (issue #12)
    cfg = load_config(None, overrides)
    assert load_results(cfg.paths.train_dir) == {}
    tracker = Tracker.for_config(cfg)
    stage_run = tracker.find_run("tags.stage = 'train' and tags.`cnnzoo.stage_parent` = 'true'")
    assert stage_run.info.status == "KILLED"
    # The model's own run too: left RUNNING, it would read as still training in the MLflow UI for good.
    model_run = tracker.find_run("tags.`cnnzoo.model` = 'lenet5'")
    assert model_run.info.status == "KILLED"
    assert model_run.data.tags["mlflow.parentRunId"] == stage_run.info.run_id


RAY_OF_ITS_OWN = """
import json, os, sys
from pipelines.config import load_config
from pipelines.runtime import WORKER_ENV, ray_session

cfg = load_config(None, [f"workdir={sys.argv[1]}", "name=t", "ray.address=local", "ray.num_cpus=1",
                         "ray.num_gpus=0", "ray.include_dashboard=false"])
with ray_session(cfg):
    import ray
    from ray._private import ray_constants

    @ray.remote(num_cpus=0)
    def worker_env():
        return {key: os.environ.get(key) for key in WORKER_ENV}

    resources = ray.cluster_resources()
    print(json.dumps([resources.get("CPU"), resources.get("GPU", 0), ray.get(worker_env.remote()),
                      ray_constants.RAY_DEDUP_LOGS]))
print(json.dumps(ray.is_initialized()))
"""


@pytest.mark.slow
@pytest.mark.own_ray
def test_ray_address_local_starts_a_ray_sized_and_set_up_by_the_config(tmp_path):
    """``ray.address: local`` (or RAY_ADDRESS=local) is a Ray of the command's own like no address at all: it
    ignored ray.num_cpus / num_gpus and the workers' environment (every worker line printed twice). A real Ray,
    in a process of its own (the session's is another), ended with the command. A worker setting the user set
    stays theirs (the runtime_env overrode it), and Ray, imported by the session itself, stops folding repeated
    lines (it read RAY_DEDUP_LOGS before the session set it)."""
    import json

    from pipelines.runtime import WORKER_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_DEDUP_LOGS"))}
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "2"
    out = subprocess.run([sys.executable, "-c", RAY_OF_ITS_OWN, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith(("[", "true", "false"))]
    assert lines == [[1.0, 0, {**WORKER_ENV, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}, False], False]


def test_yaml_merge_keys_and_empty_variables_read_as_yaml_and_the_shell_do(tmp_path, monkeypatch):
    """`<<: *anchor` (shared overrides) was refused as invalid YAML by the duplicate-key check; `${X:-default}`
    with X set but empty gave '' (storage on the driver's disk, outputs in the current directory), not the
    default, unlike the shell's `:-`."""
    config = tmp_path / "merge.yaml"
    config.write_text("train:\n  models: [alexnet, vgg11_bn]\n  model_overrides:\n"
                      "    alexnet: &slow {optimizer: adamw, lr: 0.001}\n    vgg11_bn: {<<: *slow, lr: 0.002}\n"
                      "workdir: ${EMPTY_WORKDIR:-" + str(tmp_path / "runs") + "}\n")
    monkeypatch.setenv("EMPTY_WORKDIR", "")
    cfg = load_config(str(config), [])
    assert cfg.train.model_overrides["vgg11_bn"] == {"optimizer": "adamw", "lr": 0.002}
    assert cfg.workdir == str(tmp_path / "runs")
    config.write_text("train:\n  epochs: 2\n  epochs: 3\n")  # a key given twice is still refused
    with pytest.raises(ConfigError, match="duplicate key 'epochs'"):
        load_config(str(config), [])


def test_the_local_resource_check_counts_the_cpus_ray_will_get_not_the_hosts(make_config, monkeypatch):
    """In a container limited to 2 CPUs on a 32-core host, os.cpu_count() says 32 while Ray (cgroup quota) gives
    2: a 4-CPU worker passed the check and waited for good instead of exiting 2."""
    import os

    import ray._private.utils

    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    monkeypatch.setattr(ray._private.utils, "get_num_cpus", lambda *args, **kwargs: 2)
    with pytest.raises(ConfigError, match="more than the 2 of the local Ray"):
        make_config("train.cpus_per_worker=4")


def test_relative_paths_in_a_ray_jobs_unpacked_upload_are_named(tmp_path, monkeypatch):
    """`ray job submit --working-dir .` runs the command in Ray's unpacked copy of the upload, a new directory for
    each upload of different content: a relative workdir (the presets' ./runs) put the runs and the registry
    there, and the next job after any edit trained everything afresh, without a word."""
    from pipelines.config import paths_in_a_job_copy

    upload = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    upload.mkdir(parents=True)
    monkeypatch.chdir(upload)
    cfg = load_config(None, ["workdir=./runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    assert paths_in_a_job_copy(cfg) == ["workdir", "storage_path"]
    cfg = load_config(None, ["workdir=./runs", "storage_path=s3://bucket/ray", "tracking.uri=sqlite:///mlflow.db"])
    assert paths_in_a_job_copy(cfg) == ["workdir", "tracking.uri"]
    assert paths_in_a_job_copy(load_config(None, [f"workdir={tmp_path}/runs"])) == []
    monkeypatch.chdir(tmp_path)  # not a job's copy: relative paths are the user's choice
    assert paths_in_a_job_copy(load_config(None, ["workdir=./runs"])) == []


def test_the_cli_sets_rays_import_time_settings_before_anything_imports_ray(tmp_path):
    """RAY_DEDUP_LOGS=0 was set when a command started Ray, after `import ray` had read it: the driver folded the
    progress lines of models training side by side into one line "[repeated 3x across cluster]" (Ray's
    deduplication drops every word with a digit, so resnet18's, lenet5's and densenet121's lines look alike)."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_DEDUP_LOGS"}
    code = ("from pipelines.__main__ import main\n"
            "status = main(['check-config'])\n"
            "from ray._private import ray_constants\n"
            "print('status', status, 'dedup', ray_constants.RAY_DEDUP_LOGS)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.split()[-4:] == ["status", "0", "dedup", "False"], done.stdout[-2000:] + done.stderr[-2000:]


def test_a_path_this_user_may_not_look_at_is_a_config_error_naming_its_key(tmp_path, pipelines_cli, monkeypatch):
    """A workdir, data.root, storage_path or --config under a directory this user may not search (another user's
    0700 home, as Ray images' `ray` user meets it): Path.exists raised PermissionError, and the check ended in a
    traceback (exit 1) instead of exit 2 naming the key. A --config name over 255 bytes did the same."""
    locked = tmp_path / "locked"
    real_stat = Path.stat

    def stat(self, *args, **kwargs):  # (root searches every directory: what a 0700 one of another user does)
        if str(self).startswith(f"{locked}/"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    monkeypatch.chdir(tmp_path)
    for args, key in ((["--set", f"workdir={locked}/runs"], "workdir"),
                      (["--set", "data.dataset=imagefolder", "--set", f"data.root={locked}/images"], "data.root"),
                      (["--set", f"storage_path={locked}/ray"], "storage_path"),
                      (["--config", f"{locked}/mine"], "--config")):
        refused = pipelines_cli("check-config", *args)
        assert refused.returncode == 2, (key, refused.stderr)
        assert f"{key}: cannot look at '{locked}/" in refused.stderr and "Permission denied" in refused.stderr
        assert "Traceback" not in refused.stderr
    refused = pipelines_cli("check-config", "--config", "c" * 300)
    assert refused.returncode == 2 and "--config: cannot look at" in refused.stderr, refused.stderr
    assert "File name too long" in refused.stderr


def test_a_file_uri_storage_path_is_the_local_directory_it_names(make_config, tmp_path, monkeypatch):
    """storage_path: file:///home/ray/ckpt passed as a URI: the warning of storage on one node's disk on a cluster
    and the check that this user may write there were both skipped (they looked at plain paths only)."""
    from pipelines.config import check_writable_locations
    from pipelines.runtime import node_local_storage_warning

    cfg = make_config(f"storage_path=file://{tmp_path}/my%20ckpt")
    assert cfg.paths.storage == f"{tmp_path}/my ckpt"
    assert cfg.paths.experiment("search").startswith(f"{tmp_path}/my ckpt/")
    assert node_local_storage_warning(cfg.paths.storage, 3, "/dev/root / ext4 rw 0 0\n") is not None
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path))  # (root may write anywhere)
    with pytest.raises(ConfigError, match="storage_path: .* cannot be created: this user may not write in"):
        check_writable_locations(cfg)


def test_a_config_file_whose_name_is_too_long_for_a_yaml_suffix_loads(tmp_path, pipelines_cli):
    """`--config` of a file whose name is 251 to 255 bytes: its `.yaml` sibling was looked at first, a name too
    long, and the file named was refused as "cannot look at" a file the user never named."""
    config = tmp_path / ("c" * 252)
    config.write_text("name: long-named\n")
    checked = pipelines_cli("check-config", "--config", str(config), "--set", f"workdir={tmp_path}/runs")
    assert checked.returncode == 0, checked.stderr
    missing = pipelines_cli("check-config", "--config", str(tmp_path / ("d" * 252)))
    assert missing.returncode == 2 and "--config: file" in missing.stderr and "not found" in missing.stderr, \
        missing.stderr


def test_an_environment_reference_set_but_empty_is_refused_as_an_unset_one_is(make_config, monkeypatch):
    """`CNNZOO_STORAGE_PATH=` passed cifar10-gpu's check with storage_path '' (node-local storage on a cluster,
    failing once Ray Train ran); `MLFLOW_TRACKING_URI=` was refused as "a file store"."""
    monkeypatch.setenv("CNNZOO_TEST_EMPTY", "")
    with pytest.raises(ConfigError, match=r"storage_path: environment variable CNNZOO_TEST_EMPTY is set but empty"):
        make_config("storage_path=${CNNZOO_TEST_EMPTY}")
    with pytest.raises(ConfigError, match="tracking.uri: environment variable CNNZOO_TEST_UNSET_X is not set"):
        make_config("tracking.uri=${CNNZOO_TEST_UNSET_X}")
    assert make_config("storage_path=${CNNZOO_TEST_EMPTY:-/tmp/store}").storage_path == "/tmp/store"


def test_check_configs_output_loads_back_as_the_same_config_with_number_like_strings(tmp_path):
    """A string the loader reads as a float (YAML 1.2's `1e3`) was printed plain by check-config (and logged so
    with every run): loaded back, `name: 1e3` was a float, refused."""
    cfg = load_config(None, ["name='1e3'", "tracking.registered_model='2E5'", "serve.models=['1e3', '.5e1']",
                             "serve.allow_unauthenticated=true"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(cfg.to_yaml())
    assert load_config(str(printed), []) == cfg
