"""Command line: ``python -m pipelines <command> [--config FILE] [--set key=value ...]``.

Commands: ``run`` (all stages), ``search``, ``train``, ``report``, ``serve``, ``register`` (send tracking
writes left pending by an MLflow outage), ``predict`` (HTTP client) and ``check-config``. The CLI only
parses and calls the stage functions. Bad input exits with code 2 before Ray starts: config errors, and
image-folder files Pillow cannot open (checked once, here, for the commands that train). A stage that fails
(or raises) exits with 1 and a one-line message (``--debug`` shows the traceback); a stage that finished
while MLflow had not taken every write exits with 3; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from .config import (
    ConfigError,
    PipelineConfig,
    check_ray_environment,
    check_writable_locations,
    is_valid_bearer_token,
    load_config,
    outlives_the_command,
    paths_in_a_job_copy,
    ray_address,
    redact_uri,
)
from .console import configure_console
from .runtime import set_env_defaults

EXIT_CONFIG = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
#: Where ``predict`` finds the bearer token without ``--token`` (serve.auth_token_env's default name).
PREDICT_TOKEN_ENV = "CNNZOO_SERVE_TOKEN"
#: The commands that start (or join) Ray (``report`` reads records, checkpoints and MLflow only).
RAY_COMMANDS = ("run", "search", "train", "serve")

logger = logging.getLogger("pipelines.cli")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE",
                        help="pipeline config YAML (default: the embedded quickstart.yaml)")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, value parsed as YAML (repeatable), e.g. --set train.epochs=5")
    parser.add_argument("--debug", action="store_true", help="show the full traceback when a stage fails")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines",
        description="Search, train, compare and serve the cnnmodels zoo on Ray, tracked in MLflow.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the stages in order: search, train, report, serve")
    _add_config_args(run)
    run.add_argument("--stages", help="comma-separated subset, e.g. search,train,report (default: all)")
    run.add_argument("--no-block", action="store_true",
                     help="return once serving has started (on a cluster or in a Ray job, which outlive the command)")

    for name, text in (("search", "search EfficientNet's compound-scaling coefficients with Ray Tune"),
                       ("train", "train every model of train.models (and the searched EfficientNet family)"),
                       ("report", "comparison table and plots of the trained models"),
                       ("serve", "serve the registered models over HTTP until Ctrl-C")):
        sub = commands.add_parser(name, help=text)
        _add_config_args(sub)
        if name == "search":
            sub.add_argument("--force", action="store_true", help="search again even if a finished search exists")
        if name == "serve":
            sub.add_argument("--no-block", action="store_true",
                             help="return once serving has started (on a cluster or in a Ray job)")

    register = commands.add_parser(
        "register", help="send the MLflow writes (metrics, registrations, champion) an outage left pending")
    _add_config_args(register)

    check = commands.add_parser("check-config", help="validate a config and print it resolved")
    check.add_argument("file", nargs="?", help="config YAML (same as --config)")
    _add_config_args(check)

    predict = commands.add_parser("predict", help="send an image to a running endpoint and print the top classes")
    predict.add_argument("image", help="image file")
    predict.add_argument("--model", "-m", help="alias (default: the champion)")
    predict.add_argument("--url", default="http://127.0.0.1:8000", help="endpoint base URL")
    predict.add_argument("--top-k", type=int, help="classes shown (default: the server's, at most the model's classes)")
    predict.add_argument("--token", help=f"bearer token, if the server has one (default: ${PREDICT_TOKEN_ENV}; the "
                                         "variable keeps it out of the process list and shell history)")
    predict.add_argument("--timeout", type=_positive_seconds, default=60.0,
                         help="seconds to wait for the answer (default 60; raise it with serve.request_timeout_s)")
    return parser


def _load(args) -> PipelineConfig:
    file = getattr(args, "file", None)
    if file and args.config and file != args.config:  # (one was used, the other dropped without a word)
        raise ConfigError("--config", f"check-config was given two files ({file} and --config {args.config}); "
                                      "give one")
    return load_config(file or args.config, args.overrides)


def _block_until_interrupted(url: str, cfg: PipelineConfig) -> None:
    """Serve until Ctrl-C, then stop serving: a local Ray stops with the command, while on a cluster the Serve
    app (a detached controller's) would go on holding its replicas' CPUs and GPUs and the port, so it is
    deleted there (``--no-block`` is for leaving it up). From then on a Ctrl-C only says that the command is
    ending (``main`` puts the SIGINT handler back once it has)."""
    # Where Ray Tune's own SIGINT handler is back on (TUNE_DISABLE_SIGINT_HANDLER=0, see runtime.py) it stays
    # in place after a run; without Python's default handler back, the first Ctrl-C here would be swallowed.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # `ray job stop` sends SIGTERM (and SIGKILL 3 s later): stopping the job left its app serving on the cluster.
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    logger.info("[serve] %s is up; press Ctrl-C to stop", url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as stop:
        logger.info("\n[serve] shutting down")
        # A second SIGTERM (ray job stop's) or Ctrl-C while shutting down: this already is the shutdown it asks
        # for (a second Ctrl-C ended the command with 130 and "re-run the same command to resume").
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, _say_shutting_down)
        if outlives_the_command(cfg):
            from .serve import delete_app

            if isinstance(stop, _Terminated):
                # SIGKILL follows in 3 s: the deletion is sent and waited for at most 2 s, not left to a request
                # the shutdown of Ray could drop.
                delete_app(cfg.name, wait_s=2.0)
                logger.info("[serve] deleting the Serve app %r from the cluster", cfg.name)
            else:
                delete_app(cfg.name)
                logger.info("[serve] deleted the Serve app %r from the cluster", cfg.name)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


def _say_shutting_down(signum, frame) -> None:
    logger.info("[serve] already shutting down (a few seconds)")


class _Terminated(KeyboardInterrupt):
    """SIGTERM while serving (``ray job stop``): handled as Ctrl-C is."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


def _positive_seconds(text: str) -> float:
    """``--timeout``'s type: seconds above 0 (argparse names the option and exits 2 otherwise)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not seconds > 0 or not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number above 0")
    return seconds


def _predict(args) -> int:
    """Send one image; prints the top classes, or one line saying what went wrong (exit 2 for a bad image path,
    1 for a server that cannot be reached or answers with an error or something that is not a prediction)."""
    import requests

    from .results import format_predictions

    path = Path(args.image)
    try:
        image = path.read_bytes()
    except OSError as err:  # not there, a directory, no permission
        logger.error("error: cannot read %s: %s", path, err.strerror or err)
        return EXIT_CONFIG
    if "://" not in args.url:  # requests' own word for it: "No connection adapters were found"
        logger.error("error: --url %s needs its scheme: http://%s (or https://)", args.url, args.url)
        return EXIT_CONFIG
    params = {"top_k": args.top_k} if args.top_k is not None else {}
    if args.model:
        params["model"] = args.model
    headers = {"Content-Type": "application/octet-stream"}
    token = (args.token or os.environ.get(PREDICT_TOKEN_ENV) or "").strip()  # (a file's newline kept in a variable)
    if token and not is_valid_bearer_token(token):
        # The server's own rule (serve.auth_token). Sent as it was, a pasted curly quote was a traceback, and a
        # line break inside "cannot reach" the server, with the whole token printed.
        where = "--token" if args.token else PREDICT_TOKEN_ENV
        logger.error("error: %s: the bearer token may hold only printable ASCII characters without spaces or line "
                     "breaks (no server token has others); it was not sent", where)
        return EXIT_CONFIG
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{args.url.rstrip('/')}/predict"
    try:
        response = requests.post(url, params=params, data=image, headers=headers, timeout=args.timeout)
    except requests.ConnectTimeout:  # a host that drops packets: never reached, whatever the wait
        logger.error("error: cannot reach %s: no connection within %.0f s", args.url, args.timeout)
        return EXIT_FAILED
    except requests.Timeout:
        logger.error("error: %s gave no answer within %.0f s (--timeout)", url, args.timeout)
        return EXIT_FAILED
    except requests.RequestException as err:
        logger.error("error: cannot reach %s: %s", args.url, err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200:
        error = body.get("error", body) if isinstance(body, dict) else (response.text[:500] or response.reason)
        logger.error("error %s: %s", response.status_code, error)
        return EXIT_FAILED
    try:
        print(format_predictions(body))
    except (KeyError, TypeError, ValueError, AttributeError):  # another service on that port, a proxy's page
        logger.error("error: %s answered 200 with something that is not a prediction: %s", url,
                     response.text[:200])
        return EXIT_FAILED
    return 0


def _training_stages(args, stages: list[str] | None) -> list[str]:
    """The stages the command runs that train (and lock the config's outputs while they do)."""
    if args.command == "run":
        from .pipeline import STAGES

        return [stage for stage in ("search", "train") if stage in (stages or STAGES)]
    return [args.command] if args.command in ("search", "train") else []


def _needs_ray(args, stages: list[str] | None) -> bool:
    """Whether the command runs on Ray: every command of :data:`RAY_COMMANDS` but ``run`` of the report alone."""
    return args.command in RAY_COMMANDS and not (args.command == "run" and stages == ["report"])


@contextlib.contextmanager
def _sigint_handler_kept():
    """The SIGINT handler as it was, once the command is done: a blocking command's shutdown replaces it (see
    :func:`_block_until_interrupted`), which an in-process caller (a notebook) would otherwise keep."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGINT) if in_main_thread else None
    try:
        yield
    finally:
        if in_main_thread and saved is not None:
            signal.signal(signal.SIGINT, saved)


def _serves(args, stages: list[str] | None) -> bool:
    """Whether the command starts a Serve app (``run`` does unless ``--stages`` leaves serving out)."""
    return args.command == "serve" or (args.command == "run" and "serve" in (stages or ("serve",)))


def _run_command(args, cfg: PipelineConfig, stages: list[str] | None) -> int:
    """Call the command's stage function(s) on a Ray session; the exit code says whether they succeeded."""
    from .runtime import ray_session
    from .tracking_queue import check_pending_writes

    check_pending_writes(cfg)  # a config error, before Ray starts
    training = _training_stages(args, stages)
    if training:
        from .image_folder import check_image_folder
        from .runtime import check_stages_free

        check_stages_free(cfg.paths.run_dir, training)

        # Before Ray starts: a bad file is the user's to fix, like a config error, and it must not take a
        # cluster start (or every model's retries) to find out. The stages see the result again, cached.
        check_image_folder(cfg.data)
    if _serves(args, stages) and ray_address(cfg) in (None, "local"):
        # The Ray this command starts runs no Serve yet: a port another program holds is found before Ray's
        # start (about 20 s), not after it. (On a cluster, its own Serve may hold the port: checked there.)
        from .serve import check_port_free

        check_port_free(cfg.serve, local=True)
    servable = None
    # What to serve, before Ray starts, where nothing trains first: a model not found is a config error.
    if args.command == "serve" or (args.command == "run" and "serve" in (stages or ())
                                   and not {"search", "train"} & set(stages)):
        from .serve import servable_models

        servable = servable_models(cfg)
    if args.command == "report":  # no Ray: a local one took seconds to start, a cluster's address had to answer
        from .report import report_stage

        report_stage(cfg)
        return 0
    if not _needs_ray(args, stages):  # `run` of the report alone: no Ray either
        from .pipeline import run_pipeline

        return 0 if run_pipeline(cfg, stages).ok else EXIT_FAILED
    with ray_session(cfg):
        if args.command == "run":
            from .pipeline import run_pipeline

            result = run_pipeline(cfg, stages, servable=servable)
            if result.serve is not None and not args.no_block:
                _block_until_interrupted(result.serve.url, cfg)
            return 0 if result.ok else EXIT_FAILED
        if args.command == "search":
            from .search import search_stage

            search_stage(cfg, force=args.force)
            return 0
        if args.command == "train":
            from .search import searched_coefficients
            from .train import train_stage

            return 0 if train_stage(cfg, searched_coefficients(cfg)).ok else EXIT_FAILED
        from .pipeline import log_serving_hints
        from .serve import serve_stage

        handle = serve_stage(cfg, servable)
        log_serving_hints(handle, cfg)
        if not args.no_block:
            _block_until_interrupted(handle.url, cfg)
        return 0


def _same_config(args) -> str:
    """This command's config options, for a command line the user can paste."""
    import shlex

    parts = ["--config", args.config] if args.config else []
    for override in args.overrides:
        parts += ["--set", override]
    return " ".join(shlex.quote(p) for p in parts)


def _pending_exit(args, cfg: PipelineConfig, code: int) -> int:
    """``code``, or EXIT_PENDING with one summary when MLflow has not taken every write of the stage."""
    from .tracking_queue import EXIT_PENDING, load_pending, pending_summary

    pending = load_pending(cfg.paths.run_dir, this_process=True)  # not those another running command sends
    if not pending:
        return code
    command = f"python -m pipelines register {_same_config(args)}".rstrip()
    logger.error("%s", pending_summary(pending, cfg.paths.run_dir, command))
    return code or EXIT_PENDING


#: A terminal's colour codes, which Ray puts in the tracebacks it wraps errors in.
_ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(err: BaseException, limit: int = 400) -> str:
    """The error on one line: its lines joined (the first alone often ends in "To fix this, either:"), cut
    at ``limit`` characters (a long one is for ``--debug``; this project's own errors at four times that). An
    error Ray raised for a task or actor is told by its cause: its own message is the remote traceback, cut off
    long before the cause's line."""
    for _ in range(5):  # (a cause can be wrapped again)
        cause = getattr(err, "cause", None)
        if not isinstance(cause, BaseException) or cause is err:
            break
        err = cause
    text = " ".join(line.strip() for line in _ANSI_CODES.sub("", str(err)).strip().splitlines() if line.strip())
    # This project's own errors are written to be read whole: a missing Fashion-MNIST's (about 480 characters)
    # lost its second fix, "or set data.root to ...". Others (a library's, a remote traceback) are cut.
    if type(err).__module__.split(".")[0] == __package__:  # (__name__ is "__main__" under python -m)
        limit *= 4
    if len(text) > limit:
        text = text[:limit].rstrip() + "..."
    return f"{type(err).__name__}: {text}".rstrip(": ")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_console()
    # Before anything imports Ray: it reads some of them once, at import (RAY_DEDUP_LOGS: set in ray_session, it
    # came too late, and the driver folded concurrent models' progress lines into one "[repeated 3x]").
    set_env_defaults()
    if args.command == "predict":
        return _predict(args)
    stages = None
    try:
        cfg = _load(args)
        if args.command == "run":
            from .pipeline import parse_stages

            try:
                stages = parse_stages(args.stages)
            except ValueError as err:
                raise ConfigError("--stages", str(err)) from None
        if args.command in (*RAY_COMMANDS, "report", "register"):  # (the commands that write under the workdir)
            # Only training writes to the storage: report and serve read it (a read-only mount of the cluster's)
            check_writable_locations(cfg, storage=bool(_training_stages(args, stages)))
        if _needs_ray(args, stages):
            check_ray_environment(cfg)
            if in_copy := paths_in_a_job_copy(cfg):
                logger.warning("warning: %s in the Ray job's unpacked upload (%s), a new directory for each upload "
                               "of different content: the next job would start afresh, without these runs; give "
                               "absolute paths on the nodes (README, Cluster)", ", ".join(in_copy), Path.cwd())
        if getattr(args, "no_block", False) and _serves(args, stages) and not outlives_the_command(cfg):
            raise ConfigError("--no-block", "needs a Ray cluster that outlives this command (ray.address, or run it "
                                            "as a Ray job): the local Ray it would start stops, and its Serve app "
                                            "with it, as the command returns")
    except ConfigError as err:
        logger.error("config error: %s", err)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # while the config was checked (its models built on the meta device): no traceback
        logger.error("interrupted")
        return EXIT_INTERRUPTED
    if args.command == "check-config":
        print(cfg.to_yaml(), end="")
        # The resolved YAML is the command's output (stdout, pipeable); the verdict goes beside it.
        # Unset keys print as null above: what they resolve to is said here (the password masked).
        from .planning import family_members

        members = family_members(cfg)  # (run trains them beside train.models: "7 models" for 9 trained)
        # ("up to": with search.compare_paper, a search that finds the paper's triple trains one family)
        family = f" and up to {len(members)} EfficientNet family member(s) of the search" if members else ""
        print(f"# config OK: {len(cfg.train.models)} model(s){family}, dataset {cfg.data.dataset}, "
              f"outputs in {cfg.paths.run_dir}, tracking {redact_uri(cfg.tracking_uri)}, registered model "
              f"{cfg.registered_model_name}", file=sys.stderr)
        return 0
    from .image_folder import ImageFolderError

    try:
        if args.command == "register":
            from .tracking_queue import send_pending

            sent = send_pending(cfg)
            return _pending_exit(args, cfg, EXIT_FAILED if sent.unregistered else 0)
        with _sigint_handler_kept():
            code = _run_command(args, cfg, stages)
        return _pending_exit(args, cfg, code)
    except ImageFolderError as err:  # bad input, like a config error: exit 2 (bad files: with their list)
        logger.error("data error: %s", err)
        return EXIT_CONFIG
    except ConfigError as err:  # found once a stage looks at what earlier runs left (a pending file's store)
        logger.error("config error: %s", err)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        logger.error("interrupted; re-run the same command to resume")
        return _pending_exit_after_failure(args, cfg, EXIT_INTERRUPTED)
    except Exception as err:  # noqa: BLE001 - every stage failure ends in one line and exit 1
        if args.debug:  # through the console's formatter, which masks a password the traceback quotes
            logger.exception("error: %s", _one_line(err))
        else:
            logger.error("error: %s (run with --debug for the traceback)", _one_line(err))
        return _pending_exit_after_failure(args, cfg, EXIT_FAILED)


def _pending_exit_after_failure(args, cfg: PipelineConfig, code: int) -> int:
    """``code``, after saying which writes a failed or interrupted stage left pending and how to send them (they
    go out with the next command of the config, which a user who does not re-run never learned)."""
    try:
        return _pending_exit(args, cfg, code)
    except Exception as err:  # noqa: BLE001 - the stage's own error is the one to end on
        logger.debug("could not read the pending writes: %s", err)
        return code


if __name__ == "__main__":
    sys.exit(main())
