"""Training throughput of sweeper's loop against the classic PyTorch MNIST tutorial loop.

Both loops train the same model (the default cnn, same initial weights), with the same
optimizer (Adam, lr 1e-3), batch size (128), number of training images (the 54,000 of
sweeper's train split unless --subset) and torch thread count, in the same process:

  (a) sweeper: `train.fit` on a `data.load_dataset` Dataset (normalised tensors in memory,
      a permutation sliced into index gathers). Its per-epoch validation is switched off
      by handing `fit` a one-image validation split, so the figure is training only.
  (b) tutorial: `torchvision.datasets.MNIST` with ToTensor + Normalize per sample, a
      `DataLoader(batch_size=128, shuffle=True)` with num_workers 0 and 2, and a plain
      zero_grad / forward / loss / backward / step loop. The faster variant is the baseline.
  (c) time outside the model: a pass that does only sweeper's batch iteration (permutation
      and index gathers, augmentation off) over the same split, divided by sweeper's
      training epoch time.

Every variant is warmed up (a few batches) and then timed `--repeats` times, interleaved.
The median of each is the headline, the best (shortest) beside it: on a shared machine other
processes only ever make a run slower, so the best is the least disturbed estimate and the
median the typical one; the load average is printed before and after.

    .venv/bin/python benchmarks/trainer_throughput.py [--data-dir ../shared/data]
        [--epochs 1] [--subset N] [--repeats 3] [--threads T]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sweeper.ml.data import Split, batches, load_dataset
from sweeper.ml.models import build_model
from sweeper.ml.train import fit, resolve_device
from sweeper.spec.config import DatasetConfig, ModelConfig, TrainConfig

BATCH_SIZE = 128
LR = 1e-3
WARMUP_BATCHES = 5
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = resolve_device(args.device)
    threads = torch.get_num_threads()

    data = load_dataset(DatasetConfig(name="mnist", subset=args.subset, download=False),
                        device=device, data_dir=args.data_dir)
    n = len(data.train)
    samples = n * args.epochs
    torch.manual_seed(0)
    initial = build_model(ModelConfig(), data.input_shape, data.num_classes)
    load_before = _load()
    print(f"device: {device} | torch {torch.__version__} | torch threads: {threads} | "
          f"cpu cores: {os.cpu_count()} | load average: {load_before}")
    print(f"model: default cnn, {sum(p.numel() for p in initial.parameters()):,} params | "
          f"adam lr {LR} | batch {BATCH_SIZE} | {n:,} training images x {args.epochs} "
          f"epoch(s) | {args.repeats} interleaved runs each")

    # -- the contenders -------------------------------------------------------------------
    # sweeper: validation over a single image, so the epoch is (almost) all training; the
    # time is sum(epoch_seconds) as fit records it, which includes that one-image pass.
    train_only = dataclasses.replace(data, val=Split(data.val.x[:1], data.val.y[:1]))
    train_cfg = TrainConfig(optimizer="adam", lr=LR, batch_size=BATCH_SIZE)

    def sweeper_run(limit: int | None = None) -> float:
        subset = train_only
        if limit is not None:  # warm-up: the first `limit` images only
            subset = dataclasses.replace(train_only, train=Split(data.train.x[:limit],
                                                                 data.train.y[:limit]))
        result = fit(copy.deepcopy(initial), subset, train_cfg,
                     epochs=1 if limit else args.epochs, device=device)
        return sum(row["epoch_seconds"] for row in result.history)

    def gather_run(limit: int | None = None) -> float:
        split = data.train if limit is None else Split(data.train.x[:limit],
                                                       data.train.y[:limit])
        generator = torch.Generator().manual_seed(0)
        _sync(device)
        started = time.perf_counter()
        for _ in range(1 if limit else args.epochs):
            for _batch in batches(split, BATCH_SIZE, shuffle=True, generator=generator):
                pass
        _sync(device)
        return time.perf_counter() - started

    tutorial_data = _tutorial_dataset(args.data_dir, n)
    contenders: dict[str, Callable[[int | None], float]] = {
        "sweeper fit (tensors on device)": sweeper_run,
        "tutorial DataLoader, workers=0": lambda limit: _tutorial_run(
            initial, tutorial_data, 0, args.epochs, device, limit),
        "tutorial DataLoader, workers=2": lambda limit: _tutorial_run(
            initial, tutorial_data, 2, args.epochs, device, limit),
        "sweeper batch iteration only": gather_run,
    }

    # -- warm up, then time, interleaved ----------------------------------------------------
    for run in contenders.values():
        run(WARMUP_BATCHES * BATCH_SIZE)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, run in contenders.items():
            times[name].append(run(None))

    # -- report -------------------------------------------------------------------------
    best = {name: min(ts) for name, ts in times.items()}
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print()
    print(f"{'loop':34s} {'median s':>9s} {'samples/s':>10s} {'best s':>8s} {'samples/s':>10s}"
          f"   all runs (s)")
    for name, ts in times.items():
        print(f"{name:34s} {median[name]:9.2f} {samples / median[name]:10,.0f} "
              f"{best[name]:8.2f} {samples / best[name]:10,.0f}   "
              f"{', '.join(f'{t:.2f}' for t in ts)}")
    tutorial_names = [name for name in contenders if name.startswith("tutorial")]
    baseline = min(tutorial_names, key=lambda name: median[name])
    sweeper_name = "sweeper fit (tensors on device)"
    print()
    print(f"baseline: {baseline} (the faster tutorial variant by median)")
    print("sweeper's time excludes validation (a one-image validation split); the share "
          "outside the model is batch-iteration-only time / sweeper training time")
    print(f"load average before: {load_before} | after: {_load()}")
    # This run itself keeps about `threads` cores busy; more than that is someone else.
    if os.getloadavg()[0] > threads + 0.75:
        print("warning: other processes used the CPU during the run; the figures above are "
              "less reliable (rerun on an idle machine, or with more --repeats)")
    print(f"speedup vs tutorial loop: median {median[baseline] / median[sweeper_name]:.2f}x, "
          f"best {best[baseline] / best[sweeper_name]:.2f}x (floor 1.3x)")
    outside = median["sweeper batch iteration only"] / median[sweeper_name]
    print(f"time outside the model: {100 * outside:.1f}% (median; floor 5%)")


def _tutorial_dataset(data_dir: Path, n: int) -> torch.utils.data.Dataset:
    """MNIST exactly as the PyTorch tutorial builds it, cut to the same number of images."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize((0.1307,), (0.3081,))])
    full = datasets.MNIST(str(data_dir), train=True, download=False, transform=transform)
    return torch.utils.data.Subset(full, range(n))


def _tutorial_run(initial: nn.Module, dataset: torch.utils.data.Dataset, workers: int,
                  epochs: int, device: torch.device, limit: int | None) -> float:
    """The tutorial's loop; the clock includes starting the DataLoader's workers, as a
    tutorial epoch does."""
    model = copy.deepcopy(initial).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(limit))
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True,
                                         num_workers=workers)
    model.train()
    _sync(device)
    started = time.perf_counter()
    for _ in range(1 if limit else epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
    _sync(device)
    return time.perf_counter() - started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_dir = os.environ.get("SWEEPER_DATA_DIR") or str(REPO.parent / "shared" / "data")
    parser.add_argument("--data-dir", type=Path, default=Path(default_dir),
                        help="folder with MNIST/raw/ (default $SWEEPER_DATA_DIR, else "
                             "../shared/data)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed run")
    parser.add_argument("--subset", type=int, default=None,
                        help="train on at most this many images (default: all 54,000)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per loop, interleaved; median and best shown")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both loops (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    return parser.parse_args()


if __name__ == "__main__":
    main()
