"""sweeper.ml.data: loading, splitting, normalising, batching and augmenting on tensors."""

from __future__ import annotations

import dataclasses
import pickle
import socket
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from sweeper.errors import DataError
from sweeper.ml import data
from sweeper.ml.data import Dataset, Split, augment, batches, load_dataset, resolve_data_dir
from sweeper.spec.config import AugmentConfig, DatasetConfig, SyntheticConfig


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Each test sees files as they are now, not a dataset cached by an earlier test."""
    data.clear_cache()
    yield
    data.clear_cache()


# --------------------------------------------------------------------------------------
# Writers of tiny files in the real formats
# --------------------------------------------------------------------------------------
def write_idx(root: Path, folder: str, n_train: int = 50, n_test: int = 20, seed: int = 0
              ) -> dict[str, np.ndarray]:
    """MNIST-family IDX files (big-endian, magic 2051 images / 2049 labels), uncompressed."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays: dict[str, np.ndarray] = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{part}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{part}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.tobytes())
        arrays[f"{part}_x"], arrays[f"{part}_y"] = images, labels
    return arrays


def write_cifar(root: Path, per_batch: int = 4, n_test: int = 6) -> dict[str, np.ndarray]:
    """CIFAR-10 python batches: rows of 3072 bytes (R, G, B planes), lists of labels."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(name: str, n: int) -> tuple[np.ndarray, list[int]]:
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = [int(i % 10) for i in range(n)]
        entry = {"batch_label": name, "labels": labels, "data": images.reshape(n, 3072),
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        return images, labels

    train = [batch(f"data_batch_{i}", per_batch) for i in range(1, 6)]
    test_x, test_y = batch("test_batch", n_test)
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch}, f)
    return {"train_x": np.concatenate([x for x, _ in train]),
            "train_y": np.concatenate([y for _, y in train]),
            "test_x": test_x, "test_y": np.asarray(test_y)}


def check_dataset(ds: Dataset, shape: tuple[int, int, int], device: str = "cpu") -> None:
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape[1:] == shape and split.y.shape == (len(split),)
        assert split.x.device.type == device and split.y.device.type == device
        assert split.x.is_contiguous()
        assert int(split.y.min()) >= 0 and int(split.y.max()) < ds.num_classes
    assert ds.input_shape == shape
    assert len(ds.mean) == len(ds.std) == shape[0]
    assert len(ds.classes) == ds.num_classes


# --------------------------------------------------------------------------------------
# Real MNIST
# --------------------------------------------------------------------------------------
def test_mnist_subset_shapes_split_and_normalisation(mnist_dir: Path) -> None:
    cfg = DatasetConfig(name="mnist", subset=2000, test_subset=500)
    ds = load_dataset(cfg, data_dir=mnist_dir)
    check_dataset(ds, (1, 28, 28))
    assert (ds.name, ds.num_classes) == ("mnist", 10)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (2000, 6000, 500)
    train = ds.train.x.double()
    assert abs(float(train.mean())) < 1e-4
    assert abs(float(train.std(correction=0)) - 1) < 1e-4
    assert 0.12 < ds.mean[0] < 0.14 and 0.29 < ds.std[0] < 0.32  # MNIST's well-known stats
    # the same statistics normalise val and test: close to, not exactly, zero mean
    assert abs(float(ds.val.x.mean())) < 0.05
    assert set(ds.train.y.tolist()) == set(range(10))

    # Val and train are disjoint: no val image appears among the training images.
    flat_train = ds.train.x.flatten(1)
    for image in ds.val.x[:20].flatten(1):
        assert not (flat_train == image).all(dim=1).any()

    # Deterministic for a seed (a fresh split, not the cached one), different across seeds.
    data._load_cached.cache_clear()
    again = load_dataset(cfg, data_dir=mnist_dir)
    assert torch.equal(again.train.x, ds.train.x) and torch.equal(again.val.y, ds.val.y)
    assert torch.equal(again.test.x, ds.test.x)
    other = load_dataset(cfg.model_copy(update={"seed": 1}), data_dir=mnist_dir)
    assert not torch.equal(other.val.x, ds.val.x)
    assert not torch.equal(other.train.x, ds.train.x)


def test_mnist_without_normalisation_is_pixels_in_unit_range(mnist_dir: Path) -> None:
    ds = load_dataset(DatasetConfig(name="mnist", normalize=False, subset=100, test_subset=10),
                      data_dir=mnist_dir)
    assert (ds.mean, ds.std) == ((0.0,), (1.0,))
    assert float(ds.train.x.min()) == 0.0 and float(ds.train.x.max()) == 1.0


def test_cache_shares_tensors_but_not_the_class_list(mnist_dir: Path) -> None:
    cfg = DatasetConfig(name="mnist", subset=100, test_subset=10)
    first = load_dataset(cfg, data_dir=mnist_dir)
    second = load_dataset(cfg.model_copy(update={"augment": AugmentConfig(rotate=10)}),
                          data_dir=mnist_dir)
    assert second.train.x is first.train.x  # augmentation does not change what is loaded
    first.classes.append("oops")
    assert len(second.classes) == 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.train = first.val  # type: ignore[misc]


# --------------------------------------------------------------------------------------
# Other formats, on tiny files
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "folder", "first_class"),
                         [("fashion_mnist", "FashionMNIST", "T-shirt/top"),
                          ("kmnist", "KMNIST", "o"),
                          ("mnist", "MNIST", "0 - zero")])
def test_mnist_family_from_idx_files(tmp_path: Path, name: str, folder: str,
                                     first_class: str) -> None:
    arrays = write_idx(tmp_path, folder)
    cfg = DatasetConfig(name=name, val_fraction=0.2, normalize=False, download=False)
    ds = load_dataset(cfg, data_dir=tmp_path)
    check_dataset(ds, (1, 28, 28))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (40, 10, 20)
    assert ds.classes[0] == first_class
    # The test split keeps file order: pixels and labels round-trip exactly.
    expected = torch.from_numpy(arrays["t10k_x"]).float().unsqueeze(1) / 255
    assert torch.equal(ds.test.x, expected)
    assert ds.test.y.tolist() == arrays["t10k_y"].tolist()


def test_decoded_files_are_cached_by_checksum(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWEEPER_CACHE_DIR", str(tmp_path / "cache"))
    write_idx(tmp_path, "MNIST")
    cfg = DatasetConfig(name="mnist", val_fraction=0.2, normalize=False, download=False)
    first = load_dataset(cfg, data_dir=tmp_path)
    (cached,) = (tmp_path / "cache").iterdir()
    assert cached.name.startswith("MNIST-") and cached.suffix == ".pt"
    data.clear_cache()
    again = load_dataset(cfg, data_dir=tmp_path)  # from the cache: the same tensors
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(again, split).x, getattr(first, split).x)
        assert torch.equal(getattr(again, split).y, getattr(first, split).y)
    assert again.classes == first.classes
    # Other raw files, another entry: the cache never serves stale images.
    images = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    raw = bytearray(images.read_bytes())
    raw[-1] = (raw[-1] + 1) % 256
    images.write_bytes(bytes(raw))
    data.clear_cache()
    changed = load_dataset(cfg, data_dir=tmp_path)
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert not torch.equal(changed.test.x, first.test.x)
    # A damaged entry is decoded again, not trusted.
    cached.write_bytes(b"not a tensor file")
    images.write_bytes(bytes(raw[:-1]) + bytes([(raw[-1] - 1) % 256]))
    data.clear_cache()
    assert torch.equal(load_dataset(cfg, data_dir=tmp_path).test.x, first.test.x)


def test_mnist_family_unpacks_gz_files(tmp_path: Path) -> None:
    import gzip

    write_idx(tmp_path, "KMNIST")
    raw = tmp_path / "KMNIST" / "raw"
    for path in list(raw.iterdir()):
        (raw / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    ds = load_dataset(DatasetConfig(name="kmnist", download=False), data_dir=tmp_path)
    assert len(ds.train) + len(ds.val) == 50


def test_cifar10_from_pickled_batches(tmp_path: Path) -> None:
    arrays = write_cifar(tmp_path)
    ds = load_dataset(DatasetConfig(name="cifar10", val_fraction=0.25, normalize=False,
                                    download=False), data_dir=tmp_path)
    check_dataset(ds, (3, 32, 32))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 5, 6)
    assert ds.classes[:2] == ["plane", "car"]
    assert torch.equal(ds.test.x, torch.from_numpy(arrays["test_x"]).float() / 255)
    assert ds.test.y.tolist() == arrays["test_y"].tolist()

    normalised = load_dataset(DatasetConfig(name="cifar10", val_fraction=0.25, download=False),
                              data_dir=tmp_path)
    per_channel = normalised.train.x.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(per_channel.std(1, correction=0), torch.ones(3), atol=1e-5)
    assert len(set(normalised.mean)) == 3


def test_digits_and_synthetic(tmp_path: Path) -> None:
    digits = load_dataset(DatasetConfig(name="digits"), data_dir=tmp_path)
    check_dataset(digits, (1, 8, 8))
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert len(digits.test) == round(1797 * 0.2)

    cfg = DatasetConfig(name="synthetic", synthetic=SyntheticConfig(classes=3, image_size=8,
                        channels=2, train_size=100, test_size=30))
    synthetic = load_dataset(cfg, data_dir=tmp_path)
    check_dataset(synthetic, (2, 8, 8))
    assert (len(synthetic.train), len(synthetic.val), len(synthetic.test)) == (90, 10, 30)
    assert synthetic.num_classes == 3
    data.clear_cache()
    assert torch.equal(load_dataset(cfg, data_dir=tmp_path).train.x, synthetic.train.x)
    reseeded = load_dataset(cfg.model_copy(update={"seed": 5}), data_dir=tmp_path)
    assert not torch.equal(reseeded.test.x, synthetic.test.x)


def test_synthetic_is_learnable() -> None:
    ds = load_dataset(DatasetConfig(name="synthetic"))  # 4 classes, 16x16, noise 1.0
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, ds.num_classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for x, y in batches(ds.train, 64, shuffle=True, generator=generator):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    with torch.no_grad():
        val_accuracy = (model(ds.val.x).argmax(1) == ds.val.y).float().mean().item()
    assert val_accuracy > 0.9


# --------------------------------------------------------------------------------------
# Missing, undownloadable and corrupt data
# --------------------------------------------------------------------------------------
def test_missing_mnist_without_download_says_what_to_put_where(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(DatasetConfig(name="mnist", download=False), data_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "MNIST" / "raw") in message
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in message
    assert "SWEEPER_DATA_DIR" in message


def test_missing_cifar_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(DatasetConfig(name="cifar10", download=False), data_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message


def test_failed_download_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    """torchvision's real download code against a port that refuses: fails, never hangs."""
    import torchvision

    monkeypatch.setattr(torchvision.datasets.KMNIST, "mirrors", ["http://127.0.0.1:9/"])
    before = socket.getdefaulttimeout()
    with pytest.raises(DataError) as info:
        load_dataset(DatasetConfig(name="kmnist", download=True), data_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "download failed" in message and "train-images-idx3-ubyte" in message
    assert socket.getdefaulttimeout() == before


def test_silent_mirror_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts the connection but never answers must not hang the load."""
    import torchvision

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)  # the kernel completes connects; nobody ever replies
        port = server.getsockname()[1]
        monkeypatch.setattr(torchvision.datasets.KMNIST, "mirrors", [f"http://127.0.0.1:{port}/"])
        monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 0.5)
        with pytest.raises(DataError, match=r"download failed: .*timed out"):
            load_dataset(DatasetConfig(name="kmnist"), data_dir=tmp_path)


def test_download_runs_under_a_socket_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    import torchvision

    seen: list[float | None] = []

    def fake_download(self: object) -> None:
        seen.append(socket.getdefaulttimeout())
        raise URLError("timed out")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fake_download)
    before = socket.getdefaulttimeout()
    with pytest.raises(DataError, match=r"download failed: <urlopen error timed out>"):
        load_dataset(DatasetConfig(name="mnist"), data_dir=tmp_path)
    assert seen == [data.DOWNLOAD_TIMEOUT_S]
    assert socket.getdefaulttimeout() == before


def test_offline_download_is_a_data_error(tmp_path: Path) -> None:
    """Unpatched: on these machines there is no network, so the download must fail cleanly.
    (Where a network exists the download may succeed; either way nothing else is raised.)"""
    try:
        ds = load_dataset(DatasetConfig(name="fashion_mnist", test_subset=10),
                          data_dir=tmp_path)
    except DataError as exc:
        assert "\n" not in str(exc)
        assert "FashionMNIST" in str(exc)
    else:
        assert len(ds.test) == 10


def test_corrupt_files_are_a_data_error(tmp_path: Path) -> None:
    write_idx(tmp_path, "FashionMNIST")
    path = tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(DataError, match="FashionMNIST"):
        load_dataset(DatasetConfig(name="fashion_mnist", download=False), data_dir=tmp_path)

    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="CIFAR-10"):
        load_dataset(DatasetConfig(name="cifar10", download=False), data_dir=tmp_path)


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SWEEPER_DATA_DIR", raising=False)
    assert resolve_data_dir() == tmp_path.resolve() / "data"
    monkeypatch.setenv("SWEEPER_DATA_DIR", "from-env")
    assert resolve_data_dir() == tmp_path.resolve() / "from-env"
    assert resolve_data_dir("explicit") == tmp_path.resolve() / "explicit"
    assert resolve_data_dir(tmp_path / "x").is_absolute()


# --------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------
def make_split(n: int = 10) -> Split:
    return Split(torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1), torch.arange(n))


def test_batches_cover_every_index_once_and_keep_the_last_partial_batch() -> None:
    split = make_split(10)
    got = list(batches(split, 3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in got] == [3, 3, 3, 1]
    order = torch.cat([y for _, y in got])
    assert sorted(order.tolist()) == list(range(10))
    assert order.tolist() != list(range(10))
    for x, y in got:  # images travel with their labels
        assert torch.equal(x.flatten().long(), y)


def test_batches_are_deterministic_with_a_seeded_generator() -> None:
    split = make_split(50)

    def epoch(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in batches(split, 7, shuffle=True,
                                                generator=generator)]).tolist()

    assert epoch(1) == epoch(1)
    assert epoch(1) != epoch(2)
    generator = torch.Generator().manual_seed(1)
    first = [y.tolist() for _, y in batches(split, 7, shuffle=True, generator=generator)]
    second = [y.tolist() for _, y in batches(split, 7, shuffle=True, generator=generator)]
    assert first != second  # the next epoch draws a new order


def test_batches_without_shuffle_are_in_order() -> None:
    got = [y.tolist() for _, y in batches(make_split(5), 2, shuffle=False)]
    assert got == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(make_split(5), 0, shuffle=False))


# --------------------------------------------------------------------------------------
# augment
# --------------------------------------------------------------------------------------
def dots(n: int = 8, size: int = 16, background: float = -0.5) -> torch.Tensor:
    """Images of a background value with one bright off-centre square each."""
    x = torch.full((n, 1, size, size), background)
    x[:, :, 4:8, 9:12] = 2.0
    return x


def test_augment_is_a_no_op_at_zero() -> None:
    x = dots()
    assert augment(x, AugmentConfig()) is x


def test_augment_rotation_changes_images_deterministically() -> None:
    x = dots()
    cfg = AugmentConfig(rotate=30)
    out = augment(x, cfg, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.allclose(out, x)
    assert torch.equal(out, augment(x, cfg, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, augment(x, cfg, torch.Generator().manual_seed(1)))
    # uncovered corners take the background value, not 0 (which is the mean after scaling)
    assert torch.allclose(out[:, :, 0, 0], torch.full((8, 1), -0.5))


def test_augment_shift_moves_images_by_whole_pixels() -> None:
    x = dots()
    out = augment(x, AugmentConfig(shift=2), torch.Generator().manual_seed(3))
    bright = (out > 1.99).flatten(2).sum(-1)
    assert torch.equal(bright, torch.full_like(bright, 12))  # the square moved intact
    rows = (out[:, 0] > 1.99).nonzero()
    for image in range(len(x)):
        r, c = rows[rows[:, 0] == image, 1:].min(0).values.tolist()
        assert abs(r - 4) <= 2 and abs(c - 9) <= 2
    assert torch.allclose(out.amin(dim=(1, 2, 3)), torch.full((8,), -0.5))
    assert augment(x, AugmentConfig(shift=2), torch.Generator().manual_seed(3)
                   ).equal(out)


def test_augment_explicit_fill() -> None:
    x = torch.ones(64, 3, 8, 8)
    out = augment(x, AugmentConfig(rotate=45), torch.Generator().manual_seed(0),
                  fill=(-1.0, 0.0, 1.0))
    # each channel blends only data (1) and its own fill
    assert float(out[:, 0].min()) == pytest.approx(-1.0) and float(out[:, 0].max()) <= 1.0
    assert float(out[:, 1].min()) == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(out[:, 2], torch.ones(64, 8, 8))


# --------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# --------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_data_with_a_cpu_generator() -> None:
    ds = load_dataset(DatasetConfig(name="synthetic"), device="cuda")
    check_dataset(ds, (1, 16, 16), device="cuda")
    generator = torch.Generator().manual_seed(0)
    seen = torch.cat([y for _, y in batches(ds.train, 100, shuffle=True,
                                             generator=generator)])
    assert seen.device.type == "cuda" and len(seen) == len(ds.train)
    out = augment(ds.train.x[:32], AugmentConfig(rotate=15, shift=2), generator)
    assert out.device.type == "cuda" and out.shape == (32, 1, 16, 16)
    cuda_generator = torch.Generator(device="cuda").manual_seed(0)
    assert len(list(batches(ds.val, 64, shuffle=True, generator=cuda_generator))) > 0


def test_cifar_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    """A batch replaced by a pickle that would run a command: refused, nothing runs."""
    import os
    import pickle

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(DataError, match="not plain data"):
        load_dataset(DatasetConfig(name="cifar10", download=False), data_dir=tmp_path)
    assert not (tmp_path / "pwned").exists()
