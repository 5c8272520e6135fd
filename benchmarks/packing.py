"""Trials per hour with trial packing: K = 1, 2, 4, 8 members per pack, same trials.

For each network (the default ConvNet, LeNet-5, the default MLP of 256-128 and a small
MLP of 16-32-64) the same `--trials`
trials (Adam, each its own learning rate, dropout and seed, one shape) are trained on real
MNIST (synthetic 28x28 data where MNIST is absent), with per-epoch validation as a sweep
runs them:

  K = 1: each trial alone, `train.fit` (what `sweeper run` does without `pack`);
  K = 1p: each trial alone through `packing.fit_packed` (the engine without packing);
  K > 1: the trials in packs of K, `packing.fit_packed`.

The K variants are interleaved round by round (the order rotates), so a load change on a
shared machine hits them all; the median of `--rounds` is reported, with the best beside
it, the speed-up against K = 1 of the same round's median, the load average before and
after, and on CUDA the peak memory of one pack next to `packing.member_bytes`' estimate.
Each network's line also says how many members `pack: 8` packs on this device
(`packing.pack_size`, by free memory).

    .venv/bin/python benchmarks/packing.py [--device cpu|cuda] [--rounds 3]
        [--trials 8] [--train-images 2048] [--epochs 1] [--archs cnn,lenet,mlp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from sweeper.errors import DataError
from sweeper.ml.data import Dataset, load_dataset
from sweeper.ml.models import build_model
from sweeper.ml.packing import fit_packed, member_bytes, pack_size
from sweeper.ml.train import fit, resolve_device, seed_everything
from sweeper.spec.config import DatasetConfig, TrialConfig

REPO = Path(__file__).resolve().parents[1]
# (label, members per pack, packed engine): "1" is `train.fit`, trial after trial (what
# `sweeper run` does without `pack`); "1p" is the packed engine with one member, which
# tells what the engine alone (fused optimizer steps) changes, apart from packing.
PACKS = (("1", 1, False), ("1p", 1, True), ("2", 2, True), ("4", 4, True), ("8", 8, True))
NETWORKS = {
    "cnn": {"arch": "cnn"},  # the default ConvNet: 32-64 3x3 convs, pools, dropout 0.5
    "lenet": {"arch": "lenet"},  # LeNet-5, relu + max
    "mlp": {"arch": "mlp", "hidden": [256, 128]},  # the default MLP
    "mlp-small": {"arch": "mlp", "hidden": [16, 32, 64]},  # the small option of DESIGN §5
}


def main() -> None:
    args = _parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data, source = _data(args, device)
    print(f"trial packing: {args.trials} trials x {args.epochs} epoch(s) on "
          f"{len(data.train)} training / {len(data.val)} validation images ({source}), "
          f"batch {args.batch_size}, device {device}, {torch.get_num_threads()} threads")
    print(f"load average before: {_load()}")
    rows = []
    for arch in args.archs.split(","):
        configs = _trials(arch, args)
        times: dict[str, list[float]] = {label: [] for label, _, _ in PACKS}
        peaks: dict[str, float] = {}
        _run(1, False, configs[:1], data, device)  # warm-up: allocator, kernels, caches
        _run(2, True, configs[:2], data, device)
        for round_ in range(args.rounds):
            shift = round_ % len(PACKS)
            for label, k, packed in PACKS[shift:] + PACKS[:shift]:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                times[label].append(_run(k, packed, configs, data, device))
                if device.type == "cuda":
                    peaks[label] = torch.cuda.max_memory_allocated(device) / 2**20
        base = statistics.median(times["1"])
        estimate = member_bytes(configs[0], data.input_shape, data.num_classes) / 2**20
        for label, k, _ in PACKS:
            median = statistics.median(times[label])
            rows.append((arch, label, median, min(times[label]), args.trials * 3600 / median,
                         base / median, peaks.get(label), estimate * k))
        chosen = pack_size(8, configs[0], data.input_shape, data.num_classes, device)
        print(f"  {arch} done, load {_load()}; `pack: 8` packs {chosen} here", flush=True)
        _table(rows[-len(PACKS):])
    print("all networks:")
    _table(rows)
    print(f"load average after: {_load()}")


def _table(rows: list[tuple]) -> None:  # type: ignore[type-arg]
    print(f"{'network':9} {'K':>2} {'median s':>9} {'best s':>8} {'trials/h':>9} "
          f"{'speed-up':>8} {'peak MiB':>9} {'est. MiB':>9}")
    for arch, label, median, best, per_hour, speedup, peak, est in rows:
        peak_text = f"{peak:9.0f}" if peak is not None else f"{'-':>9}"
        print(f"{arch:9} {label:>2} {median:9.2f} {best:8.2f} {per_hour:9.0f} "
              f"{speedup:7.2f}x {peak_text} {est:9.0f}", flush=True)


def _run(k: int, packed: bool, configs: list[TrialConfig], data: Dataset,
         device: torch.device) -> float:
    """Seconds to train every trial of `configs` in packs of `k` (or alone by `fit`)."""
    started = time.perf_counter()
    for start in range(0, len(configs), k):
        group = configs[start:start + k]
        models = []
        for config in group:
            seed_everything(config.train.seed)
            models.append(build_model(config.model, data.input_shape, data.num_classes))
        if packed:
            fit_packed(models, group, data, device=device)
        else:
            fit(models[0], data, group[0].train, epochs=group[0].epochs, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _trials(arch: str, args: argparse.Namespace) -> list[TrialConfig]:
    """One shape, each trial its own lr (log-spaced), dropout and seed."""
    out = []
    for i in range(args.trials):
        lr = 1e-3 * 10 ** (i / max(1, args.trials - 1) - 0.5)
        model = dict(NETWORKS[arch])
        if not arch.startswith("cnn"):
            model["dropout"] = 0.1 * (i % 3)
        out.append(TrialConfig.model_validate({
            "dataset": {"name": "mnist"}, "model": model,
            "train": {"optimizer": "adam", "lr": lr, "seed": i,
                      "batch_size": args.batch_size},
            "epochs": args.epochs}))
    return out


def _data(args: argparse.Namespace, device: torch.device) -> tuple[Dataset, str]:
    val_fraction = args.val_images / 60_000
    try:
        cfg = DatasetConfig(name="mnist", subset=args.train_images, download=False,
                            val_fraction=val_fraction)
        return load_dataset(cfg, device=device, data_dir=args.data_dir), "MNIST"
    except DataError:
        total = args.train_images + args.val_images
        cfg = DatasetConfig.model_validate({
            "name": "synthetic", "val_fraction": args.val_images / total,
            "synthetic": {"classes": 10, "image_size": 28, "train_size": total,
                          "test_size": 64}})
        return load_dataset(cfg, device=device), "synthetic 28x28, MNIST not found"


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda if any)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=2048)
    parser.add_argument("--val-images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--archs", default=",".join(NETWORKS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=os.environ.get("SWEEPER_DATA_DIR")
                        or str(REPO.parent / "shared" / "data"))
    return parser.parse_args()


if __name__ == "__main__":
    main()
