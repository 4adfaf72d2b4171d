"""The cluster head's MLflow store: where it comes from, and the sqlite fallback's backups in the bucket.

``cluster.yaml`` keeps the registry (runs, versions, aliases; the artifacts are in S3 already) across
``ray down`` in one of two ways:

* The documented setup: a managed PostgreSQL. Its URI (``postgresql+psycopg://...``, a secret) is kept in
  AWS SSM Parameter Store; :func:`fetch_backend_uri` writes it on the head into a file only its owner
  reads, from which the head's shell exports ``CNNZOO_MLFLOW_BACKEND_URI`` for the tracking server.
* Without that parameter: sqlite on a host volume of the head. The volume outlives the container (a second
  ``ray up``) but not the instance, and ``ray down`` runs no command of ours before it terminates the head
  (Ray's launcher only runs ``ray stop`` there). So the head :func:`restore` s the last backup when it
  starts without a database, :func:`backup` s it periodically while it runs, and the README's
  ``ray exec cluster.yaml 'python -m pipelines.mlflow_state backup'`` before ``ray down`` takes the last one.

Every new head installs the newest MLflow the project admits, while the store outlives the cluster: a store
written by an older MLflow has an older schema, which the server refuses to start on. :func:`upgrade` migrates
it first (with a copy of a sqlite store beside it), and :func:`wait_until_serving` makes ``ray up`` fail, with
the server's log, when the server does not come up, instead of the first job failing later.

Run on the head: ``python -m pipelines.mlflow_state {backup,restore,upgrade,wait,stop,fetch-backend-uri} ...``.
Exit codes: 0 done (or nothing to do), 1 failed, 2 a missing setting.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sqlite3
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

__all__ = ["backup", "restore", "upgrade", "wait_until_serving", "stop_services", "fetch_backend_uri", "main"]

logger = logging.getLogger(__name__)

#: Where cluster.yaml's head keeps the sqlite fallback (the host volume mounted into the container).
DEFAULT_DB = "/home/ray/mlflow/mlflow.db"


def _filesystem(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def backup(db: Path, uri: str) -> int:
    """Copy the sqlite database ``db`` to ``uri`` (``s3://bucket/key`` or an absolute local path); returns
    its size in bytes.

    The copy is taken with sqlite's online backup API, so a server writing meanwhile cannot leave a torn
    file; it is uploaded beside the target and then moved over it, so an interrupted upload never replaces
    the previous backup."""
    if not db.is_file():
        raise FileNotFoundError(f"no sqlite database at {db}")
    filesystem, path = _filesystem(uri)
    with tempfile.TemporaryDirectory(dir=db.parent) as scratch:
        snapshot = Path(scratch) / db.name
        _snapshot(db, snapshot)
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        partial = f"{path}.partial-{uuid.uuid4().hex}"  # two backups at once (the loop, a manual one) each their own
        try:
            with snapshot.open("rb") as data, filesystem.open_output_stream(partial) as out:
                while chunk := data.read(1 << 20):
                    out.write(chunk)
            filesystem.move(partial, path)
        except BaseException:
            # A stream's close writes out what it was given, so an upload cut short (the loop's SIGTERM at `ray
            # up`, the network) left a truncated object under a fresh name at every attempt, never deleted.
            with contextlib.suppress(Exception):
                filesystem.delete_file(partial)
            raise
        return snapshot.stat().st_size


def restore(db: Path, uri: str) -> bool:
    """Download the backup at ``uri`` to ``db`` if there is no database there yet; returns whether it did.

    An existing database is never replaced: it is at least as new as any backup taken from it."""
    import pyarrow.fs

    if db.exists():
        return False
    filesystem, path = _filesystem(uri)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return False
    db.parent.mkdir(parents=True, exist_ok=True)
    partial = db.with_name(db.name + ".restoring")
    with filesystem.open_input_stream(path) as stream, partial.open("wb") as out:
        while chunk := stream.read(1 << 20):
            out.write(chunk)
    check = sqlite3.connect(_read_only_uri(partial), uri=True)
    try:
        verdict = check.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as err:  # not sqlite at all: "file is not a database"
        verdict = str(err)
    finally:
        check.close()
    if verdict != "ok":
        partial.unlink()
        raise RuntimeError(f"the backup at {uri} is not a sound sqlite database ({verdict})")
    os.replace(partial, db)
    return True


def _read_only_uri(db: Path) -> str:
    """sqlite's read-only URI of the file ``db``, percent-encoded: a ``#`` in the path (``/data/run#2``) cut it
    there, and sqlite opened (created) an empty database at the part before it."""
    return f"{db.resolve().as_uri()}?mode=ro"


def _snapshot(db: Path, target: Path) -> None:
    """A consistent copy of the sqlite database ``db`` at ``target`` (sqlite's online backup API)."""
    source = sqlite3.connect(_read_only_uri(db), uri=True)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()


def _sqlite_schema_revision(db: Path) -> str | None:
    """The Alembic revision of the sqlite MLflow store ``db``; None for a database without one (no tables yet)."""
    connection = sqlite3.connect(_read_only_uri(db), uri=True)
    try:
        row = connection.execute("select version_num from alembic_version").fetchone()
    except sqlite3.DatabaseError:  # no such table (an empty file), or not a database: MLflow's upgrade says
        return None
    finally:
        connection.close()
    return row[0] if row else None


def _known_revision(revision: str) -> bool:
    """Whether the installed MLflow's migrations hold the Alembic ``revision``."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    try:
        return ScriptDirectory.from_config(_get_alembic_config("")).get_revision(revision) is not None
    except Exception:  # noqa: BLE001 - alembic raises its own errors for an unknown or malformed revision
        return False


def upgrade(backend_uri: str) -> str | None:
    """Migrate the MLflow store at ``backend_uri`` to the installed MLflow's schema (what ``mlflow db upgrade``
    does; an empty database gets its tables), in this process, so a password in the URI stays off every
    command line. A sqlite store a migration is pending for is copied to
    ``<db>.before-upgrade-<its revision>-<time>`` first (migrations are not transactional; earlier copies stay:
    after a migration that failed partway, the one from before it is the copy to go back to). A store at a
    revision this MLflow does not know (a newer MLflow migrated it) is refused, copied or changed in nothing.
    Returns the copy's path, or None (no sqlite file yet, a store already at the installed schema, or another
    database: back it up yourself)."""
    from mlflow.db import upgrade as mlflow_db_upgrade
    from mlflow.store.db.utils import _get_latest_schema_revision

    copy = None
    if backend_uri.startswith("sqlite:///"):
        db = Path(backend_uri.removeprefix("sqlite:///").split("?", 1)[0])
        # Only before a migration: the head runs this at every start, and a copy of the migrated store made at
        # the next `ray up` replaced the only one from before the migration.
        revision = _sqlite_schema_revision(db) if db.is_file() else None
        if revision is not None and not _known_revision(revision):
            import mlflow

            raise RuntimeError(f"{db} is at schema revision {revision}, which MLflow {mlflow.__version__} does not "
                               "know: a newer MLflow migrated it; install at least that version here (README, "
                               "Cluster: pin no MLflow older than the one that last migrated the store)")
        if db.is_file() and revision != _get_latest_schema_revision():
            stamp = time.strftime("%Y%m%dT%H%M%S")
            copy = db.with_name(f"{db.name}.before-upgrade-{revision or 'unversioned'}-{stamp}")
            _snapshot(db, copy)
    mlflow_db_upgrade.callback(url=backend_uri)
    return str(copy) if copy else None


def wait_until_serving(url: str, timeout_s: float, log: Path | None = None) -> float:
    """Poll the tracking server's ``/health`` at ``url`` until it answers 200; returns the seconds waited.
    Raises TimeoutError, with the last lines of the server's ``log``, when it does not within ``timeout_s``."""
    start = time.monotonic()
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5) as answer:
                if answer.status == 200:
                    return time.monotonic() - start
                last = f"HTTP {answer.status}"
        except (OSError, urllib.error.URLError) as err:  # refused while it starts; HTTPError is a URLError
            last = str(err)
        if time.monotonic() - start >= timeout_s:
            tail = ""
            if log is not None and log.is_file():
                lines = log.read_text(errors="replace").splitlines()[-40:]
                tail = f"; the last lines of {log}:\n" + "\n".join(lines)
            raise TimeoutError(f"the MLflow server at {url} did not answer /health within {timeout_s:g} s "
                               f"({last}){tail}")
        time.sleep(1.0)


#: What the head's start commands stop before they start the tracking server and the backup loop again (a
#: second `ray up` on a running head): command lines holding one of these.
HEAD_SERVICES = ("mlflow server", "pipelines.mlflow_state backup")
#: How long :func:`stop_services` lets them shut down before it kills them and what they started.
STOP_TIMEOUT_S = 15.0


def _stat(pid: int | str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (which may hold spaces and parentheses):
    state, parent pid, ...; [] when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def stop_services(patterns: tuple[str, ...] | None = None, timeout_s: float | None = None) -> list[int]:
    """Stop the processes whose command line holds one of ``patterns`` (default :data:`HEAD_SERVICES`), but
    this process and its ancestors: SIGTERM, then, after ``timeout_s`` (default :data:`STOP_TIMEOUT_S`),
    SIGKILL for them and every process they had started (MLflow's server forwards SIGTERM to its uvicorn, which
    holds the port and would outlive a killed parent). Returns the pids signalled. Read from Linux's /proc: the
    Ray image may lack pkill (procps), whose failure the start commands could only ignore, leaving a second
    server and backup loop beside the first. A process this user may not signal is skipped with a warning."""
    import signal

    patterns = patterns or HEAD_SERVICES
    timeout_s = STOP_TIMEOUT_S if timeout_s is None else timeout_s
    spared = {os.getpid()}
    pid = os.getpid()
    while pid > 1:  # the shell running this command: its own command line may quote a pattern
        fields = _stat(pid)
        if len(fields) < 2:
            break
        pid = int(fields[1])
        spared.add(pid)
    children: dict[int, list[int]] = {}
    matched = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(entry.name)
        if len(fields) >= 2:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
        if int(entry.name) in spared:
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if any(pattern in command for pattern in patterns):
            matched.append(int(entry.name))
    family, stack = set(), list(matched)  # the matched processes and their descendants, before any exits
    while stack:
        pid = stack.pop()
        if pid not in family and pid not in spared:
            family.add(pid)
            stack += children.get(pid, [])
    signalled = []
    for pid in matched:
        try:
            os.kill(pid, signal.SIGTERM)
            signalled.append(pid)
        except ProcessLookupError:
            pass
        except PermissionError:
            logger.warning("cannot stop process %d (another user's): %s", pid, " / ".join(patterns))
    family &= {p for pid in signalled for p in _descendants_in(pid, family, children)}
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in family:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return signalled


def _descendants_in(pid: int, family: set[int], children: dict[int, list[int]]) -> set[int]:
    """``pid`` and its descendants (as /proc showed them before any signal)."""
    found, stack = set(), [pid]
    while stack:
        current = stack.pop()
        if current in family and current not in found:
            found.add(current)
            stack += children.get(current, [])
    return found


def fetch_backend_uri(parameter: str, out: Path, region: str | None = None) -> bool:
    """Write the SecureString SSM ``parameter`` (the backend store URI) to ``out``, readable by its owner only;
    returns False, and removes ``out``, when the parameter does not exist (the sqlite fallback then applies).
    Any other error (no permission, no network) raises: silently falling back would split the registry."""
    import boto3

    client = boto3.client("ssm", region_name=region)
    try:
        value = client.get_parameter(Name=parameter, WithDecryption=True)["Parameter"]["Value"].strip()
    except client.exceptions.ParameterNotFound:
        out.unlink(missing_ok=True)
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not followed if a link; narrowed before the secret is written (an older file keeps its mode through O_CREAT).
    descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(value + "\n")
    return True


def _setting(value: str | None, option: str, env: str) -> str:
    value = value or os.environ.get(env)
    if not value:
        print(f"error: {option} (or ${env}) is not set", file=sys.stderr)
        raise SystemExit(2)
    return value


def main(argv: list[str] | None = None) -> int:
    """The command line: ``backup``, ``restore``, ``upgrade``, ``wait``, ``stop`` and ``fetch-backend-uri`` (see
    the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.mlflow_state", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, verb in (("backup", "copy the sqlite store to"), ("restore", "restore a missing store from")):
        command = commands.add_parser(name, help=f"{verb} the bucket")
        command.add_argument("--db", default=None, help=f"the sqlite file (default $CNNZOO_MLFLOW_DB or {DEFAULT_DB})")
        command.add_argument("--uri", default=None, help="the backup's s3:// URI (default $CNNZOO_MLFLOW_BACKUP_URI)")
    migrate = commands.add_parser("upgrade", help="migrate the store to this MLflow's schema (before the server "
                                                  "starts)")
    migrate.add_argument("--db", default=None, help="the sqlite file when $CNNZOO_MLFLOW_BACKEND_URI is not set "
                                                    f"(default $CNNZOO_MLFLOW_DB or {DEFAULT_DB})")
    wait = commands.add_parser("wait", help="wait until the tracking server answers, else show its log (exit 1)")
    wait.add_argument("--url", required=True, help="the server's address, e.g. http://10.0.0.5:5000")
    wait.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
    wait.add_argument("--log", type=Path, default=None, help="the server's log, shown when it does not answer")
    commands.add_parser("stop", help="stop the tracking server and the backup loop (before starting them again)")
    fetch = commands.add_parser("fetch-backend-uri", help="write the backend store URI from SSM to a private file")
    fetch.add_argument("--parameter", required=True, help="the SSM parameter name, e.g. /cnnzoo/mlflow-backend-uri")
    fetch.add_argument("--out", required=True, type=Path, help="the file to write it to (mode 0600)")
    fetch.add_argument("--region", default=None, help="the AWS region (default: boto3's)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch-backend-uri":
            found = fetch_backend_uri(args.parameter, args.out, args.region)
            print(f"MLflow backend store: the URI in SSM parameter {args.parameter} (in {args.out})" if found
                  else f"no SSM parameter {args.parameter}: the MLflow server uses the sqlite fallback")
            return 0
        if args.command == "stop":
            stopped = stop_services()
            print(f"stopped {len(stopped)} process(es) of the tracking server and the backup loop" if stopped
                  else "no tracking server or backup loop was running")
            return 0
        if args.command == "wait":
            waited = wait_until_serving(args.url, args.timeout, args.log)
            print(f"the MLflow server at {args.url} answers (after {waited:.0f} s)")
            return 0
        if args.command == "upgrade":
            managed = os.environ.get("CNNZOO_MLFLOW_BACKEND_URI")
            db = Path(args.db or os.environ.get("CNNZOO_MLFLOW_DB") or DEFAULT_DB)
            copy = upgrade(managed or f"sqlite:///{db}")
            print("MLflow store at this MLflow's schema: " + ("$CNNZOO_MLFLOW_BACKEND_URI" if managed else str(db))
                  + (f" (its copy from before: {copy})" if copy else ""))
            return 0
        if os.environ.get("CNNZOO_MLFLOW_BACKEND_URI"):
            print(f"{args.command}: the MLflow backend store is $CNNZOO_MLFLOW_BACKEND_URI (a managed database), "
                  "nothing to do")
            return 0
        db = Path(args.db or os.environ.get("CNNZOO_MLFLOW_DB") or DEFAULT_DB)
        uri = _setting(args.uri, "--uri", "CNNZOO_MLFLOW_BACKUP_URI")
        if args.command == "backup":
            import signal

            # `mlflow_state stop` (a second `ray up`) sends SIGTERM: exit through the cleanup (the scratch
            # snapshot on the host volume) instead of leaving it behind.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            size = backup(db, uri)
            print(f"backed up {db} ({size / 1e6:.1f} MB) to {uri}")
        elif restore(db, uri):
            print(f"restored {db} from {uri}")
        else:
            print(f"not restored: {db} exists" if db.exists() else f"no backup at {uri}: starting an empty store")
        return 0
    except Exception as error:  # noqa: BLE001 - one line for the setup log, exit 1
        message = str(error)
        if managed_uri := os.environ.get("CNNZOO_MLFLOW_BACKEND_URI"):  # a driver's error may quote its password
            from .config import redact_uri

            message = message.replace(managed_uri, redact_uri(managed_uri))
        print(f"error: {args.command} failed: {type(error).__name__}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
