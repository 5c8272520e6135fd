"""The peer of `vs_hand_loop.py`: the sweep a user writes by hand, the plain tutorial way.

Optuna's `study.optimize` with optuna-integration's `MLflowCallback`, and the torchvision
MNIST tutorial loop (Dataset + ToTensor/Normalize per sample + DataLoader, validation after
every epoch, a test pass at the end). Same space, budget and images as the sweeper study in
`vs_hand_loop.py`, which starts this file as its own process:

    python benchmarks/hand_loop.py --data-dir DIR --workdir DIR --split FILE.json \
        --trials 3 --epochs 1 --phases OUT.json

The only additions to the tutorial code are the `phase(...)` clocks, which write where the
time went (seconds per phase, and when the first training batch started) to --phases.
"""

import argparse
import json
import time

T_START = time.time()

import mlflow  # noqa: E402  (the imports are part of what a user's process pays)
import optuna  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from optuna_integration.mlflow import MLflowCallback  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

PHASES = {"data": 0.0, "train": 0.0, "validation": 0.0, "final evaluation": 0.0,
          "tracking": 0.0}
FIRST_BATCH = []  # time.time() of the first training batch


class phase:  # lower case: reads like a statement, `with phase("train"):`
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.started = time.perf_counter()

    def __exit__(self, *exc):
        PHASES[self.name] += time.perf_counter() - self.started


class Net(nn.Module):
    """The classic MNIST ConvNet: (Conv-ReLU-MaxPool) x2 -> Dropout -> Linear."""

    def __init__(self, filter_size, dropout):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, filter_size)
        self.conv2 = nn.Conv2d(32, 64, filter_size)
        self.dropout = nn.Dropout(dropout)
        side = ((28 - filter_size + 1) // 2 - filter_size + 1) // 2
        self.fc = nn.Linear(64 * side * side, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(self.dropout(torch.flatten(x, 1)))


def evaluate(model, loader):
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            output = model(x)
            loss += F.cross_entropy(output, y, reduction="sum").item()
            correct += (output.argmax(dim=1) == y).sum().item()
    return loss / len(loader.dataset), correct / len(loader.dataset)


def main():
    parser = argparse.ArgumentParser()
    for name in ("--data-dir", "--workdir", "--split", "--phases"):
        parser.add_argument(name, required=True)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    with phase("data"):
        with open(args.split) as f:
            split = json.load(f)
        transform = transforms.Compose([transforms.ToTensor(),
                                        transforms.Normalize((0.1307,), (0.3081,))])
        full = datasets.MNIST(args.data_dir, train=True, download=False, transform=transform)
        test = datasets.MNIST(args.data_dir, train=False, download=False, transform=transform)
        train = torch.utils.data.Subset(full, split["train"])
        val = torch.utils.data.Subset(full, split["val"])
        val_loader = torch.utils.data.DataLoader(val, batch_size=1000)
        test_loader = torch.utils.data.DataLoader(test, batch_size=1000)

    def objective(trial):
        lr = trial.suggest_float("train.lr", 1e-4, 1e-1, log=True)
        dropout = trial.suggest_float("model.dropout", 0.0, 0.7)
        filter_size = trial.suggest_categorical("model.filter_size", [1, 3, 5])
        batch_size = trial.suggest_categorical("train.batch_size", [64, 128, 256])
        torch.manual_seed(0)
        model = Net(filter_size, dropout)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        train_loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True)
        for epoch in range(1, args.epochs + 1):
            with phase("train"):
                model.train()
                for x, y in train_loader:
                    if not FIRST_BATCH:
                        FIRST_BATCH.append(time.time())
                    optimizer.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    optimizer.step()
            with phase("validation"):
                _, val_accuracy = evaluate(model, val_loader)
            trial.report(val_accuracy, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        with phase("final evaluation"):
            _, test_accuracy = evaluate(model, test_loader)
        trial.set_user_attr("test_accuracy", test_accuracy)
        return val_accuracy

    with phase("tracking"):
        callback = MLflowCallback(tracking_uri=f"sqlite:///{args.workdir}/mlflow.db",
                                  metric_name="val_accuracy")
        mlflow.set_tracking_uri(f"sqlite:///{args.workdir}/mlflow.db")

    def tracked(study, trial):
        with phase("tracking"):
            callback(study, trial)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="hand-loop", direction="maximize",
                                storage=f"sqlite:///{args.workdir}/optuna.db",
                                sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=args.trials, callbacks=[tracked])
    with open(args.phases, "w") as f:
        json.dump({"start": T_START, "first_batch": FIRST_BATCH[0], "phases": PHASES,
                   "params": [t.params for t in study.trials]}, f)


if __name__ == "__main__":
    main()
