"""Train the fixed config of studies/mnist_cnn.yaml (the classic MNIST ConvNet: filter 3,
pool 2, dropout 0.5, Adam 1e-3, batch 128) for its 10 epochs on the full MNIST with
sweeper's own loop, and print validation and test accuracy per epoch and the time taken.

    SWEEPER_DATA_DIR=../shared/data python benchmarks/default_convnet.py [--epochs 10]

The figure belongs in the README's table of studies (floor: >= 99.0% test accuracy).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sweeper.ml.data import load_dataset
from sweeper.ml.metrics import evaluate
from sweeper.ml.models import build_model, count_parameters
from sweeper.ml.train import fit, resolve_device, seed_everything
from sweeper.spec import config

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(REPO / "studies" / "mnist_cnn.yaml"))
    parser.add_argument("--epochs", type=int, default=None, help="default: the study's")
    parser.add_argument("--device", default=None)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    spec = config.load(args.study)
    cfg = spec.resolve({})
    epochs = args.epochs or cfg.epochs
    device = resolve_device(args.device)
    data = load_dataset(cfg.dataset, device=device, data_dir=args.data_dir)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    print(f"{spec.name} fixed config on {device} ({torch.get_num_threads()} threads): "
          f"{cfg.model.arch} channels={cfg.model.channels} filter={cfg.model.filter_size} "
          f"dropout={cfg.model.dropout} {cfg.train.optimizer} lr={cfg.train.lr} "
          f"batch={cfg.train.batch_size}; {count_parameters(model):,} parameters; "
          f"train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)}")

    def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
        print(f"epoch {epoch:>2}: train_loss {metrics['train_loss']:.4f} "
              f"val_accuracy {metrics['val_accuracy']:.4f} ({metrics['epoch_seconds']:.1f}s)",
              flush=True)
        return False

    started = time.perf_counter()
    fit(model, data, cfg.train, epochs=epochs, device=device, augment=cfg.dataset.augment,
        on_epoch=on_epoch)
    seconds = time.perf_counter() - started
    test = evaluate(model, data.test, classes=data.classes)
    print(f"test accuracy after {epochs} epochs: {test.metrics['accuracy']:.4%} "
          f"(floor 99.0%); training time {seconds:.0f}s on {device}")


if __name__ == "__main__":
    main()
