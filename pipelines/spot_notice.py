"""Drain this Ray node as preempted when EC2 announces its spot interruption: ``python -m pipelines.spot_notice``
(cluster.yaml starts it on every worker node).

EC2 gives a spot instance about two minutes' notice (the instance metadata's ``spot/instance-action``) and then
takes it away. Nothing in Ray 2.60's cluster launcher reads that notice, so Ray saw the node simply die: Ray
Train counted the loss against ``train.max_failures``, and the fourth reclaim of one model's GPUs failed its
run. Drained with the reason "preemption" and the notice's deadline, the node is one Ray knows is going: Ray
Train's preemption watcher sees it, keeps the healthy ranks running until the deadline, and starts the worker
group again elsewhere from the last checkpoint, counting preemptions apart from ``max_failures`` and without a
limit; Ray places nothing new on the node meanwhile, and a worker that dies with it is reported preempted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
import urllib.error
import urllib.request

__all__ = ["interruption_time", "node_id_of_this_host", "drain_as_preempted", "watch", "main"]

logger = logging.getLogger(__name__)

#: EC2's instance metadata service (IMDSv2: a session token first, then the notice).
METADATA_URL = "http://169.254.169.254"
#: Seconds of notice EC2 gives (used when a notice's time cannot be read).
NOTICE_S = 120.0


class NotOnEC2(RuntimeError):
    """The instance metadata service does not answer: not an EC2 instance."""


class CannotDrain(RuntimeError):
    """A drain that trying again will not bring about: Ray refused it."""


def interruption_time(metadata_url: str = METADATA_URL, timeout_s: float = 2.0) -> float | None:
    """When EC2 will stop or terminate this spot instance (epoch seconds), or None while no interruption is
    announced. :class:`NotOnEC2` when the metadata service does not answer at all."""
    try:
        token_request = urllib.request.Request(f"{metadata_url}/latest/api/token", method="PUT",
                                               headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
        with urllib.request.urlopen(token_request, timeout=timeout_s) as response:
            token = response.read().decode()
    except (urllib.error.URLError, OSError) as err:
        raise NotOnEC2(f"the instance metadata service at {metadata_url} does not answer ({err})") from None
    notice_request = urllib.request.Request(f"{metadata_url}/latest/meta-data/spot/instance-action",
                                            headers={"X-aws-ec2-metadata-token": token})
    try:
        with urllib.request.urlopen(notice_request, timeout=timeout_s) as response:
            body = response.read().decode()
    except urllib.error.HTTPError as err:
        if err.code == 404:  # what the service answers until an interruption is scheduled
            return None
        raise
    try:
        when = json.loads(body)["time"]  # {"action": "terminate", "time": "2026-12-01T08:22:00Z"}
        return dt.datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError, AttributeError):
        logger.warning("spot interruption notice without a readable time (%r): taking %g s", body[:200], NOTICE_S)
        return time.time() + NOTICE_S


#: Seconds one request to Ray's GCS may take (unbounded by default: a GCS that does not answer held the watcher
#: for a third of the notice).
GCS_TIMEOUT_S = 10.0


def node_id_of_this_host(gcs_address: str) -> str:
    """The alive Ray node of this host (its IP address as the head sees it), as hex; ``LookupError`` when there
    is none, or several (more than one Ray on one host: name the node with ``--node-id``)."""
    from ray._raylet import GcsClient
    from ray.util import get_node_ip_address

    ip = get_node_ip_address(gcs_address)
    nodes = GcsClient(address=gcs_address).get_all_node_info(timeout=GCS_TIMEOUT_S)
    alive = [node_id.hex() for node_id, info in nodes.items()
             if info.node_manager_address == ip and info.state == 0]  # GcsNodeInfo.ALIVE
    if len(alive) != 1:  # (not joined yet; or a raylet restarted, its old id alive until the head sees it gone)
        raise LookupError(f"{len(alive)} alive Ray nodes at {ip} in the cluster at {gcs_address}, not one (more "
                          "than one Ray on this host: name the node with --node-id)")
    return alive[0]


def drain_as_preempted(gcs_address: str, node_id: str, deadline: float, message: str) -> None:
    """Ask Ray's GCS to drain ``node_id`` for a preemption that takes the node at ``deadline`` (epoch seconds);
    :class:`CannotDrain` when it refuses."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    accepted, refusal = GcsClient(address=gcs_address).drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), message,
        int(deadline * 1000), timeout=GCS_TIMEOUT_S)
    if not accepted:
        raise CannotDrain(f"Ray refused to drain node {node_id}: {refusal}")


def watch(gcs_address: str, node_id: str | None = None, metadata_url: str = METADATA_URL, interval_s: float = 5.0,
          margin_s: float = 10.0) -> float:
    """Poll for an interruption notice every ``interval_s``; on one, drain this host's node (``node_id``, else
    looked up then: a ``ray stop; ray start`` gives the host a new node) with a deadline ``margin_s`` before the
    announced time (Ray reports a worker preempted only when its node dies after the deadline). Returns the
    deadline; :class:`NotOnEC2` when the metadata service never answered."""
    answered = False
    polls = 0
    while True:
        polls += 1
        try:
            when = interruption_time(metadata_url)
            answered = True
        except NotOnEC2:
            if not answered and polls >= 3:  # never answered: not EC2, nothing to watch
                raise
            when = None
        except Exception as err:  # noqa: BLE001 - a bad answer once is no reason to stop watching
            logger.warning("could not read the spot interruption notice (%s); trying again", err)
            when = None
        if when is not None:
            node, deadline = _drain_until(gcs_address, node_id, when, margin_s)
            logger.warning("spot interruption announced for %s: node %s drained as preempted (deadline in %.0f s)",
                           time.ctime(when), node, deadline - time.time())
            return deadline
        time.sleep(interval_s)


def _drain_until(gcs_address: str, node_id: str | None, when: float, margin_s: float) -> tuple[str, float]:
    """Look this host's node up and drain it with a deadline ``margin_s`` before ``when`` (not in the past),
    trying again until the interruption when that can help (a GCS busy or restarting, the node not found yet):
    once is all a notice gives. Returns the node and its deadline; the last error when the time is up, and
    :class:`CannotDrain` at once."""
    warned = 0.0
    while True:
        deadline = max(when - margin_s, time.time())
        try:
            node = node_id or node_id_of_this_host(gcs_address)
            drain_as_preempted(gcs_address, node, deadline, f"EC2 spot interruption at {time.ctime(when)}")
            return node, deadline
        except CannotDrain:
            raise
        except Exception as err:  # noqa: BLE001 - Ray's RpcError, a timeout, no node yet: all can pass
            if time.time() + 2 >= when:
                raise
            if time.monotonic() - warned >= 10:  # a line every 10 s, not one a second
                warned = time.monotonic()
                logger.warning("could not drain this node yet (%s); trying again until the interruption", err)
            time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.spot_notice", description=__doc__.split("\n")[0])
    parser.add_argument("--address", required=True, help="the Ray head's GCS address, host:6379")
    parser.add_argument("--node-id", help="the node to drain (default: the alive node of this host's IP address)")
    parser.add_argument("--metadata-url", default=METADATA_URL, help="the instance metadata service")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between polls")
    parser.add_argument("--margin", type=float, default=10.0,
                        help="seconds before the announced time that the drain's deadline is set (Ray reports a worker "
                             "preempted only when its node dies after the deadline)")
    parser.add_argument("--lock", default="/tmp/cnnzoo-spot-notice.lock",
                        help="held while watching: a second watcher (a second `ray up`) exits at once")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from filelock import FileLock, Timeout

    try:
        with FileLock(args.lock, timeout=0):
            logger.info("watching for a spot interruption notice every %g s", args.interval)
            watch(args.address, args.node_id, args.metadata_url, args.interval, args.margin)
    except Timeout:
        logger.info("another watcher holds %s", args.lock)
    except NotOnEC2 as err:
        logger.info("%s: not an EC2 instance, nothing to watch", err)
    except Exception as err:  # noqa: BLE001 - the node not found or the drain refused until the end: in the log
        logger.error("could not drain this node before its interruption: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
