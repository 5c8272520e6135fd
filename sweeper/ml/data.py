"""Datasets as normalised tensors resident on the training device.

Every dataset sweeper knows is small enough to live whole in (GPU) memory, so a trial never
touches a DataLoader: `load_dataset` reads the raw files once, splits off a seeded validation
set, normalises with the training split's statistics and moves each split to the device a
single time; `batches` then slices a random permutation and `augment` transforms a whole
batch with one `affine_grid` + `grid_sample` call. No per-sample Python anywhere.

Loaded datasets are cached per process (several trials in one worker share them), so the
tensors handed out are shared: callers must never modify them in place (`augment` and the
batch indexing in `batches` always return new tensors). The dataclasses are frozen and the
class-name list is copied per call, so only an explicit in-place tensor op could corrupt it.

Loading here never imports optuna or mlflow; sklearn is imported only for `digits`.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sweeper.errors import DataError
from sweeper.spec.config import AugmentConfig, DatasetConfig, SyntheticConfig

DATA_DIR_ENV = "SWEEPER_DATA_DIR"
CACHE_DIR_ENV = "SWEEPER_CACHE_DIR"
DOWNLOAD_TIMEOUT_S = 20.0  # per socket operation, so an unreachable mirror fails, not hangs

# name in the study file -> (torchvision class and folder, where the files come from)
_MNIST_FAMILY: dict[str, tuple[str, str]] = {
    "mnist": ("MNIST", "the MNIST release"),
    "fashion_mnist": ("FashionMNIST", "the Fashion-MNIST release"),
    "kmnist": ("KMNIST", "the Kuzushiji-MNIST release"),
}
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_FILES = (*_CIFAR_TRAIN, "test_batch", "batches.meta")
_CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                  "ship", "truck"]

# Synthetic templates come from a fixed seed so that the *task* is the same for every
# `dataset.seed`; the seed only changes which noisy samples are drawn. An amplitude of 2
# against unit noise keeps the task easy (a linear model separates 4 classes of 16x16
# almost perfectly) while still needing a few steps of training.
_SYNTHETIC_TEMPLATE_SEED = 20240531
_SYNTHETIC_AMPLITUDE = 2.0

# Independent random streams derived from one `dataset.seed`.
_STREAM_VAL, _STREAM_TEST, _STREAM_DIGITS, _STREAM_SYNTHETIC = 1, 2, 3, 4


@dataclass(frozen=True)
class Split:
    """One split: `x` float32 (N, C, H, W), normalised; `y` int64 (N,); both on the device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: three splits on one device plus what reports need to describe it.

    Shared through the process cache: do not modify the tensors in place.
    """

    name: str
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    classes: list[str]
    mean: tuple[float, ...]  # per-channel normalisation used (train split statistics)
    std: tuple[float, ...]


@dataclass(frozen=True)
class _Raw:
    """Images as read from disk, before splitting: CPU tensors (N, C, H, W), labels int64.

    `x` is uint8 (0..255) or float32 already scaled (digits to [0, 1], synthetic as drawn).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def resolve_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The data directory, absolute: `explicit` > $SWEEPER_DATA_DIR > ./data.

    The study file says what to load, the environment says where it lies, so the same study
    runs on a laptop and a cluster node without edits.
    """
    chosen: str | os.PathLike[str] = (explicit if explicit is not None
                                      else os.environ.get(DATA_DIR_ENV) or "data")
    return Path(chosen).expanduser().resolve()


def load_dataset(cfg: DatasetConfig, device: torch.device | str = "cpu",
                 data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Load, split, normalise and move `cfg`'s dataset to `device`, cached per process.

    The validation split is a seeded random `cfg.val_fraction` of the training set and does
    not depend on `cfg.subset`, so trials with different subsets are judged on the same
    images. Raises DataError (one line that says what to put where) when files are missing,
    cannot be downloaded or are corrupt.
    """
    root = resolve_data_dir(data_dir)
    # Augmentation is applied per batch later and download only matters on a miss: neither
    # changes the tensors, so neither is part of the cache key.
    key = cfg.model_dump_json(exclude={"augment", "download"})
    dataset = _load_cached(key, cfg.download, str(root), str(torch.device(device)))
    # The one mutable field: hand out a copy so a caller cannot edit the cached list.
    return dataclasses.replace(dataset, classes=list(dataset.classes))


def clear_cache() -> None:
    """Forget every cached dataset (frees its memory, device memory included)."""
    _load_cached.cache_clear()
    _load_raw.cache_clear()


def batches(split: Split, batch_size: int, *, shuffle: bool,
            generator: torch.Generator | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `(x, y)` mini-batches of `split`; the last, partial batch is kept.

    With `shuffle`, one `randperm` per epoch is sliced, so every example is seen exactly
    once per epoch. The permutation is drawn on `generator`'s device (a CPU generator works
    with CUDA data, and seeded CPU draws are reproducible across machines) and then moved
    next to the data. Without `shuffle`, batches are views in storage order (no copy).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, but got {batch_size}")
    n = len(split)
    if not shuffle:
        for start in range(0, n, batch_size):
            yield split.x[start:start + batch_size], split.y[start:start + batch_size]
        return
    if generator is None:
        order = torch.randperm(n, device=split.x.device)
    else:
        order = torch.randperm(n, generator=generator, device=generator.device)
        order = order.to(split.x.device)
    for index in order.split(batch_size):
        # index_select, not split.x[index]: the same rows, 7-11x faster on the CPU
        # (a contiguous copy per row instead of the general advanced-indexing kernel)
        yield split.x.index_select(0, index), split.y.index_select(0, index)


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None,
            *, fill: float | Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Randomly rotate (±`cfg.rotate` degrees) and shift (±`cfg.shift` whole pixels) a batch.

    One `affine_grid` + `grid_sample` over the whole batch (bilinear), so it costs about
    as much as one conv layer. Returns `x` itself when both settings are 0. Randomness
    comes from `generator` (drawn on its device, then moved), so a seeded generator gives
    the same batch every time.

    Area uncovered by the transform is filled with `fill` (per channel). By default that is
    each channel's minimum over the batch: in normalised space a zero would be a mid-grey
    (the mean), while the background pixel 0 becomes (0 - mean) / std, which is the
    channel minimum of any batch that contains a black pixel (always true for the MNIST
    family; near-true for CIFAR-10). Pass `fill` to pin it exactly.
    """
    if cfg.rotate == 0 and cfg.shift == 0:
        return x
    if x.ndim != 4:
        raise ValueError(f"augment expects a batch (N, C, H, W), but got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if n == 0:
        return x
    draw_on = generator.device if generator is not None else x.device
    angle = (torch.rand(n, generator=generator, device=draw_on) * 2 - 1) * math.radians(
        cfg.rotate)
    shift = torch.randint(-cfg.shift, cfg.shift + 1, (n, 2), generator=generator,
                          device=draw_on)
    angle = angle.to(x.device, x.dtype)
    shift = shift.to(x.device, x.dtype)

    # theta maps output coordinates to input ones in normalised [-1, 1] space; the h/w
    # factors make the rotation rigid in pixel space for non-square images too.
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([cos, -sin * (h / w), shift[:, 0] * (2.0 / w)], dim=1),
        torch.stack([sin * (w / h), cos, shift[:, 1] * (2.0 / h)], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)

    if fill is None:
        background = x.amin(dim=(0, 2, 3), keepdim=True)
    else:
        background = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    # grid_sample pads with zeros only: shift the data so that zero *is* the background.
    out = F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out + background


# --------------------------------------------------------------------------------------
# Split, normalise, move
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _load_cached(key: str, download: bool, root: str, device: str) -> Dataset:
    cfg = DatasetConfig.model_validate_json(key)
    raw = _load_raw(*_raw_key(cfg, download, root))
    return _assemble(cfg, raw, torch.device(device))


def _raw_key(cfg: DatasetConfig, download: bool, root: str) -> tuple[str, str, bool, int, str]:
    """What the raw files depend on: digits' train/test split and synthetic draws use the
    seed; torchvision datasets depend on the folder alone."""
    seed = cfg.seed if cfg.name in ("digits", "synthetic") else 0
    synthetic = cfg.synthetic.model_dump_json() if cfg.name == "synthetic" else ""
    return cfg.name, root, download, seed, synthetic


def _assemble(cfg: DatasetConfig, raw: _Raw, device: torch.device) -> Dataset:
    train_idx, val_idx = _split_indices(len(raw.train_y), cfg.val_fraction, cfg.subset,
                                        cfg.seed)
    test_idx = _subset_indices(len(raw.test_y), cfg.test_subset, cfg.seed)

    # Index on the CPU, move once (uint8 is 4x smaller to move), convert on the device.
    train_raw = raw.train_x[train_idx].to(device)
    val_raw = raw.train_x[val_idx].to(device)
    test_raw = raw.test_x[test_idx].to(device)
    channels = int(train_raw.shape[1])
    if cfg.normalize:
        mean, std = _channel_stats(train_raw)
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    # uint8 pixels go to [0, 1] first: (x/255 - mean)/std = (x - 255 mean)/(255 std).
    # Applied in place on the one float copy: large allocations dominate the load time.
    scale = 255.0 if train_raw.dtype == torch.uint8 else 1.0
    shape = (1, channels, 1, 1)
    shift = torch.tensor([m * scale for m in mean], dtype=torch.float32, device=device)
    divide = torch.tensor([s * scale for s in std], dtype=torch.float32, device=device)

    def split(x: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> Split:
        x = x.to(torch.float32, copy=True)
        x.sub_(shift.reshape(shape)).div_(divide.reshape(shape))
        return Split(x.contiguous(), labels[idx].to(device))

    return Dataset(
        name=cfg.name,
        train=split(train_raw, raw.train_y, train_idx),
        val=split(val_raw, raw.train_y, val_idx),
        test=split(test_raw, raw.test_y, test_idx),
        input_shape=(channels, int(train_raw.shape[2]), int(train_raw.shape[3])),
        num_classes=cfg.num_classes,
        classes=list(raw.classes),
        mean=mean,
        std=std,
    )


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of `x`, on the [0, 1] scale for uint8 pixels.

    uint8 statistics come exactly from a 256-bin histogram per channel, which is an order
    of magnitude faster than a float reduction over 40M pixels; a constant channel gets
    std 1 so normalising never divides by zero.
    """
    means: list[float] = []
    stds: list[float] = []
    values = torch.arange(256, dtype=torch.float64, device=x.device) / 255.0
    for c in range(x.shape[1]):
        channel = x[:, c]
        if x.dtype == torch.uint8:
            counts = torch.bincount(channel.reshape(-1), minlength=256).to(torch.float64)
            total = counts.sum()
            mean_t = (counts * values).sum() / total
            var_t = (counts * (values - mean_t) ** 2).sum() / total
        else:
            flat = channel.reshape(-1).to(torch.float64)
            var_t, mean_t = torch.var_mean(flat, correction=0)
        mean = float(mean_t)
        std = math.sqrt(float(var_t))
        means.append(mean)
        stds.append(std if std > 1e-8 else 1.0)
    return tuple(means), tuple(stds)


def _generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one purpose (`stream`) of `seed`: independent draws per purpose."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) % (2**63))


def _split_indices(n: int, val_fraction: float, subset: int | None, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (train, val) indices: a seeded `val_fraction` is held out, then at most
    `subset` of the rest are kept. Val never depends on `subset`."""
    if n < 2:
        raise DataError(f"the training set has {n} image(s); need at least 2 to hold out "
                        f"a validation split")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    order = torch.randperm(n, generator=_generator(seed, _STREAM_VAL))
    val, train = order[:n_val], order[n_val:]
    if subset is not None:
        train = train[:subset]
    return _sorted(train, n), _sorted(val, n)


def _subset_indices(n: int, subset: int | None, seed: int) -> torch.Tensor:
    if subset is None or subset >= n:
        return torch.arange(n)
    order = torch.randperm(n, generator=_generator(seed, _STREAM_TEST))
    return _sorted(order[:subset], n)


def _sorted(index: torch.Tensor, n: int) -> torch.Tensor:
    """Distinct indices below `n` in increasing order, in O(n) (a mask, not a sort): kept
    splits stay in file order, which makes gathers cache-friendly and results readable."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[index] = True
    return mask.nonzero().squeeze(1)


# --------------------------------------------------------------------------------------
# Raw loaders
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _load_raw(name: str, root: str, download: bool, seed: int, synthetic: str) -> _Raw:
    path = Path(root)
    if name in _MNIST_FAMILY:
        raw = _load_mnist_family(name, path, download)
    elif name == "cifar10":
        raw = _load_cifar10(path, download)
    elif name == "digits":
        raw = _load_digits(seed)
    elif name == "synthetic":
        raw = _make_synthetic(SyntheticConfig.model_validate_json(synthetic), seed)
    else:  # the schema rules this out; kept for a clear message if it ever grows
        raise DataError(f"unknown dataset {name!r}")
    return raw


def _load_mnist_family(name: str, root: Path, download: bool) -> _Raw:
    folder, origin = _MNIST_FAMILY[name]
    raw_dir = root / folder / "raw"
    _unpack_gz(raw_dir, _MNIST_FILES)
    decoded = _decoded_cache(folder, raw_dir, _MNIST_FILES)
    raw = decoded.read() if decoded is not None else None
    if raw is not None:
        return raw
    import torchvision

    cls = getattr(torchvision.datasets, folder)
    legacy = root / folder / "processed"
    has_legacy = (legacy / "training.pt").is_file() and (legacy / "test.pt").is_file()
    if not has_legacy and _missing(raw_dir, _MNIST_FILES):
        why = "dataset.download is false"
        if download:
            why = _try_download(lambda: cls(root=str(root), train=False, download=True))
        missing = _missing(raw_dir, _MNIST_FILES)
        if missing:
            raise DataError(
                f"{folder} not found in {raw_dir}: put {', '.join(_MNIST_FILES)} there "
                f"(uncompressed, from {origin}), or set {DATA_DIR_ENV} to a folder that has "
                f"{folder}/raw/ ({why})")
    try:
        train = cls(root=str(root), train=True, download=False)
        test = cls(root=str(root), train=False, download=False)
        train_x, train_y = train.data, train.targets
        test_x, test_y = test.data, test.targets
        classes = tuple(str(c) for c in train.classes)
    except Exception as exc:  # torchvision asserts, TypeError, RuntimeError on bad files
        raise DataError(f"{folder} in {raw_dir} cannot be read ({_short(exc)}); the files "
                        f"may be truncated or corrupt: replace {', '.join(_MNIST_FILES)}"
                        ) from exc
    for part, x, y in (("train", train_x, train_y), ("t10k", test_x, test_y)):
        problem = _check_arrays(x, y, (28, 28), 10)
        if problem:
            raise DataError(f"{folder} in {raw_dir} holds unexpected {part} data: {problem}; "
                            f"replace {part}-images-idx3-ubyte and {part}-labels-idx1-ubyte")
    raw = _Raw(torch.as_tensor(train_x).unsqueeze(1), torch.as_tensor(train_y).long(),
               torch.as_tensor(test_x).unsqueeze(1), torch.as_tensor(test_y).long(), classes)
    if decoded is None:  # the raw files appeared just now (a download)
        decoded = _decoded_cache(folder, raw_dir, _MNIST_FILES)
    if decoded is not None:
        decoded.write(raw)
    return raw


def _load_cifar10(root: Path, download: bool) -> _Raw:
    folder = root / _CIFAR_FOLDER
    decoded = _decoded_cache("cifar10", folder, _CIFAR_FILES)
    raw = decoded.read() if decoded is not None else None
    if raw is not None:
        return raw
    if _missing(folder, _CIFAR_FILES):
        why = "dataset.download is false"
        if download:
            import torchvision

            why = _try_download(lambda: torchvision.datasets.CIFAR10(
                root=str(root), train=False, download=True))
        if _missing(folder, _CIFAR_FILES):
            raise DataError(
                f"CIFAR-10 not found in {folder}: put {', '.join(_CIFAR_FILES)} there (unpack "
                f"cifar-10-python.tar.gz from the CIFAR-10 release), or set {DATA_DIR_ENV} to "
                f"a folder that has {_CIFAR_FOLDER}/ ({why})")
    # Read the pickles ourselves: torchvision would insist on the release's md5 sums.
    try:
        train = [_read_cifar_batch(folder / f) for f in _CIFAR_TRAIN]
        test_x, test_y = _read_cifar_batch(folder / "test_batch")
        meta = _unpickle(folder / "batches.meta")
        names = meta.get("label_names", _CIFAR_CLASSES) if isinstance(meta, dict) else None
        classes = tuple(str(c) for c in names) if names else tuple(_CIFAR_CLASSES)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"CIFAR-10 in {folder} cannot be read ({_short(exc)}); the files "
                        f"may be truncated or corrupt: unpack cifar-10-python.tar.gz again"
                        ) from exc
    train_x = torch.cat([x for x, _ in train])
    train_y = torch.cat([y for _, y in train])
    if len(classes) != 10:
        classes = tuple(_CIFAR_CLASSES)
    raw = _Raw(train_x, train_y, test_x, test_y, classes)
    decoded = decoded or _decoded_cache("cifar10", folder, _CIFAR_FILES)
    if decoded is not None:
        decoded.write(raw)
    return raw


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled CIFAR batch: rows of 3072 bytes, R then G then B planes (already CHW)."""
    entry = _unpickle(path)
    if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
        raise DataError(f"{path} is not a CIFAR-10 batch (expected a dict with 'data' and "
                        f"'labels'); unpack cifar-10-python.tar.gz again")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataError(f"{path} holds data of shape {data.shape} with {len(labels)} labels; "
                        f"expected (N, 3072) and N labels: unpack cifar-10-python.tar.gz again")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    y = torch.from_numpy(labels.copy())
    problem = _check_arrays(x, y, (3, 32, 32), 10)
    if problem:
        raise DataError(f"{path} holds unexpected data: {problem}")
    return x, y


# md5 of each file of the CIFAR-10 python release (cifar-10-python.tar.gz), as torchvision
# lists them.
_CIFAR_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays, and nothing else: a pickle
    that names any other function or class (the way a pickle runs code) is refused."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}: not plain data")


def _unpickle(path: Path) -> object:
    """A CIFAR pickle, checked against the release's md5 first and read as plain data
    only, so that a file someone replaced can never run code."""
    raw = path.read_bytes()
    expected = _CIFAR_MD5.get(path.name)
    if expected is not None and hashlib.md5(raw, usedforsecurity=False).hexdigest() != expected:
        _warn_once(f"{path} differs from the CIFAR-10 release (md5); it is read as plain "
                   f"data only")
    try:
        return _DataOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path} is not a CIFAR-10 batch ({exc}); unpack "
                        f"cifar-10-python.tar.gz again") from None


@functools.lru_cache(maxsize=64)
def _warn_once(message: str) -> None:
    import logging

    logging.getLogger(__name__).warning(message)


def _load_digits(seed: int) -> _Raw:
    """scikit-learn's 8x8 digits (1,797 images, bundled with sklearn, values 0..16)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    order = torch.randperm(len(y), generator=_generator(seed, _STREAM_DIGITS))
    n_test = round(len(y) * 0.2)
    test, train = _sorted(order[:n_test], len(y)), _sorted(order[n_test:], len(y))
    return _Raw(x[train], y[train], x[test], y[test], tuple(str(d) for d in range(10)))


def _make_synthetic(cfg: SyntheticConfig, seed: int) -> _Raw:
    """Class templates from a fixed seed; samples `template[y] + noise * N(0, 1)`."""
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    templates = torch.randn((cfg.classes, *shape),
                            generator=torch.Generator().manual_seed(_SYNTHETIC_TEMPLATE_SEED))
    templates *= _SYNTHETIC_AMPLITUDE
    gen = _generator(seed, _STREAM_SYNTHETIC)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.arange(n) % cfg.classes)[torch.randperm(n, generator=gen)]
        x = templates[y] + cfg.noise * torch.randn((n, *shape), generator=gen)
        return x, y

    train_x, train_y = draw(cfg.train_size)
    test_x, test_y = draw(cfg.test_size)
    classes = tuple(f"class_{i}" for i in range(cfg.classes))
    return _Raw(train_x, train_y, test_x, test_y, classes)


# --------------------------------------------------------------------------------------
# The decoded cache: one tensor file per dataset, keyed by the raw files' checksum
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _DecodedCache:
    """Decoding the release's files (and importing torchvision to do it) costs a worker
    seconds at start-up; a cached copy is one memory-mapped `torch.load`. The name holds
    a checksum of the raw files' bytes, so replaced files are decoded afresh; the file is
    written whole or not at all (a temporary name, then a rename). Unreadable or
    unwritable caches are skipped: the raw files stay the truth."""

    path: Path

    def read(self) -> _Raw | None:
        if not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            return _Raw(saved["train_x"], saved["train_y"], saved["test_x"], saved["test_y"],
                        tuple(saved["classes"]))
        except Exception:  # truncated, another torch's format, ...: decode again
            return None

    def write(self, raw: _Raw) -> None:
        partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.part")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"train_x": raw.train_x, "train_y": raw.train_y,
                        "test_x": raw.test_x, "test_y": raw.test_y,
                        "classes": list(raw.classes)}, partial)
            partial.replace(self.path)
        except OSError:
            partial.unlink(missing_ok=True)


def cache_dir() -> Path:
    """Where decoded datasets are kept: $SWEEPER_CACHE_DIR, else ~/.cache/sweeper."""
    chosen = os.environ.get(CACHE_DIR_ENV)
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sweeper"


def _decoded_cache(name: str, folder: Path, files: Sequence[str]) -> _DecodedCache | None:
    """The cache entry for these raw files, or None while any is missing."""
    if _missing(folder, files):
        return None
    digest = hashlib.sha1(usedforsecurity=False)
    for file in files:
        with open(folder / file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return _DecodedCache(cache_dir() / f"{name}-{digest.hexdigest()[:20]}.pt")


# --------------------------------------------------------------------------------------
# Files and downloads
# --------------------------------------------------------------------------------------
def _missing(folder: Path, files: Sequence[str]) -> list[str]:
    return [f for f in files if not (folder / f).is_file()]


def _unpack_gz(folder: Path, files: Sequence[str]) -> None:
    """Unpack `name.gz` next to a missing `name`: users often fetch the release's archives."""
    for name in _missing(folder, files):
        archive = folder / f"{name}.gz"
        if not archive.is_file():
            continue
        target = folder / name
        partial = folder / f"{name}.part"
        try:
            with gzip.open(archive, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.replace(target)
        except (OSError, EOFError) as exc:
            partial.unlink(missing_ok=True)
            raise DataError(f"cannot unpack {archive} ({_short(exc)}): unpack it yourself "
                            f"into {target}") from exc


def _try_download(fetch: Callable[[], object]) -> str:
    """Run torchvision's download; return why it failed ('' on success), never raise.

    torchvision's urlopen calls set no timeout, so a black-holed mirror would hang a worker
    for ever: a socket default timeout bounds each connect and read while it runs.
    """
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        fetch()
    except Exception as exc:  # URLError, socket.timeout, RuntimeError, PermissionError...
        return f"download failed: {_short(exc)}"
    finally:
        socket.setdefaulttimeout(previous)
    return "download did not provide them"


def _short(exc: BaseException) -> str:
    """The last meaningful line of an exception, for a one-line message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _check_arrays(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
                  image_shape: tuple[int, ...], num_classes: int) -> str | None:
    """What is wrong with a decoded (images, labels) pair, or None."""
    if tuple(x.shape[1:]) != image_shape:
        return f"images of shape {tuple(x.shape[1:])}, expected {image_shape}"
    if len(x) != len(y):
        return f"{len(x)} images but {len(y)} labels"
    if len(y) == 0:
        return "no images"
    y_t = torch.as_tensor(y)
    if int(y_t.min()) < 0 or int(y_t.max()) >= num_classes:
        return f"labels outside 0..{num_classes - 1}"
    return None
