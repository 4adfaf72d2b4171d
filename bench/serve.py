"""HTTP serving throughput and latency against the raw model's forward throughput (the ceiling).

One process, one local Ray: a checkpoint of the model is served by the real Serve app (``pipelines.serve``)
twice, with dynamic batching (``max_batch_size`` 32) and without (1); an asyncio client sends the same PNG at
concurrency 1, 8 and 32. The ceiling is the model's own forward throughput in this process at batch sizes
1, 8 and 32, as the replica runs it (``prepare_for_serving``: batch norm folded, traced, inference mode),
measured just before and just after each level's load (their mean), while the replica idles: this machine's
speed drifts between runs by more than the goal's margin, so a ceiling from another moment would not do.
Reported: requests/s, p50/p99 latency, and requests/s as a share of the ceiling. Goal: >= 0.7 of the
ceiling at concurrency 32 with batching.

    python bench/serve.py                                  # resnet18 (small input), 1x32x32
    python bench/serve.py --model lenet5 --requests 2000
    python bench/serve.py --concurrency 32 --batching on   # the goal's row only
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import pandas as pd
import torch
from PIL import Image

import cnnmodels
from pipelines.checkpoints import ModelCheckpoint, save_checkpoint
from pipelines.config import ConfigError, load_config
from pipelines.model_store import prepare_for_serving, replica_threads
from pipelines.preprocess import PreprocessSpec
from pipelines.runtime import ray_session, set_env_defaults

CONCURRENCY = (1, 8, 32)


def ceiling(model: torch.nn.Module, spec: PreprocessSpec, batch: int, seconds: float = 3.0) -> float:
    """Images per second of the bare model (as served: folded, traced) at ``batch``."""
    x = torch.randn(batch, *spec.input_shape)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            done += batch
    return done / (time.perf_counter() - start)


def load(url: str, body: bytes, concurrency: int, count: int) -> tuple[float, list[float], int]:
    """Send ``count`` POSTs from ``concurrency`` concurrent connections: (answered req/s, their latencies in ms,
    errors: non-200 answers and failed connections).

    One asyncio client (aiohttp) rather than a thread per connection: on a 2-core machine the load
    generator shares the cores with Serve, and 32 threads of a blocking client cost the server more CPU.
    """

    async def run() -> tuple[float, list[tuple[float, int]]]:
        connector = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                         headers={"Content-Type": "image/png"}) as session:
            async def one() -> tuple[float, int]:
                start = time.perf_counter()
                try:
                    async with session.post(f"{url}/predict", data=body) as response:
                        await response.read()
                        return time.perf_counter() - start, response.status
                except (aiohttp.ClientError, asyncio.TimeoutError):  # an error to count, not the end of the run
                    return time.perf_counter() - start, 0

            async def worker(n: int, results: list) -> None:
                for _ in range(n):
                    results.append(await one())

            async def batch(total: int) -> list[tuple[float, int]]:
                results: list[tuple[float, int]] = []
                shares = [total // concurrency + (i < total % concurrency) for i in range(concurrency)]
                await asyncio.gather(*(worker(n, results) for n in shares))
                return results

            await batch(min(count, 4 * concurrency))  # warm-up: models loaded, connections open
            start = time.perf_counter()
            results = await batch(count)
            return time.perf_counter() - start, results

    wall, results = asyncio.run(run())
    # Answered requests only: failures that return fast would otherwise raise req/s and lower the latencies.
    answered = [t * 1000 for t, status in results if status == 200]
    return len(answered) / wall, answered, count - len(answered)


def free_port() -> int:
    """A port nothing listens on now (a fixed one may be another server's, which the serve stage refuses)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    set_env_defaults()  # before Ray's import, which reads RAY_DEDUP_LOGS once (concurrent runs' lines folded)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY),
                        help="concurrency levels (default: 1 8 32)")
    parser.add_argument("--batching", choices=["both", "on", "off"], default="both")
    args = parser.parse_args()

    spec = PreprocessSpec(image_size=args.image_size, channels=1, mean=(0.3,), std=(0.4,),
                          class_names=tuple(str(i) for i in range(10)))
    kwargs = {} if args.model == "lenet5" else {"small_input": True}
    model = cnnmodels.create_model(args.model, num_classes=10, in_chans=1, **kwargs).eval()
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(buffer, format="PNG")
    body = buffer.getvalue()
    # The replica's own thread count for serve.num_cpus (1.5 CPUs: 2 threads), not a count of this script's.
    torch.set_num_threads(replica_threads(load_config(None, [f"serve.num_cpus={args.replica_cpus}"]).serve))
    served = prepare_for_serving(model, spec, fold=True, trace=True).model

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        path = save_checkpoint(ModelCheckpoint(arch=args.model, model_kwargs=kwargs, spec=spec,
                                               state_dict=model.state_dict(), model_name=args.model),
                               Path(workdir) / "model.pt")
        for batching in {"both": (True, False), "on": (True,), "off": (False,)}[args.batching]:
            cfg = load_config(None, [f"workdir={workdir}", "name=bench-serve", f"serve.checkpoints={{m: '{path}'}}",
                                     f"serve.max_batch_size={32 if batching else 1}", "serve.max_ongoing_requests=64",
                                     f"serve.num_cpus={args.replica_cpus}", "serve.batch_wait_timeout_s=0.002",
                                     f"serve.port={free_port()}"])
            with ray_session(cfg):
                from pipelines.serve import serve_stage

                handle = serve_stage(cfg)
                for concurrency in args.concurrency:
                    before = ceiling(served, spec, concurrency)
                    rps, latencies, errors = load(handle.url, body, concurrency, args.requests)
                    top = statistics.mean([before, ceiling(served, spec, concurrency)])
                    latencies.sort()
                    if not latencies:
                        raise RuntimeError(f"no request was answered at concurrency {concurrency} ({errors} errors)")
                    rows.append({
                        "batching": "on (max 32)" if batching else "off",
                        "concurrency": concurrency,
                        "req/s": round(rps, 1),
                        "p50 ms": round(statistics.median(latencies), 1),
                        "p99 ms": round(latencies[int(0.99 * (len(latencies) - 1))], 1),
                        "errors": errors,
                        "ceiling img/s (model @ batch=concurrency)": round(top, 1),
                        "share of ceiling": round(rps / top, 3),
                    })
                    print(rows[-1], flush=True)
    print(f"\n{args.model} 1x{args.image_size}x{args.image_size}, replica {args.replica_cpus:g} CPU, "
          f"{args.requests} requests per level, client on the same machine")
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # a bad --set or model name: the key and why, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
