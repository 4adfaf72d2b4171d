"""pipelines: the cnnmodels zoo on Ray (Tune search, Train DDP, Serve) with MLflow tracking.

Stages are functions taking a :class:`~pipelines.config.PipelineConfig`:
:func:`~pipelines.search.search_stage`, :func:`~pipelines.train.train_stage`,
:func:`~pipelines.report.report_stage`, :func:`~pipelines.serve.serve_stage`, and
:func:`~pipelines.pipeline.run_pipeline` for all of them. The CLI is ``python -m pipelines``.
"""

from .config import ConfigError, PipelineConfig, load_config

__all__ = ["ConfigError", "PipelineConfig", "load_config"]
