"""Evaluation batch size per device: the forward pass of the default ConvNet (filter sizes
1, 3 and 5) over the 10,000 MNIST test images at several batch sizes, channels_last and
inference mode, as sweeper's validation and test passes run. The figures behind
`sweeper.ml.metrics.EVAL_BATCH_SIZE`.

    SWEEPER_DATA_DIR=../shared/data .venv/bin/python benchmarks/eval_batch.py
        [--device cpu] [--repeats 3] [--sizes 128 256 512 1024 2048]

Every (filter, batch size) pair is timed `--repeats` times, interleaved; the median counts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from sweeper.ml.data import load_dataset
from sweeper.ml.device import resolve_device
from sweeper.ml.metrics import EVAL_BATCH_SIZE, predict_on_device
from sweeper.ml.models import build_model
from sweeper.spec.config import DatasetConfig, ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = load_dataset(DatasetConfig(name="mnist", download=False), device=device,
                        data_dir=args.data_dir)
    x = data.test.x
    print(f"device: {device} | torch threads: {torch.get_num_threads()} | "
          f"{len(x):,} images | load average before: {_load()}")
    models = {}
    for filter_size in (1, 3, 5):
        model = build_model(ModelConfig(filter_size=filter_size), data.input_shape, 10)
        models[filter_size] = model.to(device)
        predict_on_device(model, x[:512], batch_size=256)  # kernels made once, not timed
    times: dict[tuple[int, int], list[float]] = {}
    for _ in range(args.repeats):
        for filter_size, model in models.items():
            for size in args.sizes:
                _sync(device)
                started = time.perf_counter()
                predict_on_device(model, x, batch_size=size)
                _sync(device)
                times.setdefault((filter_size, size), []).append(
                    time.perf_counter() - started)
    print(f"{'median s per 10k':18s}" + "".join(f"{s:>8d}" for s in args.sizes))
    for filter_size in models:
        row = [statistics.median(times[(filter_size, s)]) for s in args.sizes]
        best = args.sizes[row.index(min(row))]
        print(f"filter {filter_size:<11d}" + "".join(f"{t:8.2f}" for t in row)
              + f"   fastest: {best}")
    print(f"sweeper's default on {device.type}: {EVAL_BATCH_SIZE.get(device.type)} | load "
          f"average after: {_load()}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()
