"""A trial's static figures: real PNG files, small, drawn from what an evaluation holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sweeper.ml.metrics import evaluate_probabilities
from sweeper.render.images import confusion_image, write_trial_images

CLASSES = ["cat", "dog", "bird"]


def test_trial_images_are_small_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    probs = rng.dirichlet(np.ones(3), 200).astype(np.float32)
    ev = evaluate_probabilities(probs, labels, CLASSES)
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "train_accuracy": 0.5,
                "val_accuracy": 0.4},
               {"epoch": 2, "train_loss": 0.5, "val_loss": 0.7, "train_accuracy": 0.8,
                "val_accuracy": 0.7}]
    written = write_trial_images(tmp_path / "plots", history, {"val": ev, "test": ev},
                                 CLASSES)
    assert sorted(p.name for p in written) == ["confusion_matrix_test.png",
                                               "confusion_matrix_val.png", "history.png",
                                               "roc_test.png"]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and 2_000 < len(data) < 100_000


def test_confusion_image_checks_its_shape() -> None:
    with pytest.raises(ValueError, match="must have shape"):
        confusion_image(np.zeros((2, 2)), CLASSES, title="x")
