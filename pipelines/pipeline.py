"""Stage orchestration: search -> train (+ register) -> report -> serve, each idempotent.

Re-running after an interruption skips what is finished (a search with the same settings, a model already
trained to its epochs) and resumes the rest from its checkpoints.
"""

from __future__ import annotations

import logging
import mimetypes
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import ConfigError, PipelineConfig

if TYPE_CHECKING:
    from .model_store import ServedModel

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "PipelineResult", "run_pipeline", "parse_stages"]

STAGES = ("search", "train", "report", "serve")


def parse_stages(text: str | None) -> list[str]:
    """``"search,train"`` -> ordered stage list (every stage when ``text`` is None); raises ValueError naming an
    unknown stage, or when ``text`` names none (``""`` or ``","``: a mangled or unset shell variable, ``--stages
    "$STAGES"``, must not start every stage, serving included)."""
    if text is None:
        return list(STAGES)
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    if not wanted:
        raise ValueError(f"{text!r} names no stage; choose from {', '.join(STAGES)}")
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s in wanted]


@dataclass
class PipelineResult:
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "skipped" | "failed"
    search: Any = None
    train: Any = None
    report: Any = None
    serve: Any = None
    seconds_to_serving: float | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return "failed" not in self.stages.values()


def run_pipeline(cfg: PipelineConfig, stages: list[str] | None = None, *,
                 servable: tuple[list[ServedModel], str | None] | None = None) -> PipelineResult:
    """Run the chosen stages in order on the current Ray session (see :func:`pipelines.runtime.ray_session`).

    Serving is started but not waited on; the CLI blocks on it. ``servable``: what
    :func:`pipelines.serve.servable_models` found before Ray started, where serving is the only stage.
    """
    from .report import report_stage
    from .results import as_text, for_display
    from .runtime import StageBusyError
    from .search import search_stage, searched_coefficients
    from .serve import check_serve_startable, serve_stage
    from .tracking import first_line
    from .train import check_schedules_before_the_search, train_stage

    stages = stages or list(STAGES)
    if "serve" in stages and len(stages) > 1:  # before hours of training, not after them
        check_serve_startable(cfg)
    if "search" in stages and "train" in stages:  # a lowered train.epochs: refused before the search, not after
        check_schedules_before_the_search(cfg)
    started = time.time()
    out = PipelineResult()
    coefficients = None
    if "search" in stages:
        try:
            out.search = search_stage(cfg)
        except (ConfigError, StageBusyError):  # refused before any trial: not the search's failure
            raise
        except Exception as err:
            if "train" not in stages:
                raise
            # Every trial failed (out of memory at the scaled resolution, say): train.models do not need the
            # search, and `run` ended before any of them trained. The family is left out; the run exits with 1.
            logger.error("[pipeline] the search failed (%s): training train.models without the EfficientNet "
                         "family", first_line(err))
            out.stages["search"] = "failed"
        else:
            out.stages["search"] = "skipped" if out.search.skipped else "ran"
            coefficients = out.search.coefficients
    elif "train" in stages:  # (says why the family is left out: only news when something is trained)
        coefficients = searched_coefficients(cfg)

    if "train" in stages:
        # The report prints the fuller table (with serving latency); print it once.
        out.train = train_stage(cfg, coefficients, show_table="report" not in stages)
        out.stages["train"] = "failed" if out.train.failed else ("ran" if out.train.trained else "skipped")
        if out.train.failed and not out.train.results:
            out.seconds = time.time() - started
            return out
        if out.train.pending:
            # Report and serving read the registry, which has not got every version yet.
            held = [stage for stage in ("report", "serve") if stage in stages]
            for stage in held:
                out.stages[stage] = "skipped"
            if held:
                logger.warning("[pipeline] %s skipped: MLflow has not taken every registration yet",
                               " and ".join(held))
            if "report" in stages and out.train.table is not None and not out.train.table.empty:
                # (the train stage left its table to the report, which is skipped: printed here, once)
                logger.info("\n%s", as_text(for_display(out.train.table)))
            out.seconds = time.time() - started
            return out

    if "report" in stages:
        # After training, the report shows this training's records, not older ones of another training left
        # under a model's name when its new run failed (the train stage's own table is not printed then).
        out.report = report_stage(cfg, results=out.train.results if out.train is not None else None)
        out.stages["report"] = "ran"

    if "serve" in stages:
        out.serve = serve_stage(cfg, servable)
        out.stages["serve"] = "ran"
        out.seconds_to_serving = time.time() - started
        log_serving_hints(out.serve, cfg, out.seconds_to_serving)
    _log_ui_hint(cfg)
    out.seconds = time.time() - started
    return out


def _log_ui_hint(cfg: PipelineConfig) -> None:
    """Where to compare the runs. A hint only: an MLflow outage, which the stages outlive (their writes wait in
    the pending file), must not turn a finished run into a failed one."""
    from .tracking import Tracker, first_line, ui_hint

    try:
        experiment_id = Tracker.for_config(cfg).experiment_id
    except Exception as err:  # noqa: BLE001 - any failure to ask MLflow: no hint
        logger.warning("[pipeline] MLflow UI: the experiment could not be looked up (%s)", first_line(err))
        return
    logger.info("[pipeline] MLflow UI: %s", ui_hint(cfg.tracking_uri, experiment_id))


def log_serving_hints(serving, cfg: PipelineConfig, seconds_to_serving: float | None = None) -> None:
    """How to call the endpoint ``serving`` (a :class:`~pipelines.serve.ServeHandle`): a ``curl`` and a
    ``predict`` line with the sample image, the API docs and the ``serve deploy`` config (``run`` and ``serve``
    alike: the `serve` command printed only the URL)."""
    image = serving.sample_image or "image.png"
    # The token itself is never printed: the hint reads it from where the config says it comes from.
    variable = cfg.serve.auth_token_env or "CNNZOO_SERVE_TOKEN"
    auth = f" -H \"Authorization: Bearer ${variable}\"" if cfg.serve.bearer_token() else ""
    # predict reads CNNZOO_SERVE_TOKEN itself: the token stays out of its arguments (the process list).
    token = "" if not auth or variable == "CNNZOO_SERVE_TOKEN" else f"CNNZOO_SERVE_TOKEN=\"${variable}\" "
    after = f" {seconds_to_serving:.0f} s after the start" if seconds_to_serving is not None else ""
    logger.info("\n[serve] serving %d model(s) at %s (%s)%s: %s", len(serving.models), serving.url,
                serving.default_model(), after, ", ".join(serving.models))
    content_type = mimetypes.guess_type(str(image))[0] or "image/png"  # (a TIFF for 16-bit or float images)
    logger.info("  curl -s -X POST --data-binary @%s -H 'Content-Type: %s'%s %s/predict", image, content_type,
                auth, serving.url)
    logger.info("  %spython -m pipelines predict %s --url %s", token, image, serving.url)
    logger.info("  API docs: %s/docs   Serve config for `serve deploy`: %s", serving.url, serving.config_path)
