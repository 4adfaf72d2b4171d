"""HTTP serving throughput and latency against the raw model's forward throughput (the ceiling).

One process, one local Ray: a checkpoint of the model is served by the real Serve app (``pipelines.serve``)
twice, with dynamic batching (``max_batch_size`` 32) and without (1); a thread pool sends the same PNG at
concurrency 1, 8 and 32. The ceiling is the model's own forward throughput in this process at batch sizes
1, 8 and 32 (batch norm folded, inference mode). Reported: requests/s, p50/p99 latency, and requests/s as
a share of the ceiling. Goal: >= 0.7 of the ceiling at concurrency 32 with batching.

    python bench/serve.py                                  # resnet18 (small input), 1x32x32
    python bench/serve.py --model lenet5 --requests 2000
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import requests
import torch
from PIL import Image

import cnnmodels
from pipelines.checkpoints import ModelCheckpoint, save_checkpoint
from pipelines.config import load_config
from pipelines.preprocess import PreprocessSpec
from pipelines.runtime import ray_session
from pipelines.serve import fold_batchnorm

CONCURRENCY = (1, 8, 32)


def ceiling(model: torch.nn.Module, spec: PreprocessSpec, batch: int, seconds: float = 3.0) -> float:
    """Images per second of the bare (folded) model at ``batch``."""
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
    session_per_thread: dict[int, requests.Session] = {}

    def one(_):
        import threading

        session = session_per_thread.setdefault(threading.get_ident(), requests.Session())
        start = time.perf_counter()
        response = session.post(f"{url}/predict", data=body, headers={"Content-Type": "image/png"}, timeout=120)
        return time.perf_counter() - start, response.status_code

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(min(count, 4 * concurrency))))  # warm-up: models loaded, connections open
        start = time.perf_counter()
        results = list(pool.map(one, range(count)))
        wall = time.perf_counter() - start
    errors = sum(1 for _, code in results if code != 200)
    return count / wall, [t * 1000 for t, _ in results], errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    args = parser.parse_args()

    spec = PreprocessSpec(image_size=args.image_size, channels=1, mean=(0.3,), std=(0.4,),
                          class_names=tuple(str(i) for i in range(10)))
    kwargs = {} if args.model == "lenet5" else {"small_input": True}
    model = cnnmodels.create_model(args.model, num_classes=10, in_chans=1, **kwargs).eval()
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(buffer, format="PNG")
    body = buffer.getvalue()
    torch.set_num_threads(max(1, int(args.replica_cpus)))
    folded, _ = fold_batchnorm(model, spec)
    ceilings = {c: ceiling(folded, spec, c) for c in CONCURRENCY}

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        path = save_checkpoint(ModelCheckpoint(arch=args.model, model_kwargs=kwargs, spec=spec,
                                               state_dict=model.state_dict(), model_name=args.model),
                               Path(workdir) / "model.pt")
        for batching in (True, False):
            cfg = load_config(None, [f"workdir={workdir}", "name=bench-serve", f"serve.checkpoints={{m: '{path}'}}",
                                     f"serve.max_batch_size={32 if batching else 1}", "serve.max_ongoing_requests=64",
                                     f"serve.num_cpus={args.replica_cpus}", "serve.batch_wait_timeout_s=0.002",
                                     "serve.port=8123"])
            with ray_session(cfg):
                from pipelines.serve import serve_stage

                handle = serve_stage(cfg)
                for concurrency in CONCURRENCY:
                    rps, latencies, errors = load(handle.url, body, concurrency, args.requests)
                    latencies.sort()
                    rows.append({
                        "batching": "on (max 32)" if batching else "off",
                        "concurrency": concurrency,
                        "req/s": round(rps, 1),
                        "p50 ms": round(statistics.median(latencies), 1),
                        "p99 ms": round(latencies[int(0.99 * (len(latencies) - 1))], 1),
                        "errors": errors,
                        "ceiling img/s (model @ batch=concurrency)": round(ceilings[concurrency], 1),
                        "share of ceiling": round(rps / ceilings[concurrency], 3),
                    })
                    print(rows[-1], flush=True)
    print(f"\n{args.model} 1x{args.image_size}x{args.image_size}, replica {args.replica_cpus:g} CPU, "
          f"{args.requests} requests per level, client on the same machine")
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
