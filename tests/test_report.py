"""The report from finished models' result records, without Ray: the searched EfficientNet family against the
paper's (``search.compare_paper``)."""

from __future__ import annotations

import logging

import matplotlib.colors
import pandas as pd
import pytest

from pipelines.report import accuracy_figure, family_comparison, report_stage, stale_members, val_curves_figure
from pipelines.results import ModelResult, comparison_table, load_results

SEARCHED = {"alpha": 1.3, "beta": 1.05, "gamma": 1.2}
PAPER = {"alpha": 1.2, "beta": 1.1, "gamma": 1.15}


def record(name: str, arch: str, kwargs: dict, macs: int, test_acc: float) -> ModelResult:
    return ModelResult(model_name=name, arch=arch, model_kwargs=kwargs, run_name=f"test-train-{name}-0",
                       fingerprint="0", input_size=32, params_count=macs // 10, macs=macs, epochs=1,
                       best_val_acc=test_acc, best_epoch=0, test_acc=test_acc, train_images_per_sec=100.0,
                       train_seconds=10.0, checkpoint_path="", history=[{"epoch": 0, "val_acc": test_acc}])


def test_the_report_sets_the_searched_family_against_the_papers_and_marks_the_winner(make_config, caplog):
    cfg = make_config("search.compare_paper=true")
    for r in (
        record("resnet18", "resnet18", {}, 560_000_000, 0.93),
        record("efficientnet_phi0", "efficientnet", {"phi": 0.0, **SEARCHED}, 8_000_000, 0.90),
        record("efficientnet_phi1", "efficientnet", {"phi": 1.0, **SEARCHED}, 30_000_000, 0.915),
        record("efficientnet_paper_phi0", "efficientnet", {"phi": 0.0, **PAPER}, 8_000_000, 0.92),
        record("efficientnet_paper_phi1", "efficientnet", {"phi": 1.0, **PAPER}, 26_000_000, 0.91),
    ):
        r.save(cfg.paths.train_dir)

    with caplog.at_level(logging.INFO, logger="pipelines"):
        report = report_stage(cfg, latency=False)
    saved = pd.read_csv(report.directory / "families.csv")
    assert report.directory / "families.md" in report.files and (report.directory / "families.md").is_file()
    assert list(saved["phi"]) == [0.0, 1.0]
    assert list(saved["searched"]) == ["efficientnet_phi0", "efficientnet_phi1"]
    # phi 0: B0 either way; the searched one is this training's (a paper_phi0 record is an older run's, and showed
    # its own 0.92 beside "difference 0.0").
    assert list(saved["paper"]) == ["efficientnet_phi0", "efficientnet_paper_phi1"]
    assert list(saved["paper test_acc"]) == [0.90, 0.91]
    assert list(saved["winner"]) == ["same model", "searched"]
    assert list(saved["difference"]) == [0.0, 0.005]
    assert list(saved["searched (alpha, beta, gamma)"]) == ["(1.3, 1.05, 1.2)"] * 2
    assert "searched won at 1, the paper at 0, ties 0" in caplog.text
    assert "efficientnet_paper_phi1" in pd.read_csv(report.directory / "models.csv")["model"].tolist()

    # accuracy_vs_macs.png: one labelled line per family, its members in phi order; other models are points.
    figure = accuracy_figure(list(load_results(cfg.paths.train_dir).values()), "macs")
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert set(lines) == {"EfficientNet, searched (1.3, 1.05, 1.2)", "EfficientNet, paper (1.2, 1.1, 1.15)"}
    searched, paper = lines["EfficientNet, searched (1.3, 1.05, 1.2)"], lines["EfficientNet, paper (1.2, 1.1, 1.15)"]
    assert list(searched.get_xdata()) == [8.0, 30.0] and list(searched.get_ydata()) == [0.90, 0.915]
    # From the searched family's B0, as the family table pairs them (the older paper_phi0 record's 0.92 is not it)
    assert list(paper.get_xdata()) == [8.0, 26.0] and list(paper.get_ydata()) == [0.90, 0.91]
    # Every model in the legend (beside the axes), the others each in a colour of its own, none the families'.
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert sorted(legend) == sorted([*lines, "resnet18"])
    [resnet] = [c for c in figure.axes[0].collections if c.get_label() == "resnet18"]
    assert tuple(resnet.get_facecolor()[0][:3]) not in {matplotlib.colors.to_rgb(c) for c in ("crimson", "royalblue")}


def test_families_of_one_triple_or_of_unequal_trainings_are_not_compared(caplog):
    """A search that found the paper's triple, beside paper members of an earlier search, compared the paper's
    family with itself and named a winner; a paper member of a 4-epoch run lost to a 15-epoch searched one."""
    members = [record("efficientnet_phi1", "efficientnet", {"phi": 1.0, **PAPER}, 26_000_000, 0.915),
               record("efficientnet_paper_phi1", "efficientnet", {"phi": 1.0, **PAPER}, 26_000_000, 0.91)]
    assert family_comparison(members, tuple(PAPER.values())) is None
    searched = record("efficientnet_phi1", "efficientnet", {"phi": 1.0, **SEARCHED}, 30_000_000, 0.95)
    searched.epochs = 15
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        table = family_comparison([searched, members[1]], tuple(SEARCHED.values()))
    assert list(table["winner"]) == [""] and table["difference"].isna().all()
    assert "trained for 15 epochs, efficientnet_paper_phi1 for 1: not compared" in caplog.text
    # A member whose training diverged and stopped (its record says the planned epochs) is no comparison either:
    # it read as fully trained and lost to the other family.
    searched.epochs = 3
    paper = members[1]
    paper.epochs = 3
    searched.history = [{"epoch": 0, "val_acc": 0.5}, {"epoch": 1, "val_acc": float("nan"), "diverged": True}]
    assert (searched.diverged_at, searched.epochs_trained, paper.diverged_at, paper.epochs_trained) == (2, 2, None, 3)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        table = family_comparison([searched, paper], tuple(SEARCHED.values()))
    assert list(table["winner"]) == [""]
    assert "efficientnet_phi1 was trained for 2 epochs (it diverged), efficientnet_paper_phi1 for 3" in caplog.text
    assert list(comparison_table([searched, paper])["epochs"]) == [2, 3]  # what each trained
    # At phi 0 B0 stands for both families: one that diverged was "not compared" with itself.
    b0 = record("efficientnet_phi0", "efficientnet", {"phi": 0.0, **SEARCHED}, 8_000_000, 0.9)
    b0.epochs, b0.history = 3, searched.history
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        table = family_comparison([b0, searched, paper], tuple(SEARCHED.values()))
    assert list(table["winner"]) == ["same model", ""] and "phi 0" not in caplog.text


def test_members_tested_on_other_test_images_are_not_compared_and_a_win_by_one_image_is_no_tie(
        make_config, caplog):
    """An image folder's test/ changed and a member's test again failed: its older test accuracy was set against
    the other family's and named a winner, and the report ranked it beside the others without a word. A win by
    one image in 30,000 read "0.8414, 0.8413, difference 0.0, tie"."""
    searched = record("efficientnet_phi1", "efficientnet", {"phi": 1.0, **SEARCHED}, 30_000_000, 0.9)
    paper = record("efficientnet_paper_phi1", "efficientnet", {"phi": 1.0, **PAPER}, 26_000_000, 0.8)
    searched.test_split, paper.test_split = "new", "old"
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        table = family_comparison([searched, paper], tuple(SEARCHED.values()))
    assert list(table["winner"]) == [""] and table["difference"].isna().all()
    assert "efficientnet_phi1 and efficientnet_paper_phi1 were tested on different test images" in caplog.text
    paper.test_split = "new"
    assert list(family_comparison([searched, paper], tuple(SEARCHED.values()))["winner"]) == ["searched"]

    searched.test_acc, paper.test_acc = 25241 / 30000, 25240 / 30000
    table = family_comparison([searched, paper], tuple(SEARCHED.values()))
    assert list(table["winner"]) == ["searched"] and list(table["difference"]) == [0.0001]
    paper.test_acc = 25240.5 / 30000  # (both read 0.8414): a tie as shown
    assert list(family_comparison([searched, paper], tuple(SEARCHED.values()))["winner"]) == ["tie"]

    cfg = make_config()
    resnet = record("resnet18", "resnet18", {}, 560_000_000, 0.95)
    resnet.test_split, paper.test_split = "old", "old"
    for r in (searched, paper, resnet, record("vgg11", "vgg11", {}, 900_000_000, 0.9)):  # vgg11: no split known
        r.save(cfg.paths.train_dir)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        report_stage(cfg, latency=False)
    assert ("efficientnet_phi1 was tested on other test images than efficientnet_paper_phi1, resnet18 (the data "
            "set's test split changed") in caplog.text


def test_the_test_images_of_this_configs_own_records_are_the_reference_for_the_others(caplog):
    """Records of other trainings (kept by `report`, which says so) outnumbering this config's own made this
    config's models the odd ones out, with the advice that a `train` re-run tests them again; nor does `train`
    retest another training's records (it would train them afresh)."""
    from pipelines.report import _warn_of_other_test_images

    records = [record(name, name, {}, 1_000_000, 0.9) for name in ("a", "b", "c", "d", "e")]
    for r, split in zip(records, ("new", "new", "old", "old", "old"), strict=True):
        r.test_split = split
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        _warn_of_other_test_images(records, others=["c", "d", "e"])
    assert "c, d, e were tested on other test images than a, b" in caplog.text and "re-run" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        _warn_of_other_test_images(records, others=["d", "e"])  # a, b and c this config's: c is retested
    assert "c, d, e were tested on other test images than a, b" in caplog.text
    # Not "tests c again": c may be the one tested on the current test images (a, b then retested), and only
    # `train` reads the data to tell.
    assert "re-run tests this config's models again where their test images are not the current" in caplog.text
    assert "tests c again" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        _warn_of_other_test_images(records)  # all this config's: most of them the reference
    assert "a, b were tested on other test images than c, d, e" in caplog.text
    assert "re-run tests this config's models again" in caplog.text


def test_the_report_command_names_records_of_other_trainings_and_compares_families_only_when_asked(
        make_config, caplog, monkeypatch):
    """`report` reports every record under the run's directory: a model of an earlier data set or settings was
    ranked beside this config's with nothing to tell them apart, and families.csv was written without
    search.compare_paper. A champion outside the table went unmentioned."""
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models
    from pipelines.tracking import Tracker

    cfg = make_config("train.models=[resnet18]", "train.epochs=1")
    current = record("resnet18", "resnet18", {}, 560_000_000, 0.93)
    planned = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg))[0]
    current.fingerprint = planned.fingerprint
    older = record("vgg11", "vgg11", {}, 900_000_000, 0.99)
    for r in (current, older,
              record("efficientnet_phi1", "efficientnet", {"phi": 1.0, **SEARCHED}, 30_000_000, 0.915),
              record("efficientnet_paper_phi1", "efficientnet", {"phi": 1.0, **PAPER}, 26_000_000, 0.91)):
        r.save(cfg.paths.train_dir)
    monkeypatch.setattr(Tracker, "champion", lambda self, name: ("vgg13", "7"))
    with caplog.at_level(logging.INFO, logger="pipelines"):
        report = report_stage(cfg, latency=False)
    assert set(report.table["model"]) == {"resnet18", "vgg11", "efficientnet_phi1", "efficientnet_paper_phi1"}
    assert ("including 3 trained with other settings, data or epochs than this config's (it would train them "
            "afresh): efficientnet_paper_phi1, efficientnet_phi1, vgg11") in caplog.text
    assert report.families is None and not (report.directory / "families.csv").exists()
    assert "champion, vgg13 v7 (what `serve` answers with by default), is not among the models" in caplog.text


def test_phi_0_is_one_model_a_nan_accuracy_wins_nothing_and_a_listed_member_without_coefficients_is_the_papers():
    nan = float("nan")
    table = family_comparison([
        record("efficientnet_phi0", "efficientnet", {"phi": 0.0, **SEARCHED}, 8_000_000, 0.9),  # paper's not trained
        record("efficientnet_phi1", "efficientnet", {"phi": 1.0, **SEARCHED}, 30_000_000, nan),  # diverged
        record("efficientnet_paper_phi1", "efficientnet", {"phi": 1.0, **PAPER}, 26_000_000, 0.91),
        record("efficientnet_paper_phi2", "efficientnet", {"phi": 2.0, **PAPER}, 60_000_000, 0.92),
    ])
    assert list(table["winner"]) == ["same model", "", ""]  # a NaN difference used to read as "paper"
    assert table["paper"][0] == "efficientnet_phi0" and table["paper (alpha, beta, gamma)"][0] == "(1.2, 1.1, 1.15)"
    # A searched member named in train.models by code before a848a35 has no coefficients (a KeyError crashed
    # the report): the builder's, the paper's, so it is no member of a searched family of other coefficients.
    listed = record("efficientnet_phi2", "efficientnet", {"phi": 2.0}, 60_000_000, 0.92)
    assert [r.model_name for r in stale_members([listed, *table_records()], None)] == ["efficientnet_phi2"]


def table_records() -> list[ModelResult]:
    return [record("efficientnet_phi0", "efficientnet", {"phi": 0.0, **SEARCHED}, 8_000_000, 0.9),
            record("efficientnet_phi1", "efficientnet", {"phi": 1.0, **SEARCHED}, 30_000_000, 0.91)]


def test_a_member_left_from_an_earlier_search_is_neither_drawn_nor_compared_as_one(make_config):
    """After a search with other settings, a member not trained again yet (fewer phis now, a failed run) kept
    the old search's coefficients: joined to the new family's line under the new triple's label, and counted
    as a win (or loss) of the current search in families.csv."""
    import matplotlib.pyplot as plt

    old = {"alpha": 1.2, "beta": 1.0, "gamma": 1.3}
    results = [*table_records(), record("efficientnet_phi2", "efficientnet", {"phi": 2.0, **old}, 60_000_000, 0.95),
               record("efficientnet_paper_phi1", "efficientnet", {"phi": 1.0, **PAPER}, 26_000_000, 0.9),
               record("efficientnet_paper_phi2", "efficientnet", {"phi": 2.0, **PAPER}, 55_000_000, 0.91)]
    searched = tuple(SEARCHED.values())
    table = family_comparison(results, searched)
    assert list(table["searched"]) == ["efficientnet_phi0", "efficientnet_phi1", ""]
    assert list(table["winner"]) == ["same model", "searched", ""]
    assert [r.model_name for r in stale_members(results, searched)] == ["efficientnet_phi2"]
    figure = accuracy_figure(results, "macs", searched)
    [ax] = figure.axes
    lines = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
    # The paper's line starts from B0, the searched family's phi 0 (the same model; the paper's is not trained).
    assert lines == {"EfficientNet, searched (1.3, 1.05, 1.2)": [8.0, 30.0],
                     "EfficientNet, paper (1.2, 1.1, 1.15)": [8.0, 26.0, 55.0]}
    assert "efficientnet_phi2" in [t.get_text() for t in ax.get_legend().get_texts()]  # drawn on its own, named
    plt.close(figure)


def test_b0_of_an_earlier_search_is_the_new_familys_phi_0(make_config):
    """efficientnet_phi0 is B0 whatever the triple, so a new search does not train it again (its fingerprint
    leaves the triple out): its record, of the earlier search's triple, is the new family's phi 0, not a stale
    member drawn on its own."""
    from pipelines.data import describe_dataset
    from pipelines.planning import plan_model_runs, resolve_models

    cfg = make_config("train.models=[lenet5]", "search.phis=[0, 1]")

    def fingerprints(triple: dict) -> dict[str, str]:
        runs = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg, triple), cluster_cpus=2)
        return {r.model_name: r.fingerprint for r in runs}

    before, after = fingerprints({"alpha": 1.2, "beta": 1.0, "gamma": 1.3}), fingerprints(SEARCHED)
    assert before["efficientnet_phi0"] == after["efficientnet_phi0"]
    assert before["efficientnet_phi1"] != after["efficientnet_phi1"] and before["lenet5"] == after["lenet5"]

    earlier_b0 = record("efficientnet_phi0", "efficientnet", {"phi": 0.0, "alpha": 1.2, "beta": 1.0, "gamma": 1.3},
                        8_000_000, 0.9)
    results = [earlier_b0, record("efficientnet_phi1", "efficientnet", {"phi": 1.0, **SEARCHED}, 30_000_000, 0.91),
               record("efficientnet_paper_phi1", "efficientnet", {"phi": 1.0, **PAPER}, 26_000_000, 0.9)]
    searched = tuple(SEARCHED.values())
    assert stale_members(results, searched) == []
    table = family_comparison(results, searched)
    assert list(table["searched"]) == ["efficientnet_phi0", "efficientnet_phi1"]
    assert list(table["searched (alpha, beta, gamma)"]) == ["(1.3, 1.05, 1.2)"] * 2
    assert list(table["winner"]) == ["same model", "searched"]
    for figure_triple in (searched, None):  # the current search's triple, or none given (the lowest phi above 0)
        [ax] = accuracy_figure(results, "macs", figure_triple).axes
        lines = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
        assert lines["EfficientNet, searched (1.3, 1.05, 1.2)"] == [8.0, 30.0], lines


def test_no_family_comparison_without_both_families():
    searched = [record("efficientnet_phi0", "efficientnet", {"phi": 0.0, **SEARCHED}, 8_000_000, 0.9),
                record("resnet18", "resnet18", {}, 560_000_000, 0.93)]
    assert family_comparison(searched) is None
    paper_at_phi2 = record("efficientnet_paper_phi2", "efficientnet", {"phi": 2.0, **PAPER}, 60_000_000, 0.93)
    table = family_comparison([*searched, paper_at_phi2])
    assert list(table["winner"]) == ["same model", ""]  # phi 2 has one member only: nothing won there


def test_foreign_or_damaged_files_among_the_records_are_not_finished_models(tmp_path, caplog):
    record("resnet18", "resnet18", {}, 560_000_000, 0.93).save(tmp_path)
    (tmp_path / "list.json").write_text("[1, 2]")  # valid JSON, not a record: crashed the train stage and report
    (tmp_path / "cut.json").write_text('{"model_name": "vgg')
    (tmp_path / "other.json").write_text('{"unrelated": true}')
    (tmp_path / "latin1.json").write_bytes('{"model_name": "caf\xe9"}'.encode("latin-1"))  # not UTF-8
    (tmp_path / "folder.json").mkdir()  # a directory named like a record
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        assert list(load_results(tmp_path)) == ["resnet18"]
    # Each said (a record cut short silently left the report, and its model trained again without a word).
    for name in ("list.json", "cut.json", "other.json", "latin1.json", "folder.json"):
        assert f"{tmp_path / name} is not a readable result record" in caplog.text, name
    caplog.clear()  # once per process: a `run` reads the records three times
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        assert list(load_results(tmp_path)) == ["resnet18"]
    assert "not a readable result record" not in caplog.text


@pytest.mark.parametrize(("field", "value"), [("test_acc", "0.9"), ("best_val_acc", None), ("macs", "10"),
                                            ("epochs", 2.0), ("epochs", True), ("history", {"epoch": 0}),
                                            ("history", "abc"), ("model_kwargs", []), ("timeline", {"x": "1"})])
def test_a_record_with_a_field_of_the_wrong_type_is_left_out_naming_it(tmp_path, caplog, field, value):
    """Each loaded, then failed the report or the train stage with a TypeError or KeyError naming no file."""
    import json

    path = record("resnet18", "resnet18", {}, 560_000_000, 0.93).save(tmp_path)
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        assert load_results(tmp_path) == {}
    assert f"{path} is not a readable result record (ValueError: its {field!r} is" in caplog.text


def test_a_copy_of_a_record_under_another_name_does_not_replace_the_models_own(tmp_path, caplog):
    """``resnet18_old.json`` sorts after ``resnet18.json``: filed under the name inside it, the old record
    replaced the model's own, whose fingerprint then never matched (trained again at every run)."""
    old = record("resnet18", "resnet18", {}, 560_000_000, 0.10)
    old.save(tmp_path).rename(tmp_path / "resnet18_old.json")
    record("resnet18", "resnet18", {}, 560_000_000, 0.93).save(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        assert load_results(tmp_path)["resnet18"].test_acc == 0.93
    assert "resnet18_old.json holds the record of 'resnet18', not of 'resnet18_old'" in caplog.text


def test_the_report_is_written_while_mlflow_is_unreachable(make_config, caplog, monkeypatch):
    """The champion lookup used to crash the stage before any file was written once an outage stopped reading
    as "nothing registered"; the table and plots come from the result records and need no MLflow."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = make_config("tracking.uri=http://127.0.0.1:9")  # nothing listens on port 9
    record("resnet18", "resnet18", {}, 560_000_000, 0.93).save(cfg.paths.train_dir)
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        report = report_stage(cfg, latency=False)
    assert (report.directory / "models.csv").is_file() and list(report.table["model"]) == ["resnet18"]
    assert "MLflow is unreachable" in caplog.text


def test_the_report_is_written_while_mlflow_refuses_the_credentials(make_config, caplog, monkeypatch,
                                                                    refusing_credentials):
    """An expired token (401 from MLflow or the proxy in front of it) failed the report (exit 1) before its files
    were written, while the queue keeps writes for such a refusal, as for an outage."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = make_config(f"tracking.uri={refusing_credentials}")
    record("resnet18", "resnet18", {}, 560_000_000, 0.93).save(cfg.paths.train_dir)
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        report = report_stage(cfg, latency=False)
    assert (report.directory / "models.csv").is_file() and list(report.table["model"]) == ["resnet18"]
    assert "refuses these credentials" in caplog.text


def test_the_report_is_written_while_the_artifact_store_is_unreachable(make_config, caplog, monkeypatch):
    """MLflow answers but its artifact store does not (S3 down): logging the report's files crashed the stage
    after they were written, and under `run` serving never started."""
    from pipelines.tracking import Tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = make_config()
    # The experiment keeps its artifacts where nothing listens (port 9), the tracking store itself answers.
    tracker = Tracker(cfg.tracking_uri, cfg.name, artifact_root="http://127.0.0.1:9/artifacts")
    tracker.start_run("train-1", {"stage": "train", "cnnzoo.stage_parent": "true"})
    record("resnet18", "resnet18", {}, 560_000_000, 0.93).save(cfg.paths.train_dir)
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        report = report_stage(cfg, latency=False)
    assert (report.directory / "models.csv").is_file() and list(report.table["model"]) == ["resnet18"]
    assert "MLflow or its artifact store is unreachable" in caplog.text


def test_the_report_says_why_it_is_not_logged_to_mlflow_and_any_logging_error_spares_its_files(
        make_config, caplog, monkeypatch):
    """With no train stage run in the experiment (another tracking.uri since the training) the report was not
    logged, without a word; an error MLflow's artifact store raised that is no outage (S3's AccessDenied, a
    missing credential) failed the report after its files were written, and under `run` serving never started."""
    from pipelines.tracking import Tracker

    cfg = make_config()
    record("resnet18", "resnet18", {}, 560_000_000, 0.93).save(cfg.paths.train_dir)
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        report_stage(cfg, latency=False)
    assert "no train stage run in MLflow's experiment" in caplog.text
    Tracker.for_config(cfg).start_run("train-1", {"stage": "train", "cnnzoo.stage_parent": "true"})

    def denied(self, run_id, path, artifact_path=None):
        raise PermissionError("AccessDenied: s3://bucket/mlartifacts")

    monkeypatch.setattr(Tracker, "log_artifact", denied)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        report = report_stage(cfg, latency=False)
    assert (report.directory / "models.csv").is_file()
    assert "refused them (PermissionError)" in caplog.text and "not logged to MLflow" in caplog.text


def test_the_report_leaves_the_matplotlib_backend_alone(make_config):
    """It switched the process to Agg: a notebook's inline plots stopped showing after one report figure."""
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # any backend not Agg
    try:
        fig = accuracy_figure(table_records(), "macs")
        assert matplotlib.get_backend() == "svg" and fig.axes
        assert val_curves_figure(table_records()).axes and matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_serving_latency_is_measured_as_a_replica_runs_the_model(tmp_path, monkeypatch):
    """The column read the eager model on all of the driver's threads: up to 2x faster than a replica's traced
    model on its one thread (serve.num_cpus 0.5)."""
    import torch

    import cnnmodels
    from pipelines.checkpoints import ModelCheckpoint, save_checkpoint
    from pipelines.config import ServeConfig
    from pipelines.preprocess import PreprocessSpec
    from pipelines.report import measure_latency_ms

    spec = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.5,), class_names=tuple("0123456789"))
    weights = cnnmodels.create_model("lenet5", num_classes=10, in_chans=1).state_dict()
    trained = record("lenet5", "lenet5", {}, 400_000, 0.9)
    trained.checkpoint_path = str(save_checkpoint(ModelCheckpoint("lenet5", {}, spec, weights), tmp_path / "model.pt"))
    driver_threads = torch.get_num_threads()
    threads, traced = [], []
    monkeypatch.setattr(torch, "set_num_threads", lambda n, real=torch.set_num_threads: (threads.append(n), real(n)))
    import pipelines.model_store as model_store

    real_trace = model_store.trace_for_serving
    monkeypatch.setattr(model_store, "trace_for_serving", lambda *a, **k: traced.append(1) or real_trace(*a, **k))
    assert measure_latency_ms(trained, ServeConfig(num_cpus=2), repeats=3) > 0
    assert threads == [2, driver_threads] and traced == [1]
    assert measure_latency_ms(trained, ServeConfig(trace_models=False), repeats=3) > 0
    assert threads[2:] == [1, driver_threads] and traced == [1] and torch.get_num_threads() == driver_threads


def test_a_serving_latency_is_measured_once_per_checkpoint_and_serving_settings(tmp_path, monkeypatch, caplog):
    """A report re-run with nothing new spent 52 s of 80 measuring nine unchanged models again, silently."""
    import cnnmodels
    import pipelines.report as report_module
    from pipelines.checkpoints import ModelCheckpoint, save_checkpoint
    from pipelines.config import ServeConfig
    from pipelines.preprocess import PreprocessSpec

    spec = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.5,), class_names=tuple("0123456789"))
    records = []
    for name in ("lenet5", "resnet18"):
        weights = cnnmodels.create_model(name, num_classes=10, in_chans=1).state_dict()
        trained = record(name, name, {}, 400_000, 0.9)
        trained.checkpoint_path = str(save_checkpoint(ModelCheckpoint(name, {}, spec, weights),
                                                      tmp_path / name / "model.pt"))
        records.append(trained)
    measured = []
    real = report_module.measure_latency_ms
    monkeypatch.setattr(report_module, "measure_latency_ms",
                        lambda r, *a, **k: measured.append(r.model_name) or real(r, *a, repeats=2, **k))
    directory = tmp_path / "report"
    with caplog.at_level(logging.INFO, logger="pipelines"):
        report_module._measure_latencies(records, ServeConfig(), "", directory)
    assert measured == ["lenet5", "resnet18"] and "measuring the serving latency of 2 model(s)" in caplog.text
    first = [r.serving_latency_ms for r in records]
    assert all(ms > 0 for ms in first)
    again = [record(r.model_name, r.arch, {}, 400_000, 0.9) for r in records]
    for fresh, old in zip(again, records, strict=True):
        fresh.checkpoint_path = old.checkpoint_path
    report_module._measure_latencies(again, ServeConfig(), "", directory)
    assert measured == ["lenet5", "resnet18"] and [r.serving_latency_ms for r in again] == first  # from the cache
    # Another way of serving, or a new checkpoint: measured again, that model only.
    report_module._measure_latencies(again, ServeConfig(trace_models=False), "", directory)
    assert measured[2:] == ["lenet5", "resnet18"]
    again[0].checkpoint_path = str(save_checkpoint(ModelCheckpoint("lenet5", {}, spec, cnnmodels.create_model(
        "lenet5", num_classes=10, in_chans=1).state_dict()), tmp_path / "newer" / "model.pt"))
    report_module._measure_latencies(again, ServeConfig(trace_models=False), "", directory)
    assert measured[4:] == ["lenet5"]


@pytest.fixture
def s3_bucket(monkeypatch):
    """A real S3 API (moto's server on a local port) with the bucket ``bucket``; boto3 and pyarrow (Ray's storage)
    reach it through ``AWS_ENDPOINT_URL``."""
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket="bucket")
    yield client
    server.stop()


def test_the_latency_of_a_model_trained_into_s3_storage_is_measured(tmp_path, s3_bucket):
    """Ray records an S3 checkpoint without its scheme (``bucket/...``): the report read it as a local path, found
    nothing, and left the serving-latency column empty for every model trained into a bucket."""
    import cnnmodels
    from pipelines.checkpoints import (
        CHECKPOINT_FILE,
        MissingCheckpointError,
        ModelCheckpoint,
        load_checkpoint,
        save_checkpoint,
    )
    from pipelines.config import ServeConfig
    from pipelines.preprocess import PreprocessSpec
    from pipelines.report import measure_latency_ms

    spec = PreprocessSpec(image_size=32, channels=1, mean=(0.5,), std=(0.5,), class_names=tuple("0123456789"))
    weights = cnnmodels.create_model("lenet5", num_classes=10, in_chans=1).state_dict()
    local = save_checkpoint(ModelCheckpoint("lenet5", {}, spec, weights), tmp_path / CHECKPOINT_FILE)
    s3_bucket.upload_file(str(local), "bucket", f"cnnzoo/ray/train_lenet5/checkpoint_000002/{CHECKPOINT_FILE}")
    trained = record("lenet5", "lenet5", {}, 400_000, 0.9)
    trained.checkpoint_path = "bucket/cnnzoo/ray/train_lenet5/checkpoint_000002"  # as Ray reports it
    assert measure_latency_ms(trained, ServeConfig(), repeats=2, storage_path="s3://bucket/cnnzoo/ray") > 0
    with pytest.raises(MissingCheckpointError):  # what the report did: the path read as a local one
        load_checkpoint(trained.checkpoint_path)


def test_the_table_ranks_models_as_the_registry_chooses_its_champion():
    """Accuracies equal once rounded to 4 places were ranked on the rounded values (then validation
    accuracy), while the registry chose on the exact ones: the champion's row was not the first."""
    from pipelines.results import comparison_table
    from pipelines.tracking import choose_champion

    records = [record(name, name, {}, 1_000_000, test) for name, test in
               (("lenet5", 0.94996), ("resnet18", 0.95), ("alexnet", 0.95), ("vgg11_bn", 0.95004))]
    for r, val in zip(records, (0.99, 0.97, 0.90, 0.80), strict=True):
        r.best_val_acc = val
    champion = choose_champion({r.model_name: r.test_acc for r in sorted(records, key=lambda r: r.model_name)},
                               tiebreak={r.model_name: r.best_val_acc for r in records})
    table = comparison_table(records, champion=champion)
    assert champion == "vgg11_bn" and list(table["model"]) == ["vgg11_bn", "resnet18", "alexnet", "lenet5"]
    assert table["champion"].tolist() == [True, False, False, False]
    # Markdown (tabulate's "g") wrote 0.95 beside 0.9500; "serve ms" was missing from a table without latencies.
    from pipelines.results import for_display, to_markdown

    rows = to_markdown(for_display(table)).splitlines()[2:]
    assert [row.split("|")[8].strip() for row in rows] == ["0.9500", "0.9500", "0.9500", "0.9500"]
    assert list(table.columns)[-2:] == ["serve ms", "champion"] and rows[0].rstrip().endswith("|            |")


def test_the_report_shows_the_records_it_is_given_their_epochs_and_the_champion_in_its_own_column(make_config):
    """``run`` passes the train stage's records: an older training's record left under a model's name (its new
    run failed) was reported, measured and plotted beside this run's. The CSV's model column is the name (it
    read "resnet18 *" for the champion); the console and Markdown still mark it."""
    from pipelines.results import comparison_table, for_display

    cfg = make_config()
    current = record("resnet18", "resnet18", {}, 560_000_000, 0.93)
    older = record("vgg11", "vgg11", {}, 900_000_000, 0.95)
    older.epochs = 2
    for r in (current, older):
        r.save(cfg.paths.train_dir)
    report = report_stage(cfg, latency=False, results={"resnet18": current})
    assert list(pd.read_csv(report.directory / "models.csv")["model"]) == ["resnet18"]
    everything = report_stage(cfg, latency=False)  # the `report` command: every record, with its epochs
    assert dict(zip(everything.table["model"], everything.table["epochs"], strict=True)) == {"vgg11": 2, "resnet18": 1}

    table = comparison_table([current, older], champion="resnet18")
    assert list(table["model"]) == ["vgg11", "resnet18"] and list(table["champion"]) == [False, True]
    # The champion is a registered version: a record of another training under its name (retrained, not
    # registered: diverged, say) was starred with numbers that are not the champion's.
    for version, error, starred in (("2", "", True), ("3", "", False), ("", "", True),  # "": an older record
                                    ("", "the weights are not finite", False)):  # diverged: the alias stayed
        current.version, current.registration_error = version, error
        assert list(comparison_table([current, older], "resnet18", "2")["champion"]) == [False, starred]
    # A record of today's format whose registration was dropped (its checkpoint gone, the run deleted in the UI):
    # no version, and the alias still on an older training's: not starred with numbers `serve` does not answer.
    current.registered_model, current.version, current.registration_error = "test", "", ""
    assert list(comparison_table([current, older], "resnet18", "2")["champion"]) == [False, False]
    assert list(comparison_table([current, older], "resnet18", None)["champion"]) == [False, True]  # unknown
    shown = for_display(table)
    assert list(shown["model"]) == ["vgg11", "resnet18 *"] and "champion" not in shown
    # The console's table: a latency not measured (the train stage's) read "None".
    from pipelines.results import as_text

    text = as_text(shown)
    assert "None" not in text and "NaN" not in text and text.splitlines()[1].split()[-1] == "-"
    assert "0.9500" in as_text(pd.DataFrame({"test_acc": [0.95, 0.9512]}))  # numbers keep one format


def test_files_of_an_earlier_report_that_this_one_does_not_write_are_removed(make_config):
    """A search.png of a search with other settings, or a families table without both families now, stayed
    beside the new plots as if they were this report's."""
    cfg = make_config()
    record("resnet18", "resnet18", {}, 560_000_000, 0.93).save(cfg.paths.train_dir)
    directory = cfg.paths.report_dir
    directory.mkdir(parents=True)
    for leftover in ("search.png", "families.csv", "families.md"):
        (directory / leftover).write_text("an earlier report's")
    (directory / "notes.txt").write_text("the user's")
    report = report_stage(cfg, latency=False)
    assert sorted(p.name for p in directory.iterdir()) == sorted([p.name for p in report.files] + ["notes.txt"])
    assert "search.png" not in {p.name for p in report.files}


def test_files_of_an_earlier_report_are_deleted_from_mlflow_too(make_config):
    """A report of nothing newly trained lands in the same train run: the earlier report's search plot and family
    tables stayed in MLflow beside the new table (deleted on disk only). Other files of the run stay."""
    from pipelines.tracking import Tracker

    cfg = make_config()
    record("resnet18", "resnet18", {}, 560_000_000, 0.93).save(cfg.paths.train_dir)
    tracker = Tracker.for_config(cfg)
    run_id = tracker.start_run("train", {"stage": "train", "cnnzoo.stage_parent": "true"})
    earlier = cfg.paths.workdir / "earlier"
    earlier.mkdir(parents=True)
    for name in ("search.png", "families.csv", "notes.txt"):
        (earlier / name).write_text("an earlier report's")
        tracker.log_artifact(run_id, earlier / name, "report")
    report = report_stage(cfg, latency=False)
    logged = sorted(item.path.split("/")[-1] for item in tracker.client.list_artifacts(run_id, "report"))
    assert logged == sorted([p.name for p in report.files] + ["notes.txt"])


def test_a_failed_trial_is_drawn_apart_in_the_search_plot():
    """A failed trial ranks below every other whatever its accuracy: drawn as the others, it stood above the star
    with nothing to say why; and the colours had no scale."""
    import matplotlib.pyplot as plt

    from pipelines.report import search_figure
    from pipelines.search import SearchResult

    trials = [{"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "compound_product": 1.92, "val_acc": 0.90, "paper": True,
               "error": None},
              {"alpha": 1.0, "beta": 1.2, "gamma": 1.2, "compound_product": 2.07, "val_acc": 0.95, "paper": False,
               "error": "OutOfMemoryError"}]
    search = SearchResult(best=dict(trials[0]), trials=trials, objective="val_acc", phi=1.0, paper_included=True,
                          fingerprint="0")
    fig = search_figure(search)
    ax = fig.axes[0]
    [failed] = [c for c in ax.collections if c.get_label() == "failed (ranked last)"]
    assert [float(y) for _, y in failed.get_offsets()] == [0.95]
    assert [float(y) for _, y in ax.collections[0].get_offsets()] == [0.90]  # the others, coloured
    assert any(a.get_ylabel() == "alpha * beta^2 * gamma^2" for a in fig.axes)  # the colour bar
    plt.close(fig)


def test_run_with_only_the_report_finishes_while_mlflow_is_down(make_config, caplog, monkeypatch):
    """The report outlives an outage; the closing MLflow UI hint asked MLflow with no guard, so `run --stages
    report` failed (exit 1) after writing every file. Nor does it say the EfficientNet family is "not trained"
    when nothing is trained."""
    from pipelines.pipeline import run_pipeline

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = make_config("tracking.uri=http://127.0.0.1:9")  # nothing listens on port 9
    record("resnet18", "resnet18", {}, 560_000_000, 0.93).save(cfg.paths.train_dir)
    with caplog.at_level(logging.INFO, logger="pipelines"):
        result = run_pipeline(cfg, ["report"])
    assert result.ok and result.stages == {"report": "ran"}
    assert "MLflow UI: the experiment could not be looked up" in caplog.text
    assert "[search]" not in caplog.text


def test_every_model_has_a_line_of_its_own_look_in_the_validation_curves():
    """Past ten models (a GPU preset trains 13) lines repeated matplotlib's ten colours with the same marker: two
    legend entries looked alike."""
    import matplotlib.pyplot as plt

    records = [record(f"model{i}", "lenet5", {}, 1_000_000, 0.5 + i / 100) for i in range(13)]
    for r in records:  # two epochs each
        r.history = [{"epoch": 0, "val_acc": 0.4}, {"epoch": 1, "val_acc": r.test_acc}]
    fig = val_curves_figure(records)
    lines = fig.axes[0].get_lines()
    looks = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in lines}
    assert len(lines) == len(looks) == 13
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [r.model_name for r in records]
    fig.canvas.draw()  # epochs are whole numbers: a 2-epoch run had ticks at 1.2, 1.4, 1.6 and 1.8
    ticks = [t for t in fig.axes[0].get_xticks() if fig.axes[0].get_xlim()[0] <= t <= fig.axes[0].get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    plt.close(fig)


def test_the_search_plot_stars_the_best_on_what_it_was_ranked_by():
    """Under the MnasNet objective the star went at the best's val_acc on a plot of val_acc, below trials of
    higher accuracy and more MACs: the plot showed a winner that was not the best by its own axis."""
    import matplotlib.pyplot as plt

    from pipelines.report import search_figure
    from pipelines.search import SearchResult

    trials = [{"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "compound_product": 1.92, "val_acc": 0.90, "score": 0.85,
               "paper": True},
              {"alpha": 1.0, "beta": 1.2, "gamma": 1.2, "compound_product": 2.07, "val_acc": 0.88, "score": 0.87,
               "paper": False}]
    for objective, y_values, label in (("mnas", [0.85, 0.87], "score"), ("val_acc", [0.90, 0.88], "accuracy")):
        search = SearchResult(best=dict(trials[1]), trials=trials, objective=objective, phi=1.0, paper_included=True,
                              fingerprint="0")
        fig = search_figure(search)
        ax = fig.axes[0]
        points, star = ax.collections[0], ax.collections[1]
        assert [float(y) for _, y in points.get_offsets()] == y_values
        assert float(star.get_offsets()[0][1]) == y_values[1] and label in ax.get_ylabel()
        plt.close(fig)


def test_a_runs_fixed_cost_leaves_out_its_wait_for_the_compute_gate():
    """With train.overlap_startup a run waits at the compute gate while the model before it trains; that wait was
    counted as the run's own fixed cost (bench/overhead.py quickstart: 38 s where its start-up took 14)."""
    result = record("resnet18", "resnet18", {}, 560_000_000, 0.93)
    assert result.fixed_seconds is None  # a record from before timelines: nothing to say
    result.timeline = {"restored": 9.0, "compute_granted": 49.0, "loop_seconds": 30.0, "recorded": 84.0}
    assert result.fixed_seconds == pytest.approx(14.0)  # 84 s wall - 30 s of loops - 40 s of waiting
    result.timeline = {"loop_seconds": 30.0, "recorded": 44.0}  # no gate (overlap off): nothing to leave out
    assert result.fixed_seconds == pytest.approx(14.0)


def test_models_without_a_finite_test_accuracy_are_left_off_the_plots():
    """Two or more NaN scores and nothing else failed the log axis (matplotlib dropped the points, leaving it no
    data), and the report with it: its table rewritten beside the previous plots, nothing logged."""
    import matplotlib.pyplot as plt

    nan = float("nan")
    for against in ("macs", "params"):
        figure = accuracy_figure([record("lenet5", "lenet5", {}, 400_000, nan),
                                  record("alexnet", "alexnet", {}, 9_000_000, nan)], against)
        assert len(figure.axes[0].collections) == 0 and len(figure.axes[0].get_lines()) == 0
        plt.close(figure)
    figure = accuracy_figure([record("lenet5", "lenet5", {}, 400_000, nan),
                              record("alexnet", "alexnet", {}, 9_000_000, 0.9),
                              record("vgg11", "vgg11", {}, 90_000_000, float("inf"))], "macs")
    [drawn] = figure.axes[0].collections
    assert list(drawn.get_offsets()[0]) == [9.0, 0.9]
    plt.close(figure)
