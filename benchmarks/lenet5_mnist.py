"""LeNet-5 on the full MNIST: the classic (sigmoid + avg) and the modern (relu + max) net.

Adam 1e-3, batch 128, 10% validation, the arch's defaults otherwise; prints the validation
accuracy after every epoch, the test accuracy at the end, the wall time and the load
average. The published figures (10 epochs, test): classic 97.90%, modern 99.07%.

    SWEEPER_DATA_DIR=/work/shared/data python benchmarks/lenet5_mnist.py modern --epochs 10
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sweeper.ml.data import load_dataset
from sweeper.ml.metrics import evaluate
from sweeper.ml.models import build_model, count_parameters
from sweeper.ml.train import fit, seed_everything
from sweeper.spec.config import DatasetConfig, ModelConfig, TrainConfig

STYLES = {"classic": ("sigmoid", "avg"), "modern": ("relu", "max")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("style", choices=sorted(STYLES))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    activation, pooling = STYLES[args.style]
    data = load_dataset(DatasetConfig(name="mnist"), device="cpu",
                        data_dir=os.environ.get("SWEEPER_DATA_DIR"))
    seed_everything(args.seed)
    model = build_model(ModelConfig(arch="lenet", activation=activation, pooling=pooling),
                        data.input_shape, data.num_classes)
    cfg = TrainConfig(optimizer="adam", lr=args.lr, batch_size=args.batch_size,
                      seed=args.seed)
    print(f"lenet {args.style}: {count_parameters(model)} params, batch {args.batch_size}, "
          f"lr {args.lr}, seed {args.seed}, {args.threads} thread(s)",
          flush=True)

    def report(epoch: int, metrics: dict[str, float]) -> bool:
        print(f"epoch {epoch}: val_accuracy {metrics['val_accuracy']:.4f} val_loss "
              f"{metrics['val_loss']:.4f} ({metrics['epoch_seconds']:.1f}s, load "
              f"{os.getloadavg()[0]:.2f})", flush=True)
        return False

    started = time.perf_counter()
    fit(model, data, cfg, epochs=args.epochs, device=torch.device("cpu"), on_epoch=report)
    test = evaluate(model, data.test, classes=data.classes)
    print(f"test_accuracy {test.metrics['accuracy']:.4f} after {args.epochs} epochs, "
          f"{time.perf_counter() - started:.0f}s wall, load {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
