"""A trial's model as an MLflow pyfunc: raw images in, class probabilities and labels out.

MLflow's `pyfunc` loader imports this module (the model's `MLmodel` names it as its
`loader_module`) and calls `_load_pyfunc` on the model's `sweeper_model/` folder: the
network is rebuilt by `sweeper.ml.modelfile` from its config and safetensors weights, so
nothing in the model's files is unpickled or executed.

`predict` takes images as a person has them and prepares them as training did:

- pixel values 0-255 (any integer type, or floats above 1) or 0-1;
- `[N, H, W]` (one channel), `[N, C, H, W]`, `[N, H, W, C]` or `[N, C*H*W]` rows;
- then each channel is normalised with the training split's mean and std.

It returns `{"probabilities": float32 [N, K], "label": int64 [N]}`.

This module imports no mlflow: the pyfunc protocol is only a function and a method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from sweeper.ml.modelfile import ModelInfo, read_model

if TYPE_CHECKING:
    from torch import nn

BATCH = 2048  # images per forward pass


class ImageClassifier:
    """What `mlflow.pyfunc.load_model` wraps: one trial's network and its input recipe."""

    def __init__(self, model: nn.Module, info: ModelInfo, device: str = "cpu") -> None:
        self.model = model
        self.info = info
        self.device = device

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        import torch

        images = prepare_images(data, self.info)
        chunks = []
        with torch.no_grad():
            for start in range(0, len(images), BATCH):
                batch = torch.from_numpy(images[start:start + BATCH]).to(self.device)
                chunks.append(torch.softmax(self.model(batch).float(), dim=1).cpu())
        k = self.info.num_classes
        probabilities = (torch.cat(chunks).numpy() if chunks
                         else np.zeros((0, k), dtype=np.float32)).astype(np.float32)
        return {"probabilities": probabilities,
                "label": probabilities.argmax(axis=1).astype(np.int64)}


def prepare_images(data: Any, info: ModelInfo) -> np.ndarray:
    """Raw images as the network saw them in training: float32 [N, C, H, W], each channel
    normalised. A shape that cannot be read as images of `info.input_shape` is a
    ValueError that says which shapes are accepted."""
    c, h, w = info.input_shape
    x = _as_array(data)
    if x.dtype == object or x.dtype.kind not in "biuf":
        x = x.astype(np.float32)
    raw_255 = x.dtype.kind in "iu" or (x.size > 0 and float(np.nanmax(x)) > 1.0)
    x = x.astype(np.float32)
    if x.ndim == 2 and x.shape[1] == c * h * w:
        x = x.reshape(-1, c, h, w)
    elif x.ndim == 3 and c == 1 and x.shape[1:] == (h, w):
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1:] == (c, h, w):
        pass
    elif x.ndim == 4 and x.shape[1:] == (h, w, c):
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    else:
        accepted = [f"[N, {c}, {h}, {w}]", f"[N, {h}, {w}, {c}]", f"[N, {c * h * w}]"]
        if c == 1:
            accepted.insert(0, f"[N, {h}, {w}]")
        raise ValueError(f"images of shape {list(x.shape)} do not fit this model; give "
                         f"{' or '.join(accepted)}, pixel values 0-255 or 0-1")
    if raw_255:
        x = x / 255.0
    mean = np.asarray(info.mean, dtype=np.float32).reshape(1, c, 1, 1)
    std = np.asarray(info.std, dtype=np.float32).reshape(1, c, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def _as_array(data: Any) -> np.ndarray:
    """numpy from what pyfunc hands over: an array, a list, a tensor, a DataFrame (rows of
    pixels) or a one-entry dict of one of these."""
    if isinstance(data, dict):
        if len(data) != 1:
            raise ValueError(f"expected one input (the images), but got {sorted(data)[:5]}")
        data = next(iter(data.values()))
    if hasattr(data, "to_numpy"):  # pandas
        data = data.to_numpy()
    if hasattr(data, "detach"):  # torch
        data = data.detach().cpu().numpy()
    return np.asarray(data)


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> ImageClassifier:
    """MLflow's entry point: `path` is the model's `sweeper_model/` folder."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, info = read_model(path, device=device)
    return ImageClassifier(model, info, device)
