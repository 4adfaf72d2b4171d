"""``run``: every stage end to end, idempotent re-runs and the report."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from cnnmodels.scaling import constraint_value
from pipelines.tracking import Tracker

pytestmark = pytest.mark.slow


def test_every_stage_runs_and_the_champion_answers_over_http(pipeline_run):
    cfg, result = pipeline_run
    assert result.ok and result.stages == {"search": "ran", "train": "ran", "report": "ran", "serve": "ran"}
    assert set(result.train.results) == {"lenet5", "resnet18"}
    assert result.train.champion in result.train.results
    image = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(image, format="PNG")
    response = requests.post(f"{result.serve.url}/predict", data=image.getvalue(),
                             headers={"Content-Type": "image/png"}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == result.train.champion and body["requested"] == "champion"
    assert len(body["predictions"]) == 5
    assert result.seconds_to_serving is not None
    # The example printed for the user: a real test image of the data set, named after its class.
    sample = result.serve.sample_image
    assert sample is not None and sample.is_file()
    response = requests.post(f"{result.serve.url}/predict", data=sample.read_bytes(),
                             headers={"Content-Type": "image/png"}, timeout=60)
    from pipelines.data import load_splits

    splits = load_splits(cfg.data)
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] in splits.class_names
    assert sample.name == f"sample-digits-{splits.class_names[int(splits.test.labels[0])]}.png"


def test_search_trials_respect_the_constraint_and_include_the_paper(pipeline_run):
    cfg, result = pipeline_run
    search = result.search
    assert len(search.trials) == 2
    for trial in search.trials:  # (Optuna's coefficients are rounded: a product of 2.0195 within 0.1 + 1e-3)
        assert abs(constraint_value(trial["alpha"], trial["beta"], trial["gamma"]) - 2.0) <= 0.1 + 1e-3
        assert trial["epochs_trained"] == 1
    # Enqueued as Optuna's first point.
    assert any(t["paper"] and (t["alpha"], t["beta"], t["gamma"]) == (1.2, 1.1, 1.15) for t in search.trials)
    best = json.loads(cfg.paths.search_result.read_text())
    assert best["best"]["score"] == max(t["score"] for t in best["trials"])  # ranked by the objective
    assert {"alpha", "beta", "gamma", "val_acc", "score", "params_count", "macs"} <= set(best["best"])


def test_optuna_and_asha_follow_the_objectives_score_through_tunes_own_reports(pipeline_run):
    """Under the MnasNet objective Optuna and ASHA follow the score the winner is ranked by (they followed
    val_acc, whatever the objective): what each trial reported to Tune, read from Tune's own result files."""
    from pathlib import Path

    from pipelines.search import describe_search_trial
    from pipelines.trials import EPOCHS_DONE

    cfg, result = pipeline_run
    reported = {}
    for results in Path(cfg.paths.storage).glob(f"{cfg.name}-search-*/*/result.json"):
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        reported[results.parent.name] = rows
    assert len(reported) == 2
    by_macs = {t["macs"]: t for t in result.search.trials}
    for rows in reported.values():
        assert rows[0]["config"]["mnas_target_macs"] == 1000
        macs = describe_search_trial(cfg.search.phi, rows[0]["config"])[2]["macs"]
        assert [r["score"] for r in rows] == pytest.approx([r["val_acc"] * (macs / 1000) ** -0.07 for r in rows])
        # What ASHA compares trials by, through Tune's own session: the epochs the model has reached.
        assert [r[EPOCHS_DONE] for r in rows] == [r["epoch"] + 1 for r in rows] == [1]
        assert max(r["score"] for r in rows) == pytest.approx(by_macs[macs]["score"])


def test_search_is_tracked_as_a_parent_with_a_child_per_trial(pipeline_run, tmp_path):
    cfg, result = pipeline_run
    tracker = Tracker.for_config(cfg)
    parents = tracker.client.search_runs([tracker.experiment_id],
                                         "tags.stage = 'search' and tags.`cnnzoo.stage_parent` = 'true'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert float(parent.data.params["best_alpha"]) == result.search.best["alpha"]
    logged = tracker.client.download_artifacts(parent.info.run_id, "best.json", str(tmp_path))
    assert open(logged).read() == cfg.paths.search_result.read_text()  # the search's result, as it was written
    children = tracker.client.search_runs([tracker.experiment_id],
                                          f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2
    for child in children:
        assert child.data.tags["stage"] == "search"
        # The coefficients and every training setting, as a training run's (the train stage's keys), and the
        # images it trained on (search.train_subset): a search trial compares with trained models on them.
        for key in ("alpha", "beta", "gamma", "phi", "compound_product", "params_count", "macs", "lr", "optimizer",
                    "batch_size", "epochs", "augment", "model_kwargs", "train_images"):
            assert key in child.data.params, key
        steps = tracker.client.get_metric_history(child.info.run_id, "val_acc")
        assert [m.step for m in steps] == [0]
        # What the search ranked it by, per epoch and at its best (MLflow showed only the last epoch's val_acc).
        assert [m.step for m in tracker.client.get_metric_history(child.info.run_id, "score")] == [0]
        assert child.data.metrics["best_val_acc"] == pytest.approx(steps[0].value)
        assert child.data.metrics["best_score"] == pytest.approx(child.data.metrics["score"])
    from pipelines.data import describe_dataset
    from pipelines.planning import search_data

    searched_on = describe_dataset(search_data(cfg)).sizes["train"]
    assert [int(c.data.params["train_images"]) for c in children] == [searched_on] * 2


def test_report_has_the_table_and_plots(pipeline_run):
    cfg, result = pipeline_run
    directory = cfg.paths.report_dir
    for name in ("models.csv", "models.md", "accuracy_vs_macs.png", "accuracy_vs_params.png", "val_curves.png",
                 "search.png"):
        assert (directory / name).is_file(), name
    import pandas as pd

    table = pd.read_csv(directory / "models.csv")
    assert len(table) == 2
    for column in ("arch", "params", "MMACs", "best val_acc", "test_acc", "train img/s", "train s", "serve ms"):
        assert column in table.columns
    assert (table["serve ms"] > 0).all()
    tracker = Tracker.for_config(cfg)
    parent = tracker.find_run("tags.stage = 'train' and tags.`cnnzoo.stage_parent` = 'true'")
    logged = {a.path for a in tracker.client.list_artifacts(parent.info.run_id, "report")}
    assert "report/accuracy_vs_macs.png" in logged and "report/models.csv" in logged


def test_a_second_run_skips_finished_stages(pipeline_run):
    from pipelines.pipeline import run_pipeline

    cfg, first = pipeline_run
    again = run_pipeline(cfg, ["search", "train", "report"])
    assert again.stages["search"] == "skipped" and again.stages["train"] == "skipped"
    assert sorted(again.train.skipped) == sorted(first.train.results)
    assert again.train.trained == []
    assert again.search.best == first.search.best
    tracker = Tracker.for_config(cfg)  # a skipped search opens no second parent run
    assert len(tracker.client.search_runs([tracker.experiment_id], "tags.stage = 'search' and "
                                          "tags.`cnnzoo.stage_parent` = 'true'")) == 1
    # the report is written again, from the same records
    assert again.stages["report"] == "ran"
    assert sorted(again.report.table["model"]) == sorted(first.report.table["model"])


def test_serving_again_with_other_http_options_or_unknown_models_is_refused_and_leaves_the_app_up(pipeline_run):
    """Serve's proxy keeps the HTTP options it started with: another serve.port was ignored without a word (the
    printed URL dead), as was a serve.models alias that does not exist ("train first")."""
    from pipelines.config import ConfigError
    from pipelines.serve import serve_stage

    cfg, result = pipeline_run
    moved = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"port": cfg.serve.port + 1})})
    with pytest.raises(ConfigError, match="serve.port: Serve already runs on this Ray with other HTTP options"):
        serve_stage(moved)
    unknown = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"models": ["resnet181"]})})
    with pytest.raises(ConfigError, match="serve.models: resnet181: not in the registry"):
        serve_stage(unknown)
    assert requests.get(f"{result.serve.url}/healthz", timeout=30).status_code == 200
