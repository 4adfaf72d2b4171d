"""Planning on the driver, without Ray: runs, fingerprints, cached searches, sizing and output paths."""

from __future__ import annotations

import json
import logging
import os

import pytest
from pydantic import ValidationError

from pipelines.data import describe_dataset
from pipelines.planning import (
    ModelRun,
    auto_cpus_per_worker,
    plan_model_runs,
    resolve_models,
    search_fingerprint,
)
from pipelines.runtime import concurrency_for
from pipelines.search import SearchResult, load_search_result, searched_coefficients
from pipelines.trials import TRIAL_DRIVER_RESOURCES


def lenet_run(make_config, *overrides: str) -> ModelRun:
    cfg = make_config("train.models=[lenet5]", *overrides)
    return plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)[0]


def test_a_run_travels_as_json_and_refuses_unknown_keys(make_config):
    run = lenet_run(make_config, "train.label_smoothing=0.1", "train.model_overrides={lenet5: {lr: 0.02}}")
    again = ModelRun.from_dict(run.to_dict())
    assert again == run and again.hyper.lr == 0.02 and again.hyper.label_smoothing == 0.1
    assert again.spec == run.spec and again.spec.image_size == 32  # raised to LeNet-5's minimum
    # Larger images are resized down to LeNet-5's 32 px (planning used to fail profiling it at 64 px).
    assert lenet_run(make_config, "data.image_size=64").spec.image_size == 32
    data = run.to_dict()
    data["hyper"]["learning_rate"] = 0.1
    with pytest.raises(ValidationError, match="learning_rate"):
        ModelRun.from_dict(data)


@pytest.mark.parametrize("change, starts_afresh", [
    ("train.label_smoothing=0.1", True),
    ("train.lr=0.01", True),
    ("train.momentum=0.5", True),
    ("train.schedule=constant", True),
    ("train.warmup_epochs=1.0", True),
    ("train.model_overrides={lenet5: {weight_decay: 0.01}}", True),
    ("train.model_options={lenet5: {variant: paper}}", True),
    ("data.augment=true", True),  # the quick start trains without augmentation
    ("data.augment=flip", True),
    ("train.cpu_bf16=true", True),
    ("train.cpu_bf16=auto", True),
    ("train.model_overrides={lenet5: {cpu_bf16: true}}", True),
    ("train.cpu_bf16=false", False),  # the default: absent from the fingerprint, as before the setting
    ("train.num_workers=2", True),
    ("train.epochs=9", False),  # more epochs continue the run
    ("train.cpus_per_worker=0.5", False),  # where a run executes does not change what it learns
    ("train.max_failures=5", False),
    ("train.trial_retries=0", False),
    ("data.loader_workers=2", False),
    ("data.skip_bad_files=true", False),  # how bad files are handled; the files left out count (below)
])
def test_the_training_fingerprint_covers_every_setting_that_changes_results(make_config, change, starts_afresh):
    base = lenet_run(make_config)
    changed = lenet_run(make_config, change)
    assert (changed.fingerprint != base.fingerprint) is starts_afresh
    assert (changed.run_name != base.run_name) is starts_afresh  # the Ray Train run it resumes or starts


def test_files_left_out_travel_with_the_run_and_start_it_afresh(make_config):
    run = lenet_run(make_config)
    skipping = run.model_copy(update={"excluded_files": ("cat/broken.png", "dog/empty.jpg")})
    assert ModelRun.from_dict(skipping.to_dict()).excluded_files == ("cat/broken.png", "dog/empty.jpg")
    assert skipping.fingerprint != run.fingerprint  # other images: not the same run
    assert run.model_copy(update={"excluded_files": ()}).fingerprint == run.fingerprint


@pytest.mark.parametrize("change, invalidates", [
    ("train.label_smoothing=0.1", True),
    ("search.epochs=5", True),
    ("search.step=0.05", True),
    ("train.model_overrides={efficientnet: {lr: 0.3}}", True),
    ("search.train_subset=50", True),
    ("search.max_concurrent_trials=1", False),
    ("search.phis=[0, 1, 2]", False),  # the family trained afterwards, not the search
    ("search.compare_paper=true", False),  # so is the paper's family
    ("train.models=[resnet18]", False),
    # Where the trials run, not what they find (a GPU preset's share changed redid its whole search):
    ("search.gpus_per_trial=0.25", False),
    ("search.seed=5", False),  # a grid (the default mode) draws nothing
    ("search.mode=optuna", True),
])
def test_a_changed_search_setting_invalidates_the_cached_search(make_config, change, invalidates):
    cfg = make_config()
    result = SearchResult(best={"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "val_acc": 0.9}, trials=[],
                          objective="val_acc", phi=1.0, paper_included=True, fingerprint=search_fingerprint(cfg))
    result.save(cfg.paths.search_result)
    assert load_search_result(cfg) is not None
    changed = make_config(change)
    assert (load_search_result(changed) is None) is invalidates


@pytest.mark.parametrize("base, change, invalidates", [
    # Settings of a part that is off decide nothing (each changed value threw a finished search away):
    (["search.mode=optuna"], "search.step=0.2", False),  # the grid's spacing, in an Optuna search
    (["search.asha=false", "search.epochs=4"], "search.grace_period=2", False),
    (["search.asha=false", "search.epochs=4"], "search.reduction_factor=4", False),
    ([], "search.target_macs=1000000", False),  # under the val_acc objective
    (["search.num_trials=12"], "search.num_trials=50", False),  # a cap above the grid's 12 networks
    # ... and where the part is on, they do:
    (["search.asha=true", "search.epochs=4"], "search.grace_period=2", True),
    (["search.objective=mnas"], "search.target_macs=1000000", True),
    ([], "search.num_trials=4", True),
    (["search.mode=optuna"], "search.num_trials=4", True),
])
def test_settings_of_a_part_that_is_off_keep_the_cached_search(make_config, base, change, invalidates):
    from pipelines.planning import grid_candidate_count

    cfg = make_config(*base)
    assert grid_candidate_count(cfg) == 12  # the grid the cap case above is set against
    SearchResult(best={"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "val_acc": 0.9}, trials=[], objective="val_acc",
                 phi=1.0, paper_included=True, fingerprint=search_fingerprint(cfg)).save(cfg.paths.search_result)
    assert load_search_result(cfg) is not None
    assert (load_search_result(make_config(*base, change)) is None) is invalidates


def test_a_search_saved_before_the_off_settings_were_left_out_is_still_found(make_config):
    """Leaving settings of a part that is off out of the fingerprint gave searches saved before (an Optuna search
    with the quickstart's step) a new one: thrown away once, or an interrupted one started afresh."""
    from pipelines.planning import search_fingerprints
    from pipelines.search import _experiment_name

    cfg = make_config("search.mode=optuna")
    current, legacy = search_fingerprints(cfg)
    assert legacy == search_fingerprint(cfg, legacy=True) != current
    SearchResult(best={"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "val_acc": 0.9}, trials=[], objective="val_acc",
                 phi=1.0, paper_included=True, fingerprint=legacy).save(cfg.paths.search_result)
    assert load_search_result(cfg) is not None
    marker = cfg.paths.search_result.with_name("experiment.json")
    marker.write_text(json.dumps({"fingerprint": legacy, "experiment": "forced-before"}))
    assert _experiment_name(cfg, current, force=False) == "forced-before"
    assert search_fingerprints(make_config()) == [search_fingerprint(make_config())]  # the defaults: one


def test_the_coefficients_of_the_users_own_efficientnet_do_not_change_the_search(make_config):
    """Every trial sets its own (alpha, beta, gamma): the user's efficientnet's in train.model_options changed the
    search's fingerprint only, and a finished search was thrown away ("run with other settings")."""
    from pipelines.planning import search_fingerprints

    plain = search_fingerprint(make_config())
    own = make_config("train.model_options={efficientnet: {alpha: 1.3, beta: 1.0}}")
    assert search_fingerprint(own) == plain
    assert search_fingerprint(make_config("train.model_options={efficientnet: {dropout: 0.3}}")) != plain
    # A search saved before, with them in its fingerprint, is still this config's (not thrown away once more)
    before = search_fingerprint(own, with_user_coefficients=True)
    assert before != plain and before in search_fingerprints(own)


def test_train_says_why_the_efficientnet_family_is_left_out(make_config, caplog):
    """`train` (as `run`) trains the family only from a finished search of these settings, and says so when it
    leaves the family out: no search yet, or one run with other settings (here another learning rate)."""
    cfg = make_config("search.phis=[1]")
    with caplog.at_level(logging.INFO, logger="pipelines"):
        assert searched_coefficients(cfg) is None
    assert "no finished search for this config: the EfficientNet family at search.phis [1.0] is not trained" \
        in caplog.text
    SearchResult(best={"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "val_acc": 0.9}, trials=[], objective="val_acc",
                 phi=1.0, paper_included=True, fingerprint=search_fingerprint(cfg)).save(cfg.paths.search_result)
    assert searched_coefficients(cfg) == {"alpha": 1.2, "beta": 1.1, "gamma": 1.15}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines"):
        assert searched_coefficients(make_config("search.phis=[1]", "train.lr=0.01")) is None
    assert "the finished search was run with other search or training settings" in caplog.text


def test_cpus_per_worker_split_the_free_cpus_among_one_models_workers(make_config, cuda_devices):
    cuda_devices(1)
    assert auto_cpus_per_worker(make_config(), 2.0) == 1.95
    assert auto_cpus_per_worker(make_config("train.num_workers=2"), 2.0) == 0.97
    # However many workers, one model's run fits the free CPUs (a floor of 0.25 per worker made 8 workers on 2
    # CPUs ask for 2.01 and wait for good); with nothing free to split, a quarter each.
    for workers, cpus in [(8, 2.0), (8, 1.0), (3, 2.0), (64, 4.0)]:
        cfg = make_config(f"train.num_workers={workers}", "train.batch_size=192")
        per_worker = auto_cpus_per_worker(cfg, cpus)
        assert 0 < per_worker * workers + TRIAL_DRIVER_RESOURCES["CPU"] <= cpus, (workers, cpus)
    assert auto_cpus_per_worker(make_config("train.num_workers=8"), 2.0) == 0.24
    assert auto_cpus_per_worker(make_config("train.num_workers=8"), 0.0) == 0.25
    gpu = make_config("train.use_gpu=true", "ray.num_gpus=1", "ray.num_cpus=16", "data.loader_workers=3")
    assert auto_cpus_per_worker(gpu, 16.0) == 4.0
    # A cluster: a worker's CPUs are on one node. 12 free CPUs on an 8- and a 4-CPU node gave one worker 11.95,
    # or two workers 5.97 each, which no node (or only one) holds: the run waited for good.
    two = make_config("train.num_workers=2")
    assert auto_cpus_per_worker(make_config(), 12.0, node_cpus=[8.0, 4.0]) == 7.95
    assert auto_cpus_per_worker(two, 12.0, node_cpus=[8.0, 4.0]) == 3.97
    assert auto_cpus_per_worker(two, 12.0, node_cpus=[6.0, 6.0]) == 5.95
    assert auto_cpus_per_worker(two, 2.0, node_cpus=[2.0]) == 0.97  # one node: as before
    assert auto_cpus_per_worker(make_config(), 1.0, node_cpus=[2.0]) == 0.95  # the free CPUs still bound it
    # A head without CPUs (`ray start --head --num-cpus=0`, Ray's advice for clusters) holds no worker; it
    # counted as minus one, and one worker on a 16-CPU node got a quarter of a CPU.
    assert auto_cpus_per_worker(make_config(), 16.0, node_cpus=[0.0, 16.0]) == 15.95
    assert auto_cpus_per_worker(two, 8.0, node_cpus=[0.0, 4.0, 4.0]) == 3.95
    assert auto_cpus_per_worker(make_config("train.cpus_per_worker=1.5"), 16.0) == 1.5


def test_concurrency_counts_how_many_runs_fit_the_free_resources(caplog):
    free = {"CPU": 16.0, "GPU": 4.0}
    assert concurrency_for("auto", {"CPU": 3.0, "GPU": 0.0}, 10, free) == 5
    assert concurrency_for("auto", {"CPU": 2.0, "GPU": 2.0}, 10, free) == 2  # GPUs run out first
    assert concurrency_for("auto", {"CPU": 1.0, "GPU": 0.0}, 3, free) == 3  # no more than there are runs
    assert concurrency_for(2, {"CPU": 1.0, "GPU": 0.0}, 10, free) == 2
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        assert concurrency_for("auto", {"CPU": 32.0, "GPU": 0.0}, 4, free) == 1  # waits for resources
    assert "only 16 CPU are free" in caplog.text


def test_a_trial_driver_on_the_heads_driver_resource_takes_no_cpu_from_the_workers_nodes(make_config):
    """On cluster.yaml's layout (trial drivers on the head's cnnzoo_driver resource, no CPU of theirs) each trial
    was still counted with a driver's sliver of CPU: 2.01 per run of 2 CPUs left one run's place idle, 7 runs at a
    time on four 4-CPU nodes instead of 8 (1 instead of 2 on one such node)."""
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.trials import DRIVER_NODE_RESOURCE, trial_resources

    cfg = make_config("train.models=[lenet5]", "train.cpus_per_worker=1.5")
    [run] = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=8)
    head = {"CPU": 0.0, DRIVER_NODE_RESOURCE: 1000.0}
    workers = [{"CPU": 3.0}, {"CPU": 3.0}]  # two runs of 1.5 CPUs each
    cluster = {"CPU": 6.0, DRIVER_NODE_RESOURCE: 1000.0}
    per_trial = trial_resources(run, cluster)
    assert per_trial["CPU"] == 1.5
    assert concurrency_for("auto", per_trial, 9, {"CPU": 6.0, "GPU": 0.0}, workers=run.workers,
                           nodes=[head, *workers]) == 4
    # without the driver resource (a laptop, CI) drivers take a sliver of CPU where they run
    assert trial_resources(run, {"CPU": 6.0})["CPU"] > 1.5 and trial_resources(run)["CPU"] > 1.5


def test_gpu_shares_below_one_are_counted_per_gpu_as_ray_places_them():
    """Ray places a fractional GPU on one GPU: 8 GPUs hold 16 runs of 0.4, not the 20 the total divided by the
    share counted (runs started that then waited, and the "N at a time" line overstated N)."""
    from pipelines.config import WorkerSettings
    from pipelines.runtime import requests_fitting, runs_fitting_nodes

    assert requests_fitting(8.0, 0.4, "GPU") == 16 and requests_fitting(8.0, 0.5, "GPU") == 16
    assert requests_fitting(1.0, 0.3, "GPU") == 3
    assert requests_fitting(7.75, 0.5, "GPU") == 15  # a Serve replica's quarter of one GPU: one share fewer on it
    assert requests_fitting(8.0, 0.4, "CPU") == 20 and requests_fitting(4.0, 2.0, "GPU") == 2
    assert concurrency_for("auto", {"CPU": 1.0, "GPU": 0.4}, 100, {"CPU": 64.0, "GPU": 8.0}) == 16
    workers = WorkerSettings(num_workers=1, cpus_per_worker=1.0, use_gpu=True, gpus_per_worker=0.4)
    assert runs_fitting_nodes(workers, [{"CPU": 32.0, "GPU": 8.0}] * 4) == 64


def test_every_output_location_comes_from_one_paths_object(make_config, tmp_path):
    cfg = make_config(f"storage_path={tmp_path / 'shared'}")
    paths = cfg.paths
    assert paths.run_dir == (tmp_path / "runs" / "test").resolve()
    assert paths.search_result == paths.run_dir / "search" / "best.json"
    assert paths.train_dir.parent == paths.report_dir.parent == paths.serve_dir.parent == paths.run_dir
    assert paths.storage == str((tmp_path / "shared").resolve())
    assert paths.experiment("x-train") == f"{paths.storage}/x-train"
    assert cfg.tracking_uri == f"sqlite:///{paths.mlflow_db}"
    assert make_config("storage_path=s3://bucket/p").paths.storage == "s3://bucket/p"


def test_one_run_more_than_fits_is_admitted_to_start_up_while_one_trains(make_config):
    from pipelines.planning import with_overlapped_startup

    assert not make_config().train.overlap_startup  # opt-in (docs/benchmarks.md: slower on 2 cores)
    cfg = make_config("train.models=[lenet5, resnet18, vgg11_bn]", "train.overlap_startup=true")
    runs = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2.0)
    assert runs[0].workers.cpus_per_worker == 1.95 and runs[0].threads_per_worker == 2
    overlapped, capacity = with_overlapped_startup(cfg, runs, 2.0)
    assert capacity == 1  # one run trains at a time ...
    assert overlapped[0].workers.cpus_per_worker == 0.97  # ... but two fit Ray's accounting
    assert overlapped[0].threads_per_worker == 2  # and the one training still uses both cores
    assert overlapped[0].fingerprint == runs[0].fingerprint and overlapped[0].run_name == runs[0].run_name
    assert with_overlapped_startup(cfg, runs[:1], 2.0) == (runs[:1], None)  # nothing to overlap with
    for off in ("train.overlap_startup=false", "train.cpus_per_worker=1.9"):
        other = make_config("train.models=[lenet5, resnet18, vgg11_bn]", "train.overlap_startup=true", off)
        assert with_overlapped_startup(other, runs, 2.0)[1] is None
    # One node: as above. Several: off, since the capacity counts the cluster's CPUs while the thinner
    # reservations let Ray pack a run's workers onto one node at full threads, another node idle at the gate.
    assert with_overlapped_startup(cfg, runs, 2.0, node_cpus=[2.0])[1] == 1
    two_nodes = make_config("train.models=[lenet5, resnet18, vgg11_bn]", "train.overlap_startup=true",
                            "train.num_workers=2")
    runs = plan_model_runs(two_nodes, describe_dataset(two_nodes.data), resolve_models(two_nodes), cluster_cpus=8.0,
                           node_cpus=[4.0, 4.0])
    assert with_overlapped_startup(two_nodes, runs, 8.0)[1] == 1  # what it did: both workers fit one node
    assert with_overlapped_startup(two_nodes, runs, 8.0, node_cpus=[4.0, 4.0]) == (runs, None)


def test_with_a_compute_gate_at_most_one_run_beyond_it_is_admitted():
    """A named max_concurrent_models above the gate's capacity + 1 started runs that waited for CPUs; one took
    those a gate holder freed when its workers restarted (a failure), and everyone waited for good."""
    free = {"CPU": 2.0, "GPU": 0.0}
    assert concurrency_for(3, {"CPU": 0.98, "GPU": 0.0}, 5, free) == 3  # no gate: as asked
    assert concurrency_for(3, {"CPU": 0.98, "GPU": 0.0}, 5, free, gate_capacity=1) == 2
    assert concurrency_for("auto", {"CPU": 0.5, "GPU": 0.0}, 5, free, gate_capacity=2) == 3
    assert concurrency_for(3, {"CPU": 0.98, "GPU": 0.0}, 1, free, gate_capacity=1) == 1


def test_compare_paper_adds_the_paper_family_at_the_searched_phis(make_config, caplog):
    searched = {"alpha": 1.3, "beta": 1.05, "gamma": 1.2}
    cfg = make_config("train.models=[resnet18]", "search.phis=[0, 1.5]", "search.compare_paper=true")
    choices = {c.name: c for c in resolve_models(cfg, searched)}
    # At phi 0 every multiplier is 1: the paper's member would be the searched one's B0, trained twice.
    assert list(choices) == ["resnet18", "efficientnet_phi0", "efficientnet_phi1p5", "efficientnet_paper_phi1p5"]
    paper, mine = choices["efficientnet_paper_phi1p5"], choices["efficientnet_phi1p5"]
    assert paper.arch == mine.arch == "efficientnet"
    assert {k: paper.kwargs[k] for k in ("phi", "alpha", "beta", "gamma")} == \
        {"phi": 1.5, "alpha": 1.2, "beta": 1.1, "gamma": 1.15}
    assert {k: mine.kwargs[k] for k in ("alpha", "beta", "gamma")} == searched
    runs = {r.model_name: r for r in plan_model_runs(cfg, describe_dataset(cfg.data), list(choices.values()))}
    # Distinct Ray Train runs (and so result files, MLflow runs, aliases), and really different networks.
    assert len({r.run_name for r in runs.values()}) == len({r.fingerprint for r in runs.values()}) == 4
    assert runs["efficientnet_paper_phi1p5"].macs != runs["efficientnet_phi1p5"].macs
    # A searched member named in train.models gets the searched triple (it took the paper's, the builder's).
    listed = make_config("train.models=[efficientnet_phi1]", "search.phis=[1]")
    assert [(c.name, {k: c.kwargs[k] for k in searched}) for c in resolve_models(listed, searched)] == \
        [("efficientnet_phi1", searched)]

    off = make_config("train.models=[resnet18]", "search.phis=[0, 1.5]")
    assert [c.name for c in resolve_models(off, searched)] == ["resnet18", "efficientnet_phi0", "efficientnet_phi1p5"]
    assert [c.name for c in resolve_models(cfg, None)] == ["resnet18"]  # no search, no families to compare
    with caplog.at_level(logging.INFO, logger="pipelines"):
        same = resolve_models(cfg, {"alpha": 1.2, "beta": 1.1, "gamma": 1.15})
    assert [c.name for c in same] == ["resnet18", "efficientnet_phi0", "efficientnet_phi1p5"]
    assert "found the paper's (1.2, 1.1, 1.15) itself" in caplog.text


def test_model_options_reach_the_searched_family_and_the_search_baseline(make_config):
    """``train.model_options`` for a family member trained because of ``search.phis``, or for the search's
    baseline ``efficientnet``, were silently dropped (and never validated), while ``model_overrides`` for the
    same names applied."""
    from pipelines.config import ConfigError, load_config
    from pipelines.planning import search_template

    searched = {"alpha": 1.3, "beta": 1.05, "gamma": 1.2}
    cfg = make_config("train.models=[resnet18]", "search.phis=[0, 1]",
                      "train.model_options={efficientnet_phi1: {dropout: 0.5}, efficientnet: "
                      "{stochastic_depth_prob: 0.05}}")
    choices = {c.name: c for c in resolve_models(cfg, searched)}
    assert choices["efficientnet_phi1"].kwargs["dropout"] == 0.5
    assert {k: choices["efficientnet_phi1"].kwargs[k] for k in searched} == searched
    assert "dropout" not in choices["efficientnet_phi0"].kwargs
    template = search_template(cfg)
    assert template.kwargs["stochastic_depth_prob"] == 0.05 and template.kwargs["phi"] == cfg.search.phi
    assert search_fingerprint(cfg) != search_fingerprint(make_config("train.models=[resnet18]", "search.phis=[0, 1]"))
    for options, key in (("{efficientnet_phi1: {dropout: 7}}", "train.model_options.efficientnet_phi1"),
                         ("{efficientnet: {stochastic_depth_prob: 1.5}}", "train.model_options.efficientnet"),
                         # what a member's name fixes: efficientnet_phi1 trained at phi 2, the paper's member with
                         # another alpha (compare_paper then compared the searched family with another one)
                         ("{efficientnet_phi1: {phi: 2.0}}", "train.model_options.efficientnet_phi1"),
                         ("{efficientnet_paper_phi1: {alpha: 1.0}}", "train.model_options.efficientnet_paper_phi1")):
        with pytest.raises(ConfigError) as info:
            load_config(None, ["search.phis=[0, 1]", "search.compare_paper=true", f"train.model_options={options}"])
        assert info.value.key == key
    # the searched family's own coefficients are options its name leaves open
    load_config(None, ["search.phis=[0, 1]", "train.model_options={efficientnet_phi1: {alpha: 1.1}}"])


def test_the_families_take_the_search_baselines_options_and_recipe(make_config):
    """The search found its triple on `efficientnet` with train.model_options.efficientnet and trained it with
    train.model_overrides.efficientnet; the family built from the triple took neither (the builder's defaults,
    train.lr): efficientnet_phi1, at the search's own phi, was not the network the search picked. Their own
    entries still win."""
    from pipelines.config import hyperparameters_for
    from pipelines.planning import search_template

    cfg = make_config("search.phis=[0, 1]", "search.compare_paper=true",
                      "train.model_options={efficientnet: {small_input: false, dropout: 0.5}, "
                      "efficientnet_phi1: {dropout: 0.3}}",
                      "train.model_overrides={efficientnet: {lr: 0.01, weight_decay: 0.0}}")
    choices = {c.name: c for c in resolve_models(cfg, {"alpha": 1.3, "beta": 1.05, "gamma": 1.2})}
    template = search_template(cfg)
    for name in ("efficientnet_phi0", "efficientnet_phi1", "efficientnet_paper_phi1"):
        assert choices[name].kwargs["small_input"] is False, name
        assert hyperparameters_for(cfg.train, name).lr == 0.01 == hyperparameters_for(cfg.train, "efficientnet").lr
    assert choices["efficientnet_phi0"].kwargs["dropout"] == 0.5 == template.kwargs["dropout"]
    assert choices["efficientnet_phi1"].kwargs["dropout"] == 0.3  # its own entry first
    assert choices["efficientnet_phi1"].kwargs["phi"] == 1.0
    assert choices["efficientnet_paper_phi1"].kwargs["alpha"] == 1.2
    # other models take nothing of the baseline's
    b0 = make_config("train.models=[efficientnet_b0]", "train.model_options={efficientnet: {dropout: 0.5}}")
    assert "dropout" not in {c.name: c for c in resolve_models(b0)}["efficientnet_b0"].kwargs
    # Never the baseline's coefficients: a member named in train.models took them over the searched triple.
    named = make_config("train.models=[efficientnet_phi1]", "search.phis=[0]",
                        "train.model_options={efficientnet: {alpha: 1.0, beta: 1.0, gamma: 1.0}}")
    members = {c.name: c for c in resolve_models(named, {"alpha": 1.3, "beta": 1.05, "gamma": 1.2})}
    assert members["efficientnet_phi1"].kwargs["alpha"] == 1.3 == members["efficientnet_phi0"].kwargs["alpha"]
    assert hyperparameters_for(cfg.train, "resnet18").lr == cfg.train.lr


def test_the_stage_reports_only_records_of_this_training(make_config):
    """A record another training left under a model's name (another learning rate, before this one failed) is
    not reported as this stage's result: the table, the report and serving would show the old model as new."""
    from pipelines.results import ModelResult
    from pipelines.train import current_results

    cfg = make_config("train.models=[lenet5, alexnet]")
    runs = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)
    for run, fingerprint in zip(runs, [runs[0].fingerprint, "an-older-lr"], strict=True):
        ModelResult(model_name=run.model_name, arch=run.arch, model_kwargs={}, run_name=run.run_name,
                    fingerprint=fingerprint, input_size=32, params_count=1, macs=1, epochs=run.hyper.epochs,
                    best_val_acc=0.5, best_epoch=0, test_acc=0.5, train_images_per_sec=1.0, train_seconds=1.0,
                    checkpoint_path="").save(cfg.paths.train_dir)
    assert list(current_results(cfg, runs)) == ["lenet5"]
    longer = make_config("train.models=[lenet5, alexnet]", f"train.epochs={cfg.train.epochs + 1}")
    assert current_results(longer, plan_model_runs(longer, describe_dataset(longer.data), resolve_models(longer),
                                                   cluster_cpus=2)) == {}  # the same training, to fewer epochs


def test_a_run_extended_to_more_epochs_says_its_learning_rate_goes_back_up(make_config, caplog):
    """More epochs continue the run from its checkpoint with the cosine schedule spread over the new length: the
    learning rate, near zero at the old end, rises again. Said, not silent: the result differs from a fresh run."""
    from pipelines.results import ModelResult
    from pipelines.train import _split_finished

    settings = ("train.models=[lenet5]", "train.warmup_epochs=1", "train.schedule=cosine")
    cfg = make_config(*settings, "train.epochs=3")
    run = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)[0]
    ModelResult(model_name=run.model_name, arch=run.arch, model_kwargs={}, run_name=run.run_name,
                fingerprint=run.fingerprint, input_size=32, params_count=1, macs=1, epochs=3, best_val_acc=0.5,
                best_epoch=2, test_acc=0.5, train_images_per_sec=1.0, train_seconds=1.0,
                checkpoint_path="").save(cfg.paths.train_dir)
    for epochs, warned in ((5, True), (3, False)):  # (3: finished, skipped)
        longer = make_config(*settings, f"train.epochs={epochs}", workdir=cfg.paths.workdir)
        runs = plan_model_runs(longer, describe_dataset(longer.data), resolve_models(longer), cluster_cpus=2)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipelines"):
            _split_finished(longer, runs)
        assert ("continues to 5 from its checkpoint, with its cosine schedule spread over 5 epochs: the learning "
                "rate goes back up to 50% of train.lr" in caplog.text) == warned


def test_more_workers_than_validation_images_exits_2_before_training(make_config):
    """A worker with no validation image skipped the collective the others waited in at the first evaluation
    (DDP's buffer broadcast), and the run hung; refused when the runs are planned, naming the key."""
    from pipelines.config import ConfigError

    cfg = make_config("data.val_fraction=0.001", "train.num_workers=4", "train.models=[lenet5]")
    assert describe_dataset(cfg.data).sizes["val"] == 2
    with pytest.raises(ConfigError, match=r"train.num_workers: 4 workers, but the val split has 2 image\(s\)"):
        plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)
    assert len(plan_model_runs(make_config("data.val_fraction=0.001", "train.num_workers=2", "train.models=[lenet5]"),
                               describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)) == 1
    # The search never evaluates the test split, but the train stage after it does: a small one was refused only
    # then, after the search's hours. Refused by the search too.
    small_test = make_config("data.test_fraction=0.001", "train.num_workers=4", "train.models=[lenet5]")
    info = describe_dataset(small_test.data)
    for stage in ("train", "search"):
        with pytest.raises(ConfigError, match=r"the test split has 2 image\(s\).*data.test_fraction, or, for an "
                                              r"image folder that comes split, more images in its test folder"):
            plan_model_runs(small_test, info, resolve_models(small_test), stage=stage, cluster_cpus=2)


def test_node_cpus_are_those_free_now(ray_cluster):
    """Shares were sized to each node's total CPUs: with a Serve replica holding one CPU on every node the
    share fitted nowhere, and the run waited for good."""
    import time

    from pipelines.runtime import free_resources, node_cpus

    free_resources()  # (an earlier test's actors may still be handing their CPUs back: a reading taken then is low)
    before = sum(node_cpus())

    @ray_cluster.remote(num_cpus=1)
    class Holder:
        def ping(self) -> int:
            return 1

    holder = Holder.remote()
    try:
        ray_cluster.get(holder.ping.remote())
        deadline = time.monotonic() + 30
        while sum(node_cpus()) > before - 1 + 1e-6 and time.monotonic() < deadline:
            time.sleep(0.2)  # the resource view follows within a heartbeat
        assert sum(node_cpus()) == pytest.approx(before - 1)
    finally:
        ray_cluster.kill(holder)


def test_concurrency_counts_runs_node_by_node(caplog):
    """cluster.yaml's shape: a CPU-only head (8 CPUs) and four g5.xlarge (4 CPUs, 1 GPU). Two workers of 3 CPUs
    each (1 + 2 loader processes) and half a GPU fit each GPU's share but not its node's CPUs: the cluster's
    totals said 7 at once, the nodes hold 4 (the head's CPUs are of no use to a GPU worker)."""
    from pipelines.config import WorkerSettings

    head, gpu_node = {"CPU": 8.0, "GPU": 0.0}, {"CPU": 4.0, "GPU": 1.0}
    nodes = [head] + [gpu_node] * 4
    free = {"CPU": 24.0, "GPU": 4.0}
    gpu_workers = WorkerSettings(use_gpu=True, gpus_per_worker=0.5, cpus_per_worker=3.0)
    need = {"CPU": 3.01, "GPU": 0.5}
    assert concurrency_for("auto", need, 10, free) == 7  # the totals alone
    assert concurrency_for("auto", need, 10, free, workers=gpu_workers, nodes=nodes) == 4
    lighter = WorkerSettings(use_gpu=True, gpus_per_worker=0.5, cpus_per_worker=2.0)
    assert concurrency_for("auto", {"CPU": 2.01, "GPU": 0.5}, 10, free, workers=lighter, nodes=nodes) == 8
    # CPU runs of 7.95 CPUs: only the head holds one, whatever the 24 CPUs in all.
    cpu_workers = WorkerSettings(cpus_per_worker=7.95)
    assert concurrency_for("auto", {"CPU": 7.96, "GPU": 0.0}, 5, free, workers=cpu_workers, nodes=nodes) == 1
    # A run's workers together on one node (STRICT_PACK), or each on another (STRICT_SPREAD).
    three_cpus = [head] + [{"CPU": 3.0, "GPU": 0.0}] * 3
    pack = WorkerSettings(num_workers=2, cpus_per_worker=2.0, placement_strategy="STRICT_PACK")
    assert concurrency_for("auto", {"CPU": 4.01, "GPU": 0.0}, 9, {"CPU": 17.0}, workers=pack, nodes=three_cpus) == 2
    assert concurrency_for("auto", {"CPU": 4.01, "GPU": 0.0}, 9, {"CPU": 17.0}, nodes=three_cpus,
                           workers=pack.model_copy(update={"placement_strategy": "PACK"})) == 3
    spread = WorkerSettings(num_workers=2, cpus_per_worker=2.0, placement_strategy="STRICT_SPREAD")
    big_and_small = [{"CPU": 12.0, "GPU": 0.0}, {"CPU": 4.0, "GPU": 0.0}]  # each run needs a slot on both
    assert concurrency_for("auto", {"CPU": 4.01, "GPU": 0.0}, 9, {"CPU": 16.0}, workers=spread,
                           nodes=big_and_small) == 2
    assert concurrency_for("auto", {"CPU": 4.01, "GPU": 0.0}, 9, {"CPU": 16.0}, nodes=big_and_small,
                           workers=spread.model_copy(update={"placement_strategy": "PACK"})) == 3  # the totals
    assert concurrency_for("auto", {"CPU": 8.01, "GPU": 0.0}, 9, free, nodes=nodes,
                           workers=spread.model_copy(update={"num_workers": 4})) == 2
    # Fits the totals, but no node: said, and the run waits for one (a Serve replica holds a CPU on each).
    busy = [head, {"CPU": 3.0, "GPU": 0.5}, {"CPU": 2.0, "GPU": 1.0}]
    with caplog.at_level(logging.INFO, logger="pipelines"):
        assert concurrency_for("auto", {"CPU": 4.01, "GPU": 0.5}, 3, {"CPU": 13.0, "GPU": 1.5},
                               workers=gpu_workers.model_copy(update={"cpus_per_worker": 4.0}), nodes=busy) == 1
        assert "a run needs 4 CPU, 0.5 GPU on one node" in caplog.text and "3 CPU, 0.5 GPU;" in caplog.text
        caplog.clear()
        # One node with room for both workers, which STRICT_SPREAD puts on two: its shortfall is said as such.
        assert concurrency_for("auto", {"CPU": 4.01, "GPU": 0.0}, 3, {"CPU": 8.0}, workers=spread,
                               nodes=[{"CPU": 8.0, "GPU": 0.0}]) == 1
        assert "a run needs 2 nodes with 2 CPU each (train.placement_strategy STRICT_SPREAD)" in caplog.text
        caplog.clear()
        # A named number above what fits: as asked (an autoscaling cluster adds nodes), and said.
        assert concurrency_for(6, need, 10, free, workers=gpu_workers, nodes=nodes) == 6
        assert "6 runs at a time asked; 4 fit the free resources now" in caplog.text
        caplog.clear()
        assert concurrency_for(3, need, 10, free, workers=gpu_workers, nodes=nodes) == 3
        assert "asked" not in caplog.text


def test_auto_cpus_are_shared_by_the_nodes_when_none_is_free(make_config, caplog):
    """An autoscaling cluster at zero workers (its head without CPUs) has no CPU free when a stage begins: each
    worker got a quarter of a CPU and one thread, every run fitted onto the first node that joined, and the
    autoscaler saw no demand for more. Now sized by the node types it can add."""
    from pipelines.runtime import cpu_sharing_basis

    cfg = make_config()
    head, worker_type = {"GPU": 0.0}, {"CPU": 16.0, "memory": 6e10}
    assert auto_cpus_per_worker(cfg, 0.0, []) == 0.25  # what it did
    with caplog.at_level(logging.INFO, logger="pipelines"):
        cpus, per_node = cpu_sharing_basis(0.0, [], [head, worker_type], 1, "train")
    assert (cpus, per_node) == (16.0, [16.0]) and "no CPUs are free now" in caplog.text
    assert auto_cpus_per_worker(cfg, cpus, per_node) == 15.95
    two = make_config("train.num_workers=2")
    assert auto_cpus_per_worker(two, *cpu_sharing_basis(0.0, [], [head, worker_type], 2, "train")) == 7.97
    # CPUs free: shared as before; no node known with CPUs: nothing better to go by.
    assert cpu_sharing_basis(6.0, [2.0, 4.0], [head, worker_type], 1, "train") == (6.0, [2.0, 4.0])
    assert cpu_sharing_basis(0.0, [], [head], 1, "train") == (0.0, [])


def test_ray_s_worker_lines_carry_no_colour_codes_outside_a_terminal(monkeypatch):
    """Ray prefixes each worker's line with a colour code: in a log file (`ray job logs`, CI) they were raw
    escape sequences."""
    from pipelines.runtime import set_env_defaults

    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    set_env_defaults(console_is_a_terminal=True)
    assert "RAY_COLOR_PREFIX" not in os.environ  # a terminal keeps Ray's colours
    set_env_defaults(console_is_a_terminal=False)
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")  # the user's own choice stays
    set_env_defaults(console_is_a_terminal=False)
    assert os.environ["RAY_COLOR_PREFIX"] == "1"


def test_a_runs_mlflow_params_say_the_layout_its_workers_train_in(make_config):
    """``channels_last`` was logged as the setting: on CPUs only DenseNet, GoogLeNet and EfficientNet train
    channels-last, and the other models' runs said True while their workers trained contiguous."""
    import cnnmodels
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.worker import uses_channels_last

    for use_gpu in ("false", "true"):
        cfg = make_config("train.models=[lenet5, densenet121]", "train.channels_last=true", f"train.use_gpu={use_gpu}",
                          *(["ray.address=auto"] if use_gpu == "true" else []))  # (GPUs on the cluster's nodes)
        runs = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)
        for run in runs:
            model = cnnmodels.create_model(run.arch, num_classes=10, in_chans=1, **run.model.kwargs)
            assert run.mlflow_params()["channels_last"] == uses_channels_last(model, run.workers, use_gpu == "true")
        assert [r.mlflow_params()["channels_last"] for r in runs] == ([False, True] if use_gpu == "false"
                                                                      else [True, True])
