"""The tiny study most tests run: synthetic 8x8 images, a small MLP, one epoch, a seeded
random sampler and one searched learning rate. Each test changes only what it is about."""

from __future__ import annotations


def tiny_study(name: str = "tiny", *, trials: int = 2, epochs: int = 1, train: int = 256,
               test: int = 64, image: int = 8, hidden: str = "[16]", model: str = "",
               train_block: str = "", lr: str = "[1.0e-3, 3.0e-2]", extra: str = "") -> str:
    """A study file's text. `model`: more keys of the model block (`dropout: 0.0`);
    `train_block`: the train block's keys (`batch_size: 32`); `extra`: more top-level
    lines (before `space:`)."""
    model_keys = f"arch: mlp, hidden: {hidden}" + (f", {model}" if model else "")
    lines = [
        f"name: {name}",
        f"dataset: {{name: synthetic, synthetic: {{train_size: {train}, test_size: {test}, "
        f"image_size: {image}}}}}",
        f"model: {{{model_keys}}}",
    ]
    if train_block:
        lines.append(f"train: {{{train_block}}}")
    lines += [
        f"budget: {{trials: {trials}, epochs: {epochs}}}",
        "sampler: {name: random, seed: 0}",
    ]
    if extra:
        lines.append(extra.rstrip("\n"))
    lines += ["space:", f"  train.lr: {{float: {lr}, log: true}}"]
    return "\n".join(lines) + "\n"
