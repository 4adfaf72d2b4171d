"""The compound-scaling search: spaces, the family it defines, and the Optuna mode on real Ray Tune."""

from __future__ import annotations

import itertools
import json
import logging
from functools import partial
from pathlib import Path

import pytest
from conftest import write_split_folder
from ray.tune import Callback

from cnnmodels.scaling import constraint_value
from pipelines.config import ConfigError, SearchConfig, load_config
from pipelines.planning import resolve_models, search_fingerprint
from pipelines.search import search_stage
from pipelines.search_space import PAPER, FeasibleRegion, feasible_points, grid_candidates


def test_grid_candidates_are_feasible_capped_and_start_with_the_paper():
    search = SearchConfig(alpha=(1.0, 1.4), beta=(1.0, 1.4), gamma=(1.0, 1.4), step=0.05, num_trials=6)
    candidates = grid_candidates(search)
    assert len(candidates) == 6 and candidates[0] == PAPER
    assert all(abs(constraint_value(*c) - 2.0) <= 0.1 + 1e-9 for c in candidates)
    assert len(set(candidates)) == 6
    everything = feasible_points(search)  # what the log counts the trials against
    assert set(candidates) < set(everything) and PAPER in everything
    assert all(abs(constraint_value(*c) - 2.0) <= 0.1 + 1e-9 for c in everything)


def test_no_two_grid_trials_train_the_same_network(make_config):
    """Depths round up and widths to multiples of 8: of the fashion-mnist preset's 16 grid trials only 14 were
    different networks (1.1 and 1.15 for alpha build the same at phi 1), two slots trained a model twice, and
    Tune's result order broke their tie, choosing the coefficients the family is built from at phi 2."""
    from cnnmodels.efficientnet import compound_architecture
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, search_template
    from pipelines.search import _network_at

    cfg = make_config("data.image_size=28", "search.alpha=[1.0, 1.4]", "search.beta=[1.0, 1.3]",
                      "search.gamma=[1.0, 1.3]", "search.step=0.05", "search.num_trials=16", "search.phi=1")
    template = plan_model_runs(cfg, describe_dataset(cfg.data), [search_template(cfg)], stage="search",
                               cluster_cpus=2)[0]
    network = lambda c: _network_at(template, c)  # noqa: E731
    assert network((1.1, 1.2, 1.1)) == network((1.15, 1.2, 1.1))  # the same at phi 1 ...
    assert compound_architecture(2, 1.1, 1.2, 1.1, 28) != compound_architecture(2, 1.15, 1.2, 1.1, 28)  # not at 2
    assert len({network(c) for c in grid_candidates(cfg.search)}) < 16  # what the plain grid does
    candidates = grid_candidates(cfg.search, network)
    assert len(candidates) == 16 and len({network(c) for c in candidates}) == 16
    assert candidates[0] == PAPER  # the paper's stands for its network
    assert all(abs(constraint_value(*c) - 2.0) <= 0.1 + 1e-9 for c in candidates)


def test_grid_trials_that_train_at_the_smallest_input_count_as_one_network(make_config):
    """At 8 px (the digits' own size) a scaled resolution of 9 or 10 trains at the model's smallest input, 16:
    (1.2, 1.1, 1.15) and (1.1, 1.1, 1.2) were counted as two networks and the same model trained twice."""
    import torch

    import cnnmodels
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, search_template
    from pipelines.search import _network_at

    cfg = make_config("data.image_size=8", "search.num_trials=8")
    template = plan_model_runs(cfg, describe_dataset(cfg.data), [search_template(cfg)], stage="search",
                               cluster_cpus=2)[0]
    assert _network_at(template, (1.2, 1.1, 1.15)) == _network_at(template, (1.1, 1.1, 1.2))
    trained = set()
    for alpha, beta, gamma in grid_candidates(cfg.search, partial(_network_at, template)):
        with torch.device("meta"):
            model = cnnmodels.create_model("efficientnet", num_classes=10, **{
                **template.model.kwargs, "alpha": alpha, "beta": beta, "gamma": gamma})
        trained.add((tuple(tuple(p.shape) for p in model.parameters()), model.input_size_for(8)))
    assert len(trained) == len(grid_candidates(cfg.search, partial(_network_at, template)))


def test_the_grid_plan_hands_tune_one_trial_per_candidate_the_papers_point_among_them(make_config):
    """The grid's plan (search.mode's default) as Tune gets it: one trial per candidate through ``grid_search``,
    no search algorithm. (The suite's end-to-end search is Optuna's; the grid's runs through Tune in the failed-
    search test below.)"""
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, search_template
    from pipelines.search import _plan_trials

    cfg = make_config("search.mode=grid", "search.num_trials=2", "search.step=0.1", "search.alpha=[1.0, 1.4]",
                      "search.beta=[1.0, 1.3]", "search.gamma=[1.0, 1.3]", "data.image_size=16")
    template = plan_model_runs(cfg, describe_dataset(cfg.data), [search_template(cfg)], stage="search",
                               cluster_cpus=2)[0]
    plan = _plan_trials(cfg, template)
    assert plan.search_alg is None and plan.num_samples == 1 and plan.trials == 2 and plan.paper_included
    grid = [(c["alpha"], c["beta"], c["gamma"]) for c in plan.param_space["coefficients"]["grid_search"]]
    assert len(grid) == 2 and PAPER in grid
    assert plan.param_space["run"] == template.to_dict()


def test_the_paper_is_left_out_when_the_constraint_or_the_ranges_exclude_it():
    search = SearchConfig(tolerance=0.05, step=0.05)  # 1.92 is 0.08 away from 2.0
    assert PAPER not in grid_candidates(search)
    narrow = SearchConfig(alpha=(1.0, 1.1), beta=(1.0, 1.4), gamma=(1.0, 1.4), step=0.05)  # alpha 1.2 is outside
    candidates = grid_candidates(narrow)
    assert candidates and PAPER not in candidates and all(1.0 <= a <= 1.1 for a, _, _ in candidates)
    # A grid that misses the constraint everywhere still runs the paper's triple where that meets it.
    only_the_paper = load_config(None, ["search.alpha=[1.15, 1.25]", "search.beta=[1.05, 1.15]",
                                        "search.gamma=[1.12, 1.18]", "search.step=0.1", "search.target=1.92",
                                        "search.tolerance=0.005"])
    assert grid_candidates(only_the_paper.search) == [PAPER]


def test_feasible_region_maps_every_draw_onto_the_constraint():
    """Every draw, rounded to 4 decimals, inside the ranges and the constraint (up to float noise): rounding
    the three at the end used to miss the constraint by up to 1e-4 for about 0.2% of draws."""
    import random

    region = FeasibleRegion.of(SearchConfig(alpha=(1.0, 1.5), beta=(1.0, 1.3), gamma=(1.0, 1.3)))
    draws = random.Random(0)
    points = [*itertools.product([0.0, 0.3, 0.77, 1.0], repeat=3),
              *((draws.random(), draws.random(), draws.random()) for _ in range(5000))]
    for u, v, w in points:
        a, b, g = region.point(u, v, w)
        assert 1.0 <= a <= 1.5 and 1.0 <= b <= 1.3 and 1.0 <= g <= 1.3
        assert abs(constraint_value(a, b, g) - 2.0) <= 0.1 + 1e-12, (u, v, w)
        assert all(round(c, 4) == c for c in (a, b, g))
    uvw = region.inverse(*PAPER)
    assert uvw is not None and region.point(*uvw) == pytest.approx(PAPER, abs=1e-3)


def test_optuna_trials_never_share_a_triple_and_a_search_wanting_more_than_the_region_holds_is_refused():
    """Draws that round to one 4-decimal triple named one Ray Train run: the second trial resumed the first's
    (trained nothing, or went on where ASHA had stopped it). Through Ray's own OptunaSearch, as the search runs
    it, on a region of 6 triples (alpha and beta fixed, a tight tolerance): 6 trials, 6 triples."""
    from ray.tune.search.optuna import OptunaSearch

    from pipelines.search_space import optuna_space

    narrow = ["search.mode=optuna", "search.alpha=[1.2, 1.2]", "search.beta=[1.1, 1.1]", "search.gamma=[1.0, 1.3]",
              "search.tolerance=0.001"]
    cfg = load_config(None, [*narrow, "search.num_trials=6"])
    region = FeasibleRegion.of(cfg.search)
    searcher = OptunaSearch(space=partial(optuna_space, region), metric="score", mode="max", seed=0,
                            points_to_evaluate=[{"u_alpha": 0.0, "u_beta": 0.0, "u_gamma": 0.5}] * 2)
    triples = []
    for i in range(6):
        c = searcher.suggest(f"trial{i}")["coefficients"]
        triples.append((c["alpha"], c["beta"], c["gamma"]))
        searcher.on_trial_complete(f"trial{i}", {"score": 0.5})
    assert len(set(triples)) == 6, triples  # (the two enqueued draws are one point)
    assert all(abs(constraint_value(*t) - 2.0) <= 0.001 + 1e-12 for t in triples)
    with pytest.raises(ConfigError, match="hold fewer different feasible triples") as refused:
        load_config(None, [*narrow, "search.num_trials=7"])
    assert refused.value.key == "search.num_trials"
    # A range with no 4-decimal number in it still holds the unrounded value the draws take.
    load_config(None, ["search.mode=optuna", "search.beta=[1.10004, 1.10004]", "search.num_trials=1"])


def test_optuna_trials_in_windows_too_narrow_for_4_decimals_get_runs_of_their_own():
    """Under a tolerance of 1e-5 a beta's gamma window holds no 4-decimal number: the unrounded gammas of two
    draws differed past the six digits a run's name shows, and the second trial resumed the first's run. Under
    1e-4 the config check counted triples the trials could not reach, and two trials got one triple."""
    import random

    from pipelines.search_space import coefficients_label

    for tolerance, trials in ((1e-5, 3), (1e-5, 8), (1e-4, 11)):
        cfg = SearchConfig(mode="optuna", alpha=(1.2, 1.2), beta=(1.1, 1.101), gamma=(1.0, 1.4),
                           tolerance=tolerance, num_trials=trials)
        region = FeasibleRegion.of(cfg)
        assert region.has_points(trials)
        for seed in range(20):
            draws, taken = random.Random(seed), set()
            for _ in range(trials):
                taken.add(region.free_point(region.point(draws.random(), draws.random(), draws.random()), taken))
            assert len({coefficients_label(*t) for t in taken}) == trials, (tolerance, seed, sorted(taken))
            assert all(abs(constraint_value(*t) - 2.0) <= tolerance + 1e-12 for t in taken)


def test_an_image_folder_search_is_searched_again_once_its_images_are_relabelled(make_config, tmp_path, caplog):
    """Images moved between class folders (the same classes and split sizes) left the finished search reused. A
    search saved before the training files counted is taken once as it is, and tells changes from then on."""
    import numpy as np
    from PIL import Image

    from pipelines.data import describe_dataset, forget_loaded_splits
    from pipelines.planning import data_content, earlier_data_contents, search_data
    from pipelines.search import SearchResult, load_search_result

    root, rng = tmp_path / "images", np.random.default_rng(0)
    for name in ("ant", "bee"):
        (root / name).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / name / f"{i}.png")
    cfg = make_config("data.dataset=imagefolder", f"data.root={root}", "data.image_size=16")

    def contents():
        forget_loaded_splits()
        info = describe_dataset(search_data(cfg))
        return data_content(info), earlier_data_contents(info)

    content, earlier = contents()
    assert content not in earlier
    best = {"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "val_acc": 0.5}
    SearchResult(best=best, trials=[], objective="val_acc", phi=1.0, paper_included=True,
                 fingerprint=search_fingerprint(cfg), data_content=earlier[-1]).save(cfg.paths.search_result)
    assert load_search_result(cfg, content, earlier).coefficients == {"alpha": 1.2, "beta": 1.1, "gamma": 1.15}
    assert json.loads(cfg.paths.search_result.read_text())["data_content"] == content  # saved as it is now
    moved = next(p for p in sorted((root / "ant").iterdir()) if p.name in {"3.png", "4.png", "5.png", "6.png"})
    moved.rename(root / "bee" / f"a{moved.name}")  # relabelled: the same classes and split sizes
    relabelled, relabelled_earlier = contents()
    assert relabelled_earlier[-1] == earlier[-1] and relabelled != content
    with caplog.at_level(logging.INFO, logger="pipelines"):
        assert load_search_result(cfg, relabelled, relabelled_earlier) is None
    assert "changed since the search" in caplog.text


def test_test_images_added_to_a_split_folder_leave_its_search_and_models_as_they_were(make_config, tmp_path):
    """The search's record of an image folder held every split's size and unreadable files: a split folder's
    images added to test/ (which the search never reads) searched again, and an unreadable one left out of test/
    (data.skip_bad_files) changed every model's fingerprint too, so all of them trained again. Now only the
    training and validation splits count; a search saved under the content as it was hashed before is taken once,
    and an interrupted one is resumed."""
    import numpy as np
    from PIL import Image

    from pipelines.data import describe_dataset, forget_loaded_splits
    from pipelines.planning import data_content, earlier_data_contents, plan_model_runs, search_data
    from pipelines.search import SearchResult, load_search_result

    root, rng = tmp_path / "images", np.random.default_rng(0)
    write_split_folder(root, rng)
    cfg = make_config("data.dataset=imagefolder", f"data.root={root}", "data.image_size=16", "train.batch_size=8",
                      "train.models=[lenet5]", "data.skip_bad_files=true")

    def read():
        forget_loaded_splits()  # (the files changed)
        info = describe_dataset(search_data(cfg))
        [run] = plan_model_runs(cfg, info, resolve_models(cfg), cluster_cpus=2)
        return info, run

    info, run = read()
    content = data_content(info)
    best = {"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "val_acc": 0.5}
    SearchResult(best=best, trials=[], objective="val_acc", phi=1.0, paper_included=True,
                 fingerprint=search_fingerprint(cfg), data_content=content).save(cfg.paths.search_result)

    Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / "test" / "bee" / "9.png")
    (root / "test" / "ant" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")  # left out: unreadable
    tested_anew, rerun = read()
    assert tested_anew.excluded_files == tested_anew.test_excluded_files == ("test/ant/cut.png",)
    assert rerun.excluded_files == ("test/ant/cut.png",)  # (the workers still leave it out)
    assert data_content(tested_anew) == content and load_search_result(cfg, content) is not None
    assert rerun.fingerprint == run.fingerprint and rerun.test_split != run.test_split  # tested again, not trained

    # A search saved under the content before test/ was left out (with the split sizes of then) is taken once.
    (root / "test" / "bee" / "9.png").unlink(), (root / "test" / "ant" / "cut.png").unlink()
    info, _ = read()
    [with_test_split, *_] = earlier_data_contents(info)
    assert with_test_split != content
    SearchResult(best=best, trials=[], objective="val_acc", phi=1.0, paper_included=True,
                 fingerprint=search_fingerprint(cfg), data_content=with_test_split).save(cfg.paths.search_result)
    assert load_search_result(cfg, content, earlier_data_contents(info)) is not None
    assert json.loads(cfg.paths.search_result.read_text())["data_content"] == content
    # An interrupted search is resumed only on the same test images too: its trials carry every split's size,
    # which each worker checks (resumed after test/ changed, every retry failed). Its experiment is named as before.
    assert with_test_split == earlier_data_contents(info)[0]
    Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / "test" / "bee" / "9.png")
    grown, _ = read()
    assert data_content(grown) == content and earlier_data_contents(grown)[0] != with_test_split
    (root / "test" / "bee" / "9.png").unlink()

    # Images the search and the models learn from still count: an unreadable training image left out changes both.
    (root / "train" / "ant" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    changed, retrained = read()
    assert changed.test_excluded_files == () and changed.excluded_files == ("train/ant/cut.png",)
    assert data_content(changed) != content and retrained.fingerprint != run.fingerprint


def test_a_search_gpu_share_is_applied_on_gpus_and_said_unused_without_them(make_config, caplog, cuda_devices):
    """``search.gpus_per_trial`` with ``train.use_gpu: false`` (the cifar10-gpu preset tried on a CPU machine):
    the trials ran on CPUs without a word about the setting."""
    cuda_devices(1)
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, search_template
    from pipelines.search import with_search_gpu_share

    def template(cfg):
        return plan_model_runs(cfg, describe_dataset(cfg.data), [search_template(cfg)], stage="search",
                               cluster_cpus=2)[0]

    on_cpus = make_config("search.gpus_per_trial=0.5", "data.image_size=16")
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        assert with_search_gpu_share(on_cpus, template(on_cpus)).workers == template(on_cpus).workers
    assert "search.gpus_per_trial (0.5) is left unused: train.use_gpu is false" in caplog.text
    on_gpus = make_config("search.gpus_per_trial=0.5", "data.image_size=16", "train.use_gpu=true", "ray.num_gpus=1")
    assert with_search_gpu_share(on_gpus, template(on_gpus)).workers.gpus_per_worker == 0.5


def test_found_coefficients_define_the_efficientnet_family(make_config):
    cfg = make_config("train.models=[resnet18]", "search.phis=[0, 1, 2]", "data.image_size=16")
    choices = {c.name: c for c in resolve_models(cfg, {"alpha": 1.3, "beta": 1.1, "gamma": 1.1})}
    assert list(choices) == ["resnet18", "efficientnet_phi0", "efficientnet_phi1", "efficientnet_phi2"]
    member = choices["efficientnet_phi2"]
    assert member.arch == "efficientnet"
    assert member.kwargs == {"phi": 2.0, "alpha": 1.3, "beta": 1.1, "gamma": 1.1, "base_resolution": 16,
                             "small_input": True}
    assert [c.name for c in resolve_models(cfg)] == ["resnet18"]  # no search result: no family


def test_a_resumed_trial_counts_the_epochs_it_reached_not_its_history_rows(make_config):
    """A resumed trial's history repeats the epochs re-run from its checkpoint, or lacks one reported just
    before the interruption; the search table's epochs_trained is the last epoch reached either way."""
    from types import SimpleNamespace

    import pandas as pd

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, search_template
    from pipelines.search import _trial_records

    cfg = make_config("data.image_size=16")
    template = plan_model_runs(cfg, describe_dataset(cfg.data), [search_template(cfg)], stage="search", epochs=3,
                               cluster_cpus=2)[0]
    config = {"coefficients": {"alpha": 1.2, "beta": 1.1, "gamma": 1.15}, "run": template.to_dict()}
    rerun = pd.DataFrame({"epoch": [0, 1, 1, 2], "val_acc": [0.5, 0.6, 0.61, 0.7]})
    lost = pd.DataFrame({"epoch": [0, 2], "val_acc": [0.5, 0.69]})
    grid = [SimpleNamespace(config=config, metrics_dataframe=history, error=None) for history in (rerun, lost)]
    records = _trial_records(grid, phi=cfg.search.phi)
    assert [r["epochs_trained"] for r in records] == [3, 3]
    assert [r["val_acc"] for r in records] == [0.7, 0.69]
    assert [r["val_acc_per_epoch"] for r in records] == [[0.5, 0.61, 0.7], [0.5, None, 0.69]]


def test_asha_compares_a_restarted_trial_at_the_epochs_its_model_reached(monkeypatch):
    """Tune counts a trial's training_iteration from 1 again when it starts the trial again (its Train run
    resumes from a checkpoint at a later epoch): ASHA, on that axis, compared a model's epoch 3 with the others'
    epoch 1 and stopped it. Each result now carries the epochs done, and ASHA goes by them."""
    import queue
    from types import SimpleNamespace

    import ray.tune.integration.ray_train as tune_train
    from ray.tune.schedulers import TrialScheduler

    from pipelines.search import asha_scheduler
    from pipelines.trials import EPOCHS_DONE, tune_report_callback

    sent = queue.Queue()
    monkeypatch.setattr(tune_train, "_in_tune_session", lambda: True)
    session = SimpleNamespace(_get_or_create_inter_actor_queue=lambda: sent)
    monkeypatch.setattr(tune_train, "get_session", lambda: session)
    tune_report_callback().after_report(None, [{"epoch": 2, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.4}], None)
    assert sent.get_nowait() == {"epoch": 2, "val_acc": 0.5, EPOCHS_DONE: 3, "score": 0.5}
    # Under search.objective mnas the trial's MACs factor scales what Tune's searcher and ASHA compare.
    tune_report_callback(0.9).after_report(None, [{"epoch": 2, "val_acc": 0.5}], None)
    assert sent.get_nowait()["score"] == pytest.approx(0.45)

    scheduler = asha_scheduler(SearchConfig(epochs=4, grace_period=1, reduction_factor=2))
    scheduler.set_search_properties("val_acc", "max")
    fresh, other, restarted = (SimpleNamespace(trial_id=name) for name in ("fresh", "other", "restarted"))
    for trial in (fresh, other, restarted):
        scheduler.on_trial_add(None, trial)
    for trial, val_acc in ((fresh, 0.90), (other, 0.80)):
        scheduler.on_trial_result(None, trial, {"training_iteration": 1, EPOCHS_DONE: 1, "val_acc": val_acc})
    # Its epoch 3, below the others' epoch 1 median, is the first result of its new start:
    result = {"training_iteration": 1, EPOCHS_DONE: 3, "val_acc": 0.84}
    assert scheduler.on_trial_result(None, restarted, result) == TrialScheduler.CONTINUE


def test_going_back_to_settings_searched_with_force_resumes_their_forced_experiment(make_config, monkeypatch):
    """experiment.json named one forced experiment: forcing settings B, then A, then running B again resumed B's
    unforced experiment (the results forced away from) or started B afresh, the forced one's progress lost."""
    import pipelines.search as search
    from pipelines.search import _begin_forced_search, _experiment_name

    cfg = make_config()
    monkeypatch.setattr(search.time, "strftime", lambda fmt: "20261202-180000")
    forced_b = _experiment_name(cfg, "bbbb", force=True)
    _begin_forced_search(cfg, "bbbb", forced_b)
    monkeypatch.setattr(search.time, "strftime", lambda fmt: "20261202-190000")
    forced_a = _experiment_name(cfg, "aaaa", force=True)
    _begin_forced_search(cfg, "aaaa", forced_a)
    assert _experiment_name(cfg, "bbbb", force=False) == forced_b == f"{cfg.name}-search-bbbb-20261202-180000"
    assert _experiment_name(cfg, "aaaa", force=False) == forced_a
    assert _experiment_name(cfg, "cccc", force=False) == f"{cfg.name}-search-cccc"
    # A marker an earlier version wrote (one experiment) is read, and kept when another is forced
    marker = cfg.paths.search_result.with_name("experiment.json")
    marker.write_text(json.dumps({"fingerprint": "bbbb", "experiment": "older-forced-b"}))
    _begin_forced_search(cfg, "aaaa", forced_a)
    assert _experiment_name(cfg, "bbbb", force=False) == "older-forced-b"
    assert _experiment_name(cfg, "aaaa", force=False) == forced_a


def test_a_search_marker_cut_short_resumes_the_default_experiment(make_config, caplog):
    """An experiment.json left empty by a crash or a full disk stopped every later search with a JSONDecodeError;
    the marker and best.json are now written through a temporary file, and a damaged marker is named and passed
    over."""
    from pipelines.paths import write_text_atomically
    from pipelines.search import _begin_forced_search, _experiment_name

    cfg = make_config()
    marker = cfg.paths.search_result.with_name("experiment.json")
    forced = _experiment_name(cfg, "abc", force=True)
    _begin_forced_search(cfg, "abc", forced)
    assert _experiment_name(cfg, "abc", force=False) == forced
    marker.write_text("")
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        assert _experiment_name(cfg, "abc", force=False) == f"{cfg.name}-search-abc"
    assert "experiment.json is damaged" in caplog.text
    write_text_atomically(marker, "kept")
    with pytest.raises(UnicodeEncodeError):  # fails mid-write: Path.write_text would have emptied the marker first
        write_text_atomically(marker, "x" * 100 + "\udc80")
    assert marker.read_text() == "kept" and [p.name for p in marker.parent.iterdir()] == ["experiment.json"]


def test_the_paper_stopped_early_by_asha_is_compared_at_its_own_epochs(make_config, caplog):
    """On an H200 the Fashion-MNIST preset's search said the best "beats the paper's (1.2, 1.1, 1.15) at
    0.8652": the best's 4 epochs against the paper's 1, which ASHA had stopped."""
    from types import SimpleNamespace

    import pandas as pd

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, search_template
    from pipelines.search import _best, _log_search_table, _score, _trial_records

    cfg = make_config("data.image_size=16")
    template = plan_model_runs(cfg, describe_dataset(cfg.data), [search_template(cfg)], stage="search", epochs=4,
                               cluster_cpus=2)[0]

    def trial(alpha, beta, gamma, accs):
        config = {"coefficients": {"alpha": alpha, "beta": beta, "gamma": gamma}, "run": template.to_dict()}
        history = pd.DataFrame({"epoch": range(len(accs)), "val_acc": accs})
        return SimpleNamespace(config=config, error=None, metrics_dataframe=history)

    records = _trial_records([trial(1.0, 1.2, 1.2, [0.8702, 0.9010, 0.9205, 0.9318]),
                              trial(1.2, 1.1, 1.15, [0.8652])], phi=cfg.search.phi)
    _score(records, cfg, template)
    with caplog.at_level(logging.INFO, logger="pipelines"):
        _log_search_table(records, _best(records, trials=2))
    assert "stopped by ASHA after 1 epoch(s), had val_acc 0.8652 by then against 0.8702 for the best" in caplog.text
    assert "beats" not in caplog.text and "was stopped" not in caplog.text

    # The mirror case: the best peaked at an epoch ASHA then stopped it after, the paper's trained on. It said
    # "beats the paper's", comparing 2 epochs against 3, and nothing else.
    caplog.clear()
    records = _trial_records([trial(1.0, 1.2, 1.2, [0.85, 0.70]), trial(1.2, 1.1, 1.15, [0.80, 0.82, 0.83])],
                             phi=cfg.search.phi)
    _score(records, cfg, template)
    with caplog.at_level(logging.INFO, logger="pipelines"):
        _log_search_table(records, _best(records, trials=2))
    assert "the best triple (1.0, 1.2, 1.2) trained 2 epoch(s) and was stopped, while 1 other trial(s) trained up " \
           "to 3" in caplog.text
    assert ("stopped after 2 epoch(s); the paper's (1.2, 1.1, 1.15) had 0.8200 by then and reached 0.8300 in 3"
            in caplog.text) and "beats" not in caplog.text

def test_a_failed_trial_never_wins_and_a_tie_goes_to_the_smaller_model(make_config, caplog):
    """A trial that failed after reporting ranks below every finished one, whatever its val_acc (its triple
    would found the family); on equal scores the smaller model wins, and the log says tie, not "beats"."""
    from types import SimpleNamespace

    import pandas as pd

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, search_template
    from pipelines.search import _best, _log_search_table, _score, _trial_records, _unreported_trials

    cfg = make_config("data.image_size=16")
    template = plan_model_runs(cfg, describe_dataset(cfg.data), [search_template(cfg)], stage="search", epochs=2,
                               cluster_cpus=2)[0]

    def trial(alpha, beta, gamma, val_acc, error=None):
        config = {"coefficients": {"alpha": alpha, "beta": beta, "gamma": gamma}, "run": template.to_dict()}
        return SimpleNamespace(config=config, error=error,
                               metrics_dataframe=pd.DataFrame({"epoch": [0, 1], "val_acc": [0.5, val_acc]}))

    failed = trial(1.4, 1.1, 1.1, 0.99, error=RuntimeError("worker OOM"))
    paper, smaller = trial(1.2, 1.1, 1.15, 0.9), trial(1.0, 1.1, 1.2, 0.9)
    never_reported = SimpleNamespace(config=trial(1.0, 1.4, 1.0, 0).config, error=RuntimeError("died"),
                                     metrics_dataframe=None)
    grid = [failed, paper, never_reported, smaller]
    records, unreported = _trial_records(grid, phi=cfg.search.phi), _unreported_trials(grid)
    _score(records, cfg, template)
    with caplog.at_level(logging.INFO, logger="pipelines"):
        best = _best(records, trials=4, unreported=unreported)
        _log_search_table(records, best, unreported)
    assert records[1]["macs"] > records[0]["macs"]  # the paper's triple is the larger of the tied two
    assert (best["alpha"], best["beta"], best["gamma"]) == (1.0, 1.1, 1.2)
    assert records[-1]["error"] is not None and records[-1]["val_acc"] == 0.99
    # The trial left out is named, with its error (it was only counted).
    assert "1 of 4 trial(s) reported no epoch" in caplog.text and "(1.0, 1.4, 1.0): died" in caplog.text
    assert "worker OOM" in caplog.text
    assert "ties with the paper's" in caplog.text and "beats" not in caplog.text
    with pytest.raises(RuntimeError, match="without a trial that reported val_acc and did not fail.*worker OOM"):
        _best([r for r in records if r["error"]], trials=1)
    with pytest.raises(RuntimeError, match="did not fail; the first error: died"):  # none reported: said why
        _best([], trials=1, unreported=unreported)
    # The paper's triple failing before its first epoch is said on the last line, not left out of it.
    lost_paper = SimpleNamespace(config=paper.config, error=RuntimeError("CUDA out of memory\ntraceback"),
                                 metrics_dataframe=None)
    grid = [lost_paper, smaller]
    records, unreported = _trial_records(grid, phi=cfg.search.phi), _unreported_trials(grid)
    _score(records, cfg, template)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines"):
        _log_search_table(records, _best(records, trials=2, unreported=unreported), unreported)
    assert "the paper's (1.2, 1.1, 1.15) reported no epoch (CUDA out of memory), so it is not compared" in caplog.text
    # One whose only epoch diverged is said to have (it read "no error recorded", and counted as failed).
    diverged = SimpleNamespace(config=trial(1.0, 1.3, 1.05, 0).config, error=None, metrics_dataframe=pd.DataFrame(
        {"epoch": [0], "val_acc": [float("nan")], "diverged": [True]}))
    assert _unreported_trials([diverged])[0]["diverged_at"] == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines"):
        _best(records, trials=3, unreported=_unreported_trials([diverged]))
    assert "(1.0, 1.3, 1.05): diverged at epoch 1" in caplog.text


def test_triples_that_build_the_same_network_rank_alike_in_any_result_order(make_config):
    """Optuna may draw two triples that build the same network at search.phi: equal scores, epochs and MACs,
    so Tune's result order chose which founds the family (they differ at the other phis). The paper's triple
    first, else the one nearest the constraint's target."""
    from types import SimpleNamespace

    import pandas as pd

    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, search_template
    from pipelines.search import _network_at, _score, _trial_records

    cfg = make_config("data.image_size=16")
    template = plan_model_runs(cfg, describe_dataset(cfg.data), [search_template(cfg)], stage="search", epochs=2,
                               cluster_cpus=2)[0]

    def trial(triple):
        config = {"coefficients": dict(zip(("alpha", "beta", "gamma"), triple, strict=True)),
                  "run": template.to_dict()}
        return SimpleNamespace(config=config, error=None,
                               metrics_dataframe=pd.DataFrame({"epoch": [0, 1], "val_acc": [0.5, 0.9]}))

    near, far = (1.1889, 1.0302, 1.2544), (1.1792, 1.0241, 1.2589)  # the same network at phi 1
    assert _network_at(template, near) == _network_at(template, far)
    for pair in ([near, far], [far, near]):
        records = _trial_records([trial(t) for t in pair], phi=cfg.search.phi)
        _score(records, cfg, template)
        assert records[0]["macs"] == records[1]["macs"] and records[0]["score"] == records[1]["score"]
        assert (records[0]["alpha"], records[0]["beta"], records[0]["gamma"]) == near, pair  # 1.985 against 1.960
        records[1]["paper"] = True  # (as if the farther one were the paper's triple)
        _score(records, cfg, template)
        assert records[0]["paper"], pair


def test_a_refused_forced_search_keeps_the_finished_one(ray_cluster, make_config):
    """`search --force` deleted the finished result and named its new experiment before the stage's checks: one
    refused at its start (here writes pending for another store; an MLflow outage, too few validation images)
    left no finished search, the train stage dropped the EfficientNet family, and the next plain `search` trained
    every trial again in the new experiment."""
    from pipelines.config import ConfigError
    from pipelines.search import _experiment_name
    from pipelines.tracking_queue import PENDING_FILE

    cfg = make_config("search.epochs=1")
    fingerprint = search_fingerprint(cfg)
    marker = cfg.paths.search_result.with_name("experiment.json")
    cfg.paths.search_result.parent.mkdir(parents=True)
    cfg.paths.search_result.write_text('{"finished": true}')
    marker.write_text(json.dumps({"fingerprint": fingerprint, "experiment": f"{cfg.name}-search-{fingerprint}"}))
    (cfg.paths.run_dir / PENDING_FILE).write_text(json.dumps({"tracking_uri": "sqlite:////elsewhere/mlflow.db",
                                                              "ops": []}))
    with pytest.raises(ConfigError, match="another tracking store"):
        search_stage(cfg, force=True)
    assert cfg.paths.search_result.read_text() == '{"finished": true}'
    assert _experiment_name(cfg, fingerprint, force=False) == f"{cfg.name}-search-{fingerprint}"


def test_a_finished_search_with_failed_trials_says_so_when_reused(make_config, caplog):
    """A search whose trials failed is kept as finished (a re-run reuses it, the failed triples not run again):
    said on the "already done" line, with how to run them; the trials that reported no epoch are kept in it."""
    from pipelines.search import SearchResult

    cfg = make_config()
    best = {"alpha": 1.0, "beta": 1.1, "gamma": 1.2, "val_acc": 0.9, "error": None}
    failed = {"alpha": 1.4, "beta": 1.1, "gamma": 1.1, "val_acc": 0.5, "error": "worker OOM"}
    lost = {"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "error": "died", "paper": True}
    SearchResult(best=best, trials=[best, failed], objective="val_acc", phi=1.0, paper_included=True,
                 fingerprint=search_fingerprint(cfg), unreported=[lost]).save(cfg.paths.search_result)
    with caplog.at_level(logging.INFO, logger="pipelines"):
        again = search_stage(cfg)
    assert again.skipped and again.unreported == [lost]
    assert "2 of its trials failed and are not run again (`search --force` runs every trial again)" in caplog.text


class SeenTrials(Callback):
    """A Tune callback that notes the trials it sees start (module level: Tune pickles it with the experiment)."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started.append(trial.trial_id)


def test_a_restored_search_trial_runs_where_the_resuming_command_placed_it(make_config):
    """Tune's restore brings back the interrupted command's trial configs: their CPU shares (sized to the cluster
    of then), data cache and compute gate (both gone with that command). The resuming command's placement
    replaces them; what the run trains, and another run's config, are left as they are."""
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, search_template
    from pipelines.trials import trial_run

    cfg = make_config()
    template = plan_model_runs(cfg, describe_dataset(cfg.data), [search_template(cfg)], stage="search",
                               cluster_cpus=2)[0].model_copy(update={"run_name": "exp-search-abc"})
    interrupted = template.model_copy(update={
        "workers": template.workers.model_copy(update={"cpus_per_worker": 8.0}), "threads": 8,
        "shared_data": "cnnzoo-splits-old", "compute_gate": "cnnzoo-gate-old"})
    resuming = template.model_copy(update={
        "workers": template.workers.model_copy(update={"cpus_per_worker": 1.0}), "threads": 2,
        "shared_data": "cnnzoo-splits-new", "compute_gate": "cnnzoo-gate-new"})
    config = {"run": interrupted.to_dict(), "coefficients": {"alpha": 1.2, "beta": 1.1, "gamma": 1.15}}
    run = trial_run(config, resuming.to_dict())
    assert (run.workers.cpus_per_worker, run.threads, run.shared_data, run.compute_gate) == \
        (1.0, 2, "cnnzoo-splits-new", "cnnzoo-gate-new")
    assert run.run_name == "exp-search-abc-a1.2_b1.1_g1.15" and run.model.kwargs["alpha"] == 1.2
    assert run.fingerprint == trial_run(config).fingerprint
    elsewhere = resuming.model_copy(update={"run_name": "another-search"}).to_dict()
    assert trial_run(config, elsewhere).compute_gate == "cnnzoo-gate-old"


@pytest.mark.slow
def test_a_restored_experiment_reports_to_this_process_callbacks(ray_cluster, tmp_path):
    """An interrupted search resumes through Tune's restore, which brings back the callbacks pickled with the
    experiment (the old process's tracking queue, never flushed here); this process's must get the trials."""
    from ray import tune

    from pipelines.trials import restore_tuner

    def fails_until_marked(config, placement=""):  # defined here: Ray ships it by value (the tests are not on the
        if not Path(config["marker"]).exists():  # workers' path)
            raise RuntimeError("the first attempt fails")
        tune.report({"val_acc": 1.0, "placement": placement})

    def trainable(placement):
        return tune.with_resources(tune.with_parameters(fails_until_marked, placement=placement), {"cpu": 0.1})

    first = SeenTrials()
    tune.Tuner(trainable("interrupted"), param_space={"marker": str(tmp_path / "marked")},
               run_config=tune.RunConfig(name="flaky", storage_path=str(tmp_path), callbacks=[first], verbose=0)).fit()
    assert len(first.started) == 1
    (tmp_path / "marked").touch()
    second = SeenTrials()
    grid = restore_tuner(str(tmp_path / "flaky"), trainable("resuming"), [second]).fit()
    assert grid[0].error is None and grid[0].metrics["val_acc"] == 1.0  # the errored trial ran again
    assert second.started == first.started  # ... and this process's callback saw it
    # ... with the resuming command's parameters (the search's placement, see trial_run), not the pickled ones
    assert grid[0].metrics["placement"] == "resuming"


@pytest.mark.slow
def test_a_failed_search_leaves_the_other_models_to_train_and_run_exits_with_1(ray_cluster, make_config, caplog):
    """Every trial failing (here each diverges in its first epoch) ended `run` before any of train.models trained,
    though they need no search. They train; the family is left out; the result is a failure (exit 1)."""
    from pipelines.pipeline import run_pipeline

    cfg = make_config("train.models=[lenet5]", "train.epochs=1", "data.image_size=16", "data.train_subset=200",
                      "search.num_trials=1", "search.epochs=1", "search.asha=false", "search.phis=[0]",
                      "search.train_subset=64", "train.cpus_per_worker=0.95", "train.max_failures=0",
                      "train.trial_retries=0",  # (4 steps of 16 images at lr 1e8: NaN weights, a short epoch)
                      "train.model_overrides={efficientnet: {optimizer: sgd, lr: 1.0e+8, batch_size: 16}}")
    with caplog.at_level(logging.INFO, logger="pipelines"):
        result = run_pipeline(cfg, ["search", "train"])
    assert result.stages == {"search": "failed", "train": "ran"} and not result.ok
    assert result.train.trained == ["lenet5"] and not cfg.paths.search_result.exists()
    assert "the search failed" in caplog.text and "training train.models without the EfficientNet family" in caplog.text


def test_run_with_writes_pending_says_which_asked_stages_wait_and_prints_the_table(make_config, monkeypatch, caplog):
    """MLflow not having taken every write, `run` said "report and serve skipped" for --stages train alone, and
    printed no results table at all (the train stage leaves it to the report, which was skipped)."""
    import pandas as pd

    import pipelines.train as train
    from pipelines.pipeline import run_pipeline

    table = pd.DataFrame([{"model": "lenet5", "test_acc": 0.9, "champion": False}])
    result = train.TrainStageResult(results={}, failed=[], skipped=[], trained=["lenet5"], champion=None,
                                    table=table, pending=3)
    monkeypatch.setattr(train, "train_stage", lambda cfg, coefficients, show_table=True: result)
    cfg = make_config("search.phis=[]")
    with caplog.at_level(logging.INFO, logger="pipelines"):
        run_pipeline(cfg, ["train"])
    assert "skipped: MLflow has not taken" not in caplog.text
    with caplog.at_level(logging.INFO, logger="pipelines"):
        out = run_pipeline(cfg, ["train", "report"])
    assert out.stages == {"train": "ran", "report": "skipped"}
    assert "[pipeline] report skipped: MLflow has not taken every registration yet" in caplog.text
    assert "lenet5" in caplog.text.split("report skipped")[1]  # the table, printed once the report is skipped


class _EarlyReturnedGrid(list):
    """Tune's result grid as it returns early, interrupted: its trials neither finished nor failed."""

    num_terminated = num_errors = 0


def test_a_search_tune_returned_from_without_ending_its_trials_is_an_interruption(ray_cluster, make_config,
                                                                                  monkeypatch):
    """Where Tune handles a Ctrl-C itself (TUNE_DISABLE_SIGINT_HANDLER=0, a notebook) or a SIGUSR1, it leaves its
    loop and returns normally, the running trials without errors: the search saved its best so far as finished,
    reused it as "already done" by every later command, and exited 0. (run_model_trials stands in for Tune's early
    return here.)"""
    import pipelines.search as search
    from pipelines.tracking import Tracker

    cfg = make_config("search.epochs=1")
    monkeypatch.setattr(search, "run_model_trials", lambda *args, **kwargs: _EarlyReturnedGrid())
    with pytest.raises(KeyboardInterrupt, match="the search was interrupted: 0 of its"):
        search_stage(cfg)
    assert not cfg.paths.search_result.exists()
    tracker = Tracker.for_config(cfg)
    experiments = [e.experiment_id for e in tracker.client.search_experiments()]
    [run] = tracker.client.search_runs(experiments, "attributes.run_name LIKE 'search-%'")
    assert run.info.status == "KILLED"


def test_an_error_after_the_trials_ends_the_searchs_run_and_keeps_its_writes(ray_cluster, make_config, monkeypatch):
    """An error or Ctrl-C once Tune had returned (reading the trials' results, saving the search's record: a full
    disk) left the search's MLflow run RUNNING for good and dropped the writes still queued (a daemon writer)."""
    import pipelines.search as search
    from pipelines.tracking import Tracker

    cfg = make_config("search.epochs=1")
    monkeypatch.setattr(search, "run_model_trials", lambda *args, **kwargs: [])  # (no trial trained here)

    def disk_full(grid, phi):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(search, "_trial_records", disk_full)
    with pytest.raises(OSError, match="No space left"):
        search_stage(cfg)
    tracker = Tracker.for_config(cfg)
    experiments = [e.experiment_id for e in tracker.client.search_experiments()]
    [run] = tracker.client.search_runs(experiments, "attributes.run_name LIKE 'search-%'")
    assert run.info.status == "FAILED"
