"""``search --force`` after a finished search, end to end on a local Ray of its own (2 CPUs): new trials in a new
Tune experiment (not the finished one restored and re-scored), under a new MLflow parent run, ranked by the
objective of now. A system check, not a CI test, for its time (two searches, about 100 s); the CI suite runs one
Optuna search (tests/test_search.py) and the forced search's naming and refusals without Ray. Run it after
changing how a search is named, restored or forced (pipelines/search.py, pipelines/trials.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.runtime import ray_session
from pipelines.search import describe_search_trial, search_stage
from pipelines.tracking import Tracker
from pipelines.trials import EPOCHS_DONE

pytestmark = pytest.mark.slow


def test_a_forced_search_runs_new_trials_in_a_new_experiment_under_the_objective_of_now(tmp_path):
    cfg = load_config(None, [
        f"workdir={tmp_path}", "name=forced", "ray.address=local", "ray.num_cpus=2", "ray.num_gpus=0",
        "ray.include_dashboard=true",  # Ray Train's placement-group cleanup queries the state API
        "search.mode=optuna", "search.num_trials=2", "search.epochs=1", "search.asha=false",
        "search.alpha=[1.0, 1.4]", "search.beta=[1.0, 1.3]", "search.gamma=[1.0, 1.3]",
        "search.max_concurrent_trials=2", "train.cpus_per_worker=0.95", "data.image_size=16",
        "data.train_subset=200", "train.optimizer=adamw", "train.lr=0.003"])
    with ray_session(cfg):
        result = search_stage(cfg)
        assert len(result.trials) == 2 and cfg.paths.search_result.is_file()
        # Under the MnasNet objective now, with a target below every trial's MACs: a finished search restored and
        # re-scored would report no trial with this target in its config.
        cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"objective": "mnas",
                                                                            "target_macs": 1000})})
        forced = search_stage(cfg, force=True)
    assert not forced.skipped and len(forced.trials) == 2
    reported = {}
    for results in Path(cfg.paths.storage).glob(f"{cfg.name}-search-*/*/result.json"):
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        if rows and rows[0].get("config", {}).get("mnas_target_macs") == 1000:
            reported[results.parent.name] = rows
    assert len(reported) == 2
    by_macs = {t["macs"]: t for t in forced.trials}
    for rows in reported.values():
        macs = describe_search_trial(cfg.search.phi, rows[0]["config"])[2]["macs"]
        assert [r["score"] for r in rows] == pytest.approx([r["val_acc"] * (macs / 1000) ** -0.07 for r in rows])
        assert [r[EPOCHS_DONE] for r in rows] == [r["epoch"] + 1 for r in rows] == [1]
        assert max(r["score"] for r in rows) == pytest.approx(by_macs[macs]["score"])
    experiments = {p.parent.name for p in Path(cfg.paths.storage).glob(f"{cfg.name}-search-*/tuner.pkl")}
    assert len(experiments) == 2, experiments
    tracker = Tracker.for_config(cfg)
    parents = tracker.client.search_runs([tracker.experiment_id],
                                         "tags.stage = 'search' and tags.`cnnzoo.stage_parent` = 'true'")
    assert len(parents) == 2
