"""System checks (``python -m pytest bench/system``): each starts a Ray cluster or head of its own and trains end
to end, minutes each on 2 cores, so they stay out of the CI suite (``tests/``, README "Quick start")."""

from pipelines.runtime import set_env_defaults

# Before anything imports Ray (the clusters these checks start inherit them): quiet, no telemetry.
set_env_defaults()
