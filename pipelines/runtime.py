"""Starting Ray for a pipeline command, and sizing work to the cluster."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, PipelineConfig, ray_address

__all__ = ["ray_session", "cluster_resources", "free_resources", "free_per_node", "concurrency_for", "on_this_node",
           "check_workers_fit", "node_cpus", "cpus_to_share", "exclusive_stage", "check_stages_free", "StageBusyError"]

logger = logging.getLogger(__name__)

# Quiet, deterministic defaults for a command-line tool (users can still override them).
_ENV_DEFAULTS = {
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    # Tune's own SIGINT handler turns the first Ctrl-C into a graceful stop whose fit() returns normally: the
    # stage would then mark half-trained models as done (and `run` go on to serve them) and exit 0. Without
    # it, Ctrl-C raises KeyboardInterrupt: exit 130, and a re-run resumes from the last checkpoints.
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
}
#: For the processes of a local Ray. Train's print patch would print every worker line twice on the console.
#: Train's controller collects each report on its poll (default every 2 s) and a worker's next report waits
#: for that: with epochs of a few seconds (small data on a laptop) a 0.5 s poll saves a lot of idle time.
#: The preemption watcher (one more process per training run) only matters on spot instances.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
              "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def worker_env() -> dict[str, str]:
    """:data:`WORKER_ENV` less what the user set: a runtime_env's variables override the processes' own."""
    return {key: os.environ.get(key, value) for key, value in WORKER_ENV.items()}


def set_env_defaults(console_is_a_terminal: bool | None = None) -> None:
    """Ray's settings of :data:`_ENV_DEFAULTS` where the user has not set them; and, with the console not a
    terminal (a log file, `ray job logs`, CI), Ray's worker-line prefixes without colour codes: they reached
    such logs as raw escape sequences (``\x1b[36m(RayTrainWorker pid=...)``)."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if console_is_a_terminal is None:
        console_is_a_terminal = sys.stdout.isatty() and sys.stderr.isatty()
    if not console_is_a_terminal:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


@contextlib.contextmanager
def ray_session(cfg: PipelineConfig) -> Iterator[None]:
    """Connect to ``ray.address`` (or start a local Ray) for the duration of a command.

    If Ray is already initialised in this process (tests, notebooks), it is used as it is and left running.
    """
    set_env_defaults()  # before Ray's import: it reads RAY_DEDUP_LOGS once, then
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs = {"include_dashboard": cfg.ray.include_dashboard, "logging_level": logging.WARNING,
              "configure_logging": True}
    address = ray_address(cfg)
    if address in (None, "local"):  # a Ray this command starts: sized and set up by the config
        # "local", not None: None would join any `ray start` cluster on this machine, with other settings.
        address = "local"
        kwargs.update(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus,
                      runtime_env={"env_vars": worker_env()})
    ray.init(address=address, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def on_this_node():
    """A scheduling strategy that keeps an actor on the node of the calling process.

    A stage's helper actors (the compute gate, the shared-data cache) serve every trial of the stage; the
    stage's driver runs on the head, and there they cannot be lost with a spot worker, as they could be
    wherever Ray's default placement happened to put them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def cluster_resources(available: bool = False) -> dict[str, float]:
    """Total (or currently unclaimed) resources of the running Ray cluster; CPU and GPU default to 0."""
    import ray

    resources = ray.available_resources() if available else ray.cluster_resources()
    return {"CPU": float(resources.get("CPU", 0.0)), "GPU": float(resources.get("GPU", 0.0))}


def free_resources(settle_s: float = 8.0) -> dict[str, float]:
    """The cluster's unclaimed CPU/GPU, once the previous stage's actors have handed theirs back.

    Right after a Tune run ends, its trial and Train actors are still being torn down and
    ``ray.available_resources()`` under-reports for a second or two; sizing the next stage on that reading
    would crowd every model onto a sliver of CPU. So poll for up to ``settle_s`` seconds, returning as soon
    as everything is free, else the most seen (a long-lived Serve app legitimately keeps its share).
    """
    total = cluster_resources()
    best = cluster_resources(available=True)
    started = last_change = time.monotonic()
    while any(best[key] < total[key] - 1e-6 for key in total):
        now = time.monotonic()
        if now - started > settle_s or now - last_change > 2.0:  # 2 s without a release: settled
            break
        time.sleep(0.25)
        reading = cluster_resources(available=True)
        if any(reading[key] > best[key] + 1e-6 for key in best):
            last_change = time.monotonic()
        best = {key: max(best[key], reading[key]) for key in best}
    return best


class StageBusyError(RuntimeError):
    """Another command is running the same stage of the same config."""


@contextlib.contextmanager
def exclusive_stage(run_dir: Path, stage: str) -> Iterator[None]:
    """Hold the lock of ``stage`` of the config whose outputs are in ``run_dir`` (its name and workdir) for as
    long as it runs; StageBusyError at once when another command holds it. Two commands of one config (a job
    submitted twice) shared the Train run directories: each resumed from the other's checkpoints while its
    checkpoint pruning deleted the other's, and every model was registered twice. The lock goes with the
    process, however it ends."""
    from filelock import FileLock, Timeout

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / f".{stage}.lock"))
    borrowed = None  # another user's lock file, locked through a read-only descriptor
    try:
        lock.acquire(timeout=0)
        locked = True
    except Timeout:
        raise StageBusyError(_busy(run_dir, stage)) from None
    except PermissionError as err:  # another user's lock file (a shared workdir): not to be run beside unguarded
        borrowed, locked = _lock_of_another_users_file(run_dir, stage, err), False
    except (OSError, NotImplementedError) as err:  # a filesystem without locks (NFSv3 without lockd): unguarded
        logger.warning("[%s] %s cannot be locked (%s); nothing stops a second command of this config from running "
                       "this stage at the same time", stage, run_dir, err)
        locked = False
    try:  # (outside the except: the stage's own errors are not chained to the lock's)
        yield
    finally:
        if locked:
            lock.release()
        if borrowed is not None:
            os.close(borrowed)  # (its lock goes with it)


def _lock_of_another_users_file(run_dir: Path, stage: str, err: OSError) -> int | None:
    """The lock file another user left (theirs, or any in a sticky directory), opened read-only and locked
    exclusively for the stage (flock locks a file whatever its open mode): every other command, theirs or this
    user's, is kept out meanwhile. Refused as busy while one holds it: read as a filesystem without locks, the
    stage ran beside theirs. None on a filesystem without locks (said, and run unguarded, as for one's own)."""
    import errno
    import fcntl

    try:
        fd = os.open(run_dir / f".{stage}.lock", os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        raise StageBusyError(_not_ours(run_dir, stage, err)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StageBusyError(_busy(run_dir, stage)) from None
    except OSError as flock_err:
        os.close(fd)
        if flock_err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):  # (NFSv3 without lockd)
            logger.warning("[%s] %s cannot be locked (%s); nothing stops a second command of this config from "
                           "running this stage at the same time", stage, run_dir, flock_err)
            return None
        raise StageBusyError(_not_ours(run_dir, stage, err)) from None
    return fd


def _busy(run_dir: Path, stage: str) -> str:
    # (Another workdir alone does not do where storage_path is set: Ray keeps the runs there by name.)
    return (f"another command is running the {stage} stage of this config ({run_dir}); wait for it to end, or give "
            "this one another name")


def _not_ours(run_dir: Path, stage: str, err: OSError) -> str:
    return (f"the lock of the {stage} stage of this config cannot be opened or locked ({err.strerror or err}: "
            f"{err.filename or run_dir}), another user's file: a command of theirs may be running the stage; two "
            "at once would share their checkpoints. Make it readable to this user, or give this one another name "
            "and workdir")


def check_stages_free(run_dir: Path, stages: Iterable[str]) -> None:
    """StageBusyError at once when another command holds the lock of one of ``stages`` of this config: called
    before Ray starts, which took about 24 s before the stage found its lock held. The stage takes its lock
    again when it begins (:func:`exclusive_stage`); a filesystem without locks is said there."""
    from filelock import FileLock, Timeout

    if not run_dir.is_dir():  # nothing has run here yet: nothing to hold a lock
        return
    for stage in stages:
        lock = FileLock(str(run_dir / f".{stage}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise StageBusyError(_busy(run_dir, stage)) from None
        except PermissionError as err:
            if (fd := _lock_of_another_users_file(run_dir, stage, err)) is not None:
                os.close(fd)
            continue
        except (OSError, NotImplementedError):
            continue
        lock.release()


def free_per_node() -> list[dict[str, float]]:
    """The CPU and GPU free now on each alive node of the running Ray: a worker's CPUs and GPU share must all be
    on one of them."""
    import ray

    try:
        from ray._private.state import available_resources_per_node  # a DeveloperAPI, so guarded

        nodes = list(available_resources_per_node().values())
    except (ImportError, AttributeError):
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    return [{"CPU": float(node.get("CPU", 0.0)), "GPU": float(node.get("GPU", 0.0))} for node in nodes]


def node_cpus() -> list[float]:
    """The CPUs free now on each alive node of the running Ray (a worker's CPUs must all be on one of them): a
    share sized to the nodes' totals fitted nowhere once a Serve replica held one CPU on each, and the run
    waited for good (Ray Train retries a worker group it cannot place without end)."""
    # (a head started with --num-cpus=0, Ray's advice for clusters, holds none)
    return [node["CPU"] for node in free_per_node() if node["CPU"] > 0]


def cpus_to_share(train, free_cpus: float, stage: str) -> tuple[float, list[float]]:
    """The CPUs (in all, and on each node) that ``train.cpus_per_worker: auto`` divides among a CPU run's
    workers (:func:`~pipelines.planning.auto_cpus_per_worker`): those free now; but when next to none are, the
    CPUs of the nodes there are and of the node types the autoscaler can add (the run then waits for them).

    An autoscaling cluster at zero workers (its head runs no work, as Ray advises) had no CPU free when a stage
    began: every worker got a quarter of a CPU and one thread, all runs fitted onto the first node that joined,
    and the autoscaler saw no demand for more."""
    free_nodes = node_cpus()
    if train.cpus_per_worker != "auto" or train.use_gpu:
        return free_cpus, free_nodes
    return cpu_sharing_basis(free_cpus, free_nodes, node_shapes()[0], train.num_workers, stage)


def cpu_sharing_basis(free_cpus: float, free_nodes: list[float], shapes: list[dict[str, float]], num_workers: int,
                      stage: str) -> tuple[float, list[float]]:
    """:func:`cpus_to_share` on given readings: ``shapes``, the totals of each node and node type
    (:func:`node_shapes`)."""
    if free_cpus - 0.05 >= 0.01 * num_workers:  # enough free to split (auto_cpus_per_worker's own floor)
        return free_cpus, free_nodes
    totals = [shape.get("CPU", 0.0) for shape in shapes if shape.get("CPU", 0.0) > 0.05]
    if not totals:
        return free_cpus, free_nodes
    logger.info("[%s] no CPUs are free now; train.cpus_per_worker 'auto' shares those of the nodes (%s CPUs), which "
                "each run then waits for (an autoscaling cluster adds nodes)", stage,
                ", ".join(f"{cpus:g}" for cpus in totals))
    return sum(totals), totals


def requests_fitting(free: float, need: float, resource: str = "CPU") -> int:
    """How many requests of ``need`` of ``resource`` the ``free`` amount holds. A GPU share below one is placed
    on one GPU, never split across two: 8 GPUs hold 16 shares of 0.4, not 20 (a partly used GPU, as a Serve
    replica's quarter leaves one, counts for what is left on it)."""
    if resource != "GPU" or need >= 1.0:
        return math.floor((free + 1e-9) / need)
    whole = math.floor(free + 1e-9)
    return whole * math.floor(1.0 / need + 1e-9) + math.floor((free - whole + 1e-9) / need)


def worker_need(workers) -> dict[str, float]:
    """What one worker of ``workers`` (a :class:`~pipelines.planning.WorkerSettings`) reserves: its CPUs, and its
    GPU share with ``use_gpu``; only what is above zero."""
    need = {"CPU": float(workers.cpus_per_worker), "GPU": float(workers.gpus_per_worker) if workers.use_gpu else 0.0}
    return {key: value for key, value in need.items() if value > 0}


def worker_slots(node: dict[str, float], need: dict[str, float]) -> int:
    """How many workers of ``need`` (:func:`worker_need`, not empty) the resources ``node`` lists hold."""
    return min(requests_fitting(node.get(key, 0.0), value, key) for key, value in need.items())


def runs_fitting_nodes(workers, nodes: list[dict[str, float]]) -> int:
    """How many runs of ``workers`` (a :class:`~pipelines.planning.WorkerSettings`) the free resources of
    ``nodes`` (:func:`free_per_node`) hold at once, node by node: a worker's CPUs and GPU share are all on one
    node, under STRICT_PACK all of a run's workers, under STRICT_SPREAD each of a run's workers on another node.
    The cluster's totals counted a CPU-only head's CPUs for GPU workers, and CPUs spread over nodes that no one
    node holds: runs waited that "auto" counted on."""
    need = worker_need(workers)
    if not need:
        return 1 << 30
    slots = [worker_slots(node, need) for node in nodes]
    if workers.placement_strategy == "STRICT_PACK":
        return sum(slot // workers.num_workers for slot in slots)
    if workers.placement_strategy == "STRICT_SPREAD":  # k runs fit iff the nodes give each a slot on k of them
        runs, most = 0, sum(slots) // workers.num_workers
        while runs < most and sum(min(slot, runs + 1) for slot in slots) >= (runs + 1) * workers.num_workers:
            runs += 1
        return runs
    return sum(slots) // workers.num_workers


def concurrency_for(requested: int | str, per_trial: dict[str, float], trials: int,
                    free: dict[str, float] | None = None, gate_capacity: int | None = None, workers=None,
                    nodes: list[dict[str, float]] | None = None) -> int:
    """How many trials run at once: ``requested``, or (``"auto"``) as many as the cluster fits now.

    ``workers`` (a trial's :class:`~pipelines.planning.WorkerSettings`): also counted node by node
    (:func:`runs_fitting_nodes` on ``nodes``, by default the free resources of each node now). Warns when not
    even one trial fits the currently free resources: it will wait for them (an autoscaling cluster adds nodes;
    a fixed one needs other work to finish first); says when fewer fit than ``requested``. With a compute gate
    of ``gate_capacity`` (overlapped start-up), at most one trial beyond it: a further one waited for CPUs, took
    those of a gate holder whose workers restarted after a failure, and then waited at the gate for the holder,
    which waited for its CPUs, for good.
    """
    return min(_concurrency(requested, per_trial, trials, free, workers, nodes),
               gate_capacity + 1 if gate_capacity else trials)


def _concurrency(requested: int | str, per_trial: dict[str, float], trials: int,
                 free: dict[str, float] | None, workers, nodes: list[dict[str, float]] | None) -> int:
    free = free if free is not None else free_resources()
    fits = [requests_fitting(free.get(key, 0.0), need, key) for key, need in per_trial.items() if need > 0]
    if fits and min(fits) < 1:
        wanted = ", ".join(f"{need:g} {key}" for key, need in per_trial.items() if need > 0)
        have = ", ".join(f"{free.get(key, 0.0):g} {key}" for key, need in per_trial.items() if need > 0)
        logger.warning("warning: one run needs %s but only %s are free now; it waits until they are "
                       "(on a fixed cluster, lower train.num_workers or train.cpus_per_worker)", wanted, have)
    elif workers is not None:
        nodes = free_per_node() if nodes is None else nodes
        on_nodes = runs_fitting_nodes(workers, nodes)
        if nodes and on_nodes < 1:
            each = f"{workers.cpus_per_worker:g} CPU" + (f", {workers.gpus_per_worker:g} GPU" if workers.use_gpu
                                                         else "")
            count, strategy = workers.num_workers, workers.placement_strategy
            wanted = {"STRICT_PACK": f"{count} x ({each}) on one node",
                      "STRICT_SPREAD": f"{count} nodes with {each} each"}.get(
                strategy, f"{count} x ({each}), each worker's on one node" if count > 1 else f"{each} on one node")
            logger.warning("warning: a run needs %s (train.placement_strategy %s), and the free resources do not "
                           "hold that now (free on each node: %s); it waits until they do (on a fixed cluster, "
                           "lower train.num_workers, train.cpus_per_worker, data.loader_workers or the GPU share)",
                           wanted, strategy, "; ".join(f"{node['CPU']:g} CPU, {node['GPU']:g} GPU" for node in nodes))
        fits.append(on_nodes)
    fitting = max(1, min([trials] + fits))
    if requested != "auto":
        asked = max(1, min(int(requested), trials))
        if asked > fitting:
            logger.info("%d runs at a time asked; %d fit the free resources now, the others wait for theirs (an "
                        "autoscaling cluster adds nodes)", asked, fitting)
        return asked
    return fitting


def node_shapes() -> tuple[list[dict[str, float]], bool]:
    """The resource totals of each node the running Ray has, and of each node type its autoscaler can add;
    and whether that list is known to be complete (a Ray with an autoscaler's config, or one this command
    started). A Ray joined without an autoscaler's config may still grow (nodes started by hand): not complete."""
    import ray

    shapes = [{key: float(value) for key, value in node["Resources"].items()}
              for node in ray.nodes() if node.get("Alive")]
    addable = addable_node_types()
    return shapes + (addable or []), ray_started_here() or addable is not None


#: Where `ray up` leaves the autoscaler's config on the head (JSON, its node types' resources filled in).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def addable_node_types(bootstrap_config: str = BOOTSTRAP_CONFIG) -> list[dict[str, float]] | None:
    """The resources of each node type the running Ray's autoscaler can add; None when there is no autoscaler
    this code can see. From the GCS's cluster config (KubeRay, autoscaler v2), else from the config `ray up`
    leaves on the head (the GCS holds none for a `ray up` cluster in open-source Ray: cluster.yaml's GPU workers,
    at zero when a stage starts, went uncounted)."""
    groups = addable_node_groups(bootstrap_config)
    return None if groups is None else [shape for shape, _ in groups.types]


@dataclass(frozen=True)
class NodeGroups:
    """The node types an autoscaler can add: each one's resources and the most nodes of it (None: no limit), and
    the most worker nodes in all (None: no limit)."""

    types: list[tuple[dict[str, float], int | None]]
    max_workers: int | None


def addable_node_groups(bootstrap_config: str = BOOTSTRAP_CONFIG) -> NodeGroups | None:
    """:func:`addable_node_types` with how many nodes of each type, and in all, the autoscaler may run."""
    try:
        from ray._private.state import state  # the autoscaler's node types: a DeveloperAPI, so guarded

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - another Ray's internals: what the nodes say must do
        config = None
    if config is not None:
        return NodeGroups([({key: float(value) for key, value in group.resources.items()},
                            group.max_count if group.max_count >= 0 else None)
                           for group in config.node_group_configs if group.max_count != 0], None)
    path = Path(bootstrap_config).expanduser()
    if ray_started_here() or not path.is_file():
        return None
    try:
        import yaml  # (JSON is YAML)

        launcher = yaml.safe_load(path.read_text())
        types = launcher["available_node_types"]
        limit = launcher.get("max_workers")
        return NodeGroups([({key: float(value) for key, value in (spec.get("resources") or {}).items()},
                            int(spec["max_workers"]))
                           for name, spec in types.items()
                           if name != launcher.get("head_node_type") and int(spec.get("max_workers", 0)) > 0],
                          int(limit) if limit is not None else None)
    except Exception as err:  # noqa: BLE001 - unreadable: as if there were none
        logger.debug("cannot read %s: %s", path, err)
        return None


#: The resource only the head node has.
HEAD_RESOURCE = "node:__internal_head__"


def most_workers_placeable(need: dict[str, float], spread: bool, alive: list[dict[str, float]],
                           groups: NodeGroups | None) -> int | None:
    """How many workers of ``need`` (CPU, GPU) the cluster can ever hold at once: on its ``alive`` nodes (their
    totals) and on the nodes its autoscaler may add (``groups``: each type up to its count, less the alive nodes
    of its shape, and all within the cluster's cap on worker nodes); with ``spread`` (STRICT_SPREAD) one per node.
    None where the autoscaler's limits are not all known (a node type without a limit or without its resources)."""
    needed = {key: value for key, value in need.items() if value > 0}
    if not needed:
        return None

    def slots(shape: dict[str, float]) -> int:
        held = worker_slots(shape, needed)
        return min(held, 1) if spread else held

    total = sum(slots(node) for node in alive)
    if groups is None:
        return total
    if any(count is None or "CPU" not in shape for shape, count in groups.types):
        return None  # (a type's resources not filled in: what it holds is not known here)
    # Each alive worker node taken for one node of the first type of its shape with a node left to run (the head
    # is none: `ray up` leaves its type out); one of no type's shape (joined by hand) counts against no limit.
    left = [count for _, count in groups.types]
    launched = 0
    for node in alive:
        if HEAD_RESOURCE in node:
            continue
        for index, (shape, _) in enumerate(groups.types):
            if left[index] > 0 and all(node.get(key, 0.0) == shape.get(key, 0.0) for key in ("CPU", "GPU")):
                left[index] -= 1
                launched += 1
                break
    room = None if groups.max_workers is None else max(groups.max_workers - launched, 0)
    addable = sorted((slots(shape) for (shape, _), count in zip(groups.types, left, strict=True)
                      for _ in range(count)), reverse=True)
    return total + sum(addable if room is None else addable[:room])


#: File systems every node of a cluster can mount at the same path (shared storage for Ray Train's checkpoints).
SHARED_FILESYSTEMS = ("nfs", "nfs4", "efs", "cifs", "smb3", "lustre", "gpfs", "beegfs", "glusterfs", "ceph",
                      "cephfs")
#: FUSE file systems (``fuse.<subtype>`` in /proc/mounts) of a bucket or a network share; others, such as rootless
#: containers' fuse-overlayfs or lxcfs, are one node's own. A FUSE mount without a subtype is taken as shared.
SHARED_FUSE_SUBTYPES = ("s3fs", "goofys", "geesefs", "gcsfuse", "mountpoint-s3", "blobfuse", "blobfuse2", "sshfs",
                        "juicefs", "rclone", "glusterfs", "ceph-fuse", "alluxio-fuse", "lustre", "beegfs", "mfs",
                        "lizardfs", "seaweedfs", "weed", "ossfs", "cosfs", "cvmfs", "efs", "nfs", "davfs", "smbnetfs")


def is_shared_filesystem(kind: str) -> bool:
    """Whether a file system of type ``kind`` (as /proc/mounts names it) can be the same on every node."""
    main, _, subtype = kind.lower().partition(".")
    if main in ("fuse", "fuseblk"):
        return main == "fuse" and (not subtype or subtype in SHARED_FUSE_SUBTYPES)
    return main in SHARED_FILESYSTEMS


def filesystem_of(path: str, mounts: str) -> str:
    """The type of the file system ``path`` lies on, from ``mounts`` (``/proc/mounts``' text): the longest mount
    point above it; "" when none is."""
    best, kind = "", ""
    target = os.path.abspath(path).rstrip("/") + "/"
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ").rstrip("/") + "/"
        # (>=: of two mounts on one point, the later listed is the one in use, as autofs then NFS on it)
        if target.startswith(point) and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def node_local_storage_warning(storage: str, nodes: int, mounts: str) -> str | None:
    """What to say when Ray Train's ``storage`` (``storage_path``) is a directory of this node alone on a cluster
    of ``nodes`` nodes (those alive and the node types its autoscaler can add): a worker on another node fails at
    its first checkpoint ("Unable to set up cluster storage"), after an epoch, once per ``train.max_failures``
    retry. None for a URI, one node, or a shared file system (NFS, EFS, a FUSE-mounted bucket, ...)."""
    if "://" in storage or nodes <= 1:
        return None
    kind = filesystem_of(storage, mounts)
    if is_shared_filesystem(kind):
        return None
    return (f"warning: storage_path {storage} is a directory of this node ({kind or 'unknown'} file system), and "
            f"this cluster has or can add {nodes} nodes: training workers on another node fail at their first "
            "checkpoint (\"Unable to set up cluster storage\"); set storage_path to a bucket (s3://...) or a "
            "shared file system mounted at the same path on every node")


def warn_if_storage_is_node_local(storage: str) -> None:
    """:func:`node_local_storage_warning` for the running Ray (not for one this command started: its only node
    is this one)."""
    if "://" in storage or ray_started_here():
        return
    try:
        mounts = Path("/proc/mounts").read_text()
    except OSError:  # not Linux: nothing to tell a shared mount by
        return
    import ray

    # A node type the autoscaler can add counts as one more node.
    nodes = sum(1 for node in ray.nodes() if node.get("Alive")) + len(addable_node_types() or [])
    if message := node_local_storage_warning(storage, nodes, mounts):
        logger.warning(message)


def ray_started_here() -> bool:
    """Whether the running Ray is one this process started (a laptop's, CI's, a notebook's ``ray.init()``): no
    other node can join it."""
    try:
        from ray._private import worker  # which process started the Ray: a private detail, so guarded

        return bool(getattr(worker._global_node, "head", False))
    except Exception:  # noqa: BLE001
        return False


def check_workers_fit(workers, what: str, gpu_key: str = "train.gpus_per_worker") -> None:
    """Refuse (ConfigError, exit 2) a run whose worker no node can ever hold: the CPUs and GPU of one worker
    (of all of them, under STRICT_PACK) must be on one node, and Ray Train compares only the cluster's totals,
    then retries placing the worker group without end (``train.max_failures`` does not count it): the stage
    waited for good. ``workers``: a run's :class:`~pipelines.planning.WorkerSettings`; ``what``: the run, for
    the message; ``gpu_key``: the setting that sized its GPU share. Where nodes this code cannot see may join (a
    Ray without an autoscaler's config, joined by address), a warning instead."""
    need = {"CPU": float(workers.cpus_per_worker)}
    if workers.use_gpu:
        need["GPU"] = float(workers.gpus_per_worker)
    if workers.placement_strategy == "STRICT_PACK":
        need = {key: value * workers.num_workers for key, value in need.items()}
    shapes, complete = node_shapes()
    if not shapes or any(all(shape.get(key, 0.0) + 1e-6 >= value for key, value in need.items()
                             if value > 0) for shape in shapes):
        _check_workers_fit_the_cluster(workers, what, gpu_key)
        return
    wanted = ", ".join(f"{value:g} {key}" for key, value in need.items() if value > 0)
    largest = max(shapes, key=lambda shape: (shape.get("GPU", 0.0), shape.get("CPU", 0.0)))
    biggest = ", ".join(f"{largest.get(key, 0.0):g} {key}" for key in need)
    key = gpu_key if need.get("GPU", 0.0) > max(s.get("GPU", 0.0) for s in shapes) + 1e-6 \
        else "train.cpus_per_worker"
    per = "all its workers together (train.placement_strategy STRICT_PACK)" if \
        workers.placement_strategy == "STRICT_PACK" else "one worker"
    message = (f"{what}: {per} needs {wanted} on one node, and no node {'can hold' if complete else 'holds'} "
               f"that (the largest: {biggest}); lower {key}"
               + (" or data.loader_workers (a GPU worker reserves 1 CPU plus one per loader process)"
                  if key == "train.cpus_per_worker" and workers.use_gpu else ""))
    if complete:
        raise ConfigError(key, message)
    logger.warning("warning: %s; it waits until such a node joins", message)


def _check_workers_fit_the_cluster(workers, what: str, gpu_key: str) -> None:
    """Refuse a run of more workers than the whole cluster can ever hold at once (its nodes and those its
    autoscaler may add, within each node type's ``max_workers`` and the cluster's): each worker fitted some node,
    and the autoscaler stopped at its limits while Ray Train retried the worker group without end."""
    if workers.placement_strategy == "STRICT_PACK" or not ray_started_here() and addable_node_groups() is None:
        return  # (all on one node: checked above; nodes this code cannot see may join)
    import ray

    need = worker_need(workers)
    alive = [{key: float(value) for key, value in node["Resources"].items()}
             for node in ray.nodes() if node.get("Alive")]
    spread = workers.placement_strategy == "STRICT_SPREAD"
    most = most_workers_placeable(need, spread, alive, None if ray_started_here() else addable_node_groups())
    if most is None or workers.num_workers <= most:
        return
    per = "one per node (train.placement_strategy STRICT_SPREAD)" if spread else "at once"
    raise ConfigError("train.num_workers", f"{what}: {workers.num_workers} workers, but this cluster can hold at "
                                           f"most {most} of them {per}, with every node its autoscaler may add "
                                           f"(each type's and the cluster's max_workers); lower train.num_workers "
                                           f"or {gpu_key if workers.use_gpu else 'train.cpus_per_worker'}, or "
                                           "raise max_workers in the cluster's config")
