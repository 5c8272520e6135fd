"""Train one trial again from its logged config and seed (`sweeper rerun`).

The trial's flat config (`train.lr`, `model.filter_size`, ... and `train.seed`) rebuilds
the same dataset split, the same initial weights and the same batch order; on the CPU
training is deterministic, so the new validation and test metrics equal the logged ones.
On a GPU (bf16 autocast, non-deterministic kernels) they may move in the last digits.
"""

from __future__ import annotations

from pathlib import Path

from sweeper.errors import ResultError
from sweeper.results.read import get_trial
from sweeper.results.scoring import TrialScore
from sweeper.spec.config import TrialConfig

# Logged figures that measure the machine, not the model: never compared.
_NOT_COMPARED = ("train_seconds",)


def rerun_trial(study: str, number: int, *, storage: str | None = None,
                tracking_uri: str | None = None, data_dir: str | Path | None = None,
                device: str | None = None) -> TrialScore:
    """Retrain trial `number` of `study` and return its new final metrics beside the
    logged ones (the same keys: val_*, test_*, n_params, epochs_run)."""
    from sweeper.ml.data import load_dataset
    from sweeper.ml.metrics import evaluate, prefixed
    from sweeper.ml.models import build_model, count_parameters
    from sweeper.ml.train import fit, resolve_device, seed_everything

    trial = get_trial(study, number, storage=storage, tracking_uri=tracking_uri)
    if trial.state != "COMPLETE" or not trial.config:
        raise ResultError(f"trial {number} of study {study!r} is {trial.state}: only a "
                          f"completed trial logged the final metrics to compare with; pick "
                          f"one from `sweeper trials {study}`")
    config = TrialConfig.from_flat(trial.config)
    torch_device = resolve_device(device)
    data = load_dataset(config.dataset, device=torch_device, data_dir=data_dir)
    # The same steps, in the same order, as the study's own training of a trial.
    seed_everything(config.train.seed)
    model = build_model(config.model, data.input_shape, data.num_classes, data_dir=data_dir)
    result = fit(model, data, config.train, epochs=config.epochs, device=torch_device,
                 augment=config.dataset.augment)
    val = evaluate(model, data.val, classes=data.classes,
                   batch_size=config.train.eval_batch_size)
    test = evaluate(model, data.test, classes=data.classes,
                    batch_size=config.train.eval_batch_size)
    metrics = {**prefixed(val.metrics, "val"), **prefixed(test.metrics, "test"),
               "n_params": float(count_parameters(model)),
               "epochs_run": float(len(result.history))}
    logged = {k: v for k, v in trial.metrics.items() if k not in _NOT_COMPARED}
    return TrialScore(trial, {k: metrics[k] for k in logged if k in metrics}, logged)
