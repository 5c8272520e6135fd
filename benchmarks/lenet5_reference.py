"""LeNet-5 on the full MNIST in plain PyTorch: the reference for `lenet5_mnist.py`.

The source's own network class and the textbook loop (DataLoader over a TensorDataset,
shuffled every epoch, Adam, CrossEntropyLoss), with none of sweeper's code: MNIST is read
from its IDX files here, normalised with the training split's mean and std, and the same
6,000 validation images are held out as sweeper's default split (seed 0). Prints the
validation accuracy after every epoch and the test accuracy at the end, so the two
scripts' figures can be read side by side for the same seed.

    SWEEPER_DATA_DIR=/work/shared/data python benchmarks/lenet5_reference.py modern --epochs 3
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Sampler, TensorDataset

STYLES = {"classic": (torch.sigmoid, F.avg_pool2d), "modern": (torch.relu, F.max_pool2d)}


class LeNet5(nn.Module):
    """The source document's class, activation and pooling passed in."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.act, self.pool = STYLES[style]
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, stride=1, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5, stride=1, padding=0)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)), kernel_size=2, stride=2)
        x = self.pool(self.act(self.conv2(x)), kernel_size=2, stride=2)
        x = torch.flatten(x, 1)
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.fc3(x)


class SweeperOrder(Sampler[int]):
    """One permutation per epoch from one generator seeded once, as `sweeper.train.fit`."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator).tolist())

    def __len__(self) -> int:
        return self.n


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (big-endian header: magic, then one size per dimension) as an array."""
    raw = path.read_bytes()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum())
                   for i in range(0, len(y), 1000))
    return hits / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("style", choices=sorted(STYLES))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--order", choices=("loader", "sweeper"), default="loader",
                        help="batch order: the DataLoader's shuffling, or sweeper's (one "
                             "randperm per epoch from a generator seeded with --seed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    raw = Path(os.environ.get("SWEEPER_DATA_DIR", "data")) / "MNIST" / "raw"
    images = torch.from_numpy(read_idx(raw / "train-images-idx3-ubyte").copy())
    labels = torch.from_numpy(read_idx(raw / "train-labels-idx1-ubyte").astype(np.int64))
    test_x = torch.from_numpy(read_idx(raw / "t10k-images-idx3-ubyte").copy())
    test_y = torch.from_numpy(read_idx(raw / "t10k-labels-idx1-ubyte").astype(np.int64))
    # sweeper's default split: a seeded permutation (seed 0, stream 1), the first 10% held out.
    order = torch.randperm(60_000, generator=torch.Generator().manual_seed(1))
    val_idx, train_idx = order[:6_000].sort().values, order[6_000:].sort().values
    train_x = images[train_idx].float().div(255).unsqueeze(1)
    mean, std = train_x.mean().item(), train_x.std(unbiased=False).item()

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return (x.float().div(255).unsqueeze(1) - mean) / std

    train_x = (train_x - mean) / std
    train_y, val_x, val_y = labels[train_idx], prepare(images[val_idx]), labels[val_idx]
    torch.manual_seed(args.seed)
    model = LeNet5(args.style)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    dataset = TensorDataset(train_x, train_y)
    if args.order == "sweeper":
        # The very batches sweeper's trainer draws: with the same initial weights (both
        # seed torch's global generator, then create the same layers in the same order),
        # the two loops then do the same arithmetic.
        loader = DataLoader(dataset, batch_sampler=BatchSampler(
            SweeperOrder(len(dataset), args.seed), args.batch_size, drop_last=False))
    else:
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(args.seed))
    params = sum(p.numel() for p in model.parameters())
    print(f"reference lenet {args.style}: {params} params, {len(train_y)}/{len(val_y)} "
          f"images, mean {mean:.4f} std {std:.4f}, batch {args.batch_size}, lr {args.lr}, "
          f"seed {args.seed}, {args.order} order, {args.threads} thread(s)", flush=True)
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch}: val_accuracy {accuracy(model, val_x, val_y):.4f} "
              f"({time.perf_counter() - epoch_started:.1f}s, load {os.getloadavg()[0]:.2f})",
              flush=True)
    print(f"test_accuracy {accuracy(model, prepare(test_x), test_y):.4f} after {args.epochs} "
          f"epochs, {time.perf_counter() - started:.0f}s wall, load {os.getloadavg()}",
          flush=True)


if __name__ == "__main__":
    main()
