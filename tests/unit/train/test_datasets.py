from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from p2pml.errors import ConfigError
from p2pml.train.datasets import DATASETS, Dataset, batches, load_dataset, read_idx, shard

SHARED_MNIST = Path("/work/shared/data/mnist")
MNIST_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_mnist_dir(directory: Path, *, n_train: int = 12, n_test: int = 6) -> Path:
    gen = np.random.default_rng(7)
    arrays = {
        "train_images": gen.integers(0, 256, (n_train, 28, 28)),
        "train_labels": np.arange(n_train) % 10,
        "test_images": gen.integers(0, 256, (n_test, 28, 28)),
        "test_labels": np.arange(n_test) % 10,
    }
    for key, name in MNIST_NAMES.items():
        compress = key.startswith("train")  # a mix of plain and gzip files
        write_idx(directory / (name + (".gz" if compress else "")), arrays[key], compress=compress)
    return directory


@pytest.fixture(scope="module")
def mnist_5k() -> Dataset:
    return load_dataset("mnist-5k", seed=3)


# --- read_idx -------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trips_a_uint8_array(tmp_path, compress):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = write_idx(tmp_path / "a.bin", array, compress=compress)
    result = read_idx(path)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, array)
    result[0, 0, 0] = 1  # writable


def test_read_idx_detects_gzip_by_magic_not_by_name(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    path = tmp_path / "labels.idx"
    path.write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(path), array)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda raw: b"\x01" + raw[1:], "magic bytes: got '01 00'"),
        (lambda raw: raw[:2] + b"\x0d" + raw[3:], "type byte: got '0x0d'"),
        (lambda raw: raw[:3] + b"\x00" + raw[4:], "number of dimensions: got 0"),
        (lambda raw: raw[:-1], "payload bytes: got 23; expected exactly 24"),
        (lambda raw: raw + b"\x00", "payload bytes: got 25; expected exactly 24"),
        (lambda raw: raw[:10], "length: got 10"),
        (lambda raw: raw[:3], "got '3 bytes'"),
        (lambda raw: b"garbage that is not an idx file", "magic bytes"),
    ],
    ids=[
        "bad-magic",
        "type-byte",
        "zero-dims",
        "truncated",
        "trailing",
        "short-header",
        "tiny",
        "garbage",
    ],
)
def test_read_idx_rejects_a_malformed_file_naming_it(tmp_path, mutate, fragment):
    raw = idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))
    path = tmp_path / "bad-idx"
    path.write_bytes(mutate(raw))
    with pytest.raises(ConfigError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_read_idx_rejects_a_truncated_gzip_stream(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(100, dtype=np.uint8)))[:-6])
    with pytest.raises(ConfigError, match="corrupt gzip"):
        read_idx(path)


def test_read_idx_rejects_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope"):
        read_idx(tmp_path / "nope")


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="the real MNIST files are not present")
@pytest.mark.parametrize(
    ("name", "shape"),
    [("t10k-images-idx3-ubyte.gz", (10000, 28, 28)), ("t10k-labels-idx1-ubyte.gz", (10000,))],
)
def test_read_idx_reads_the_real_mnist_test_files(name, shape):
    path = SHARED_MNIST / name
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    assert read_idx(path).shape == shape


# --- mnist ----------------------------------------------------------------------------------


def test_load_mnist_reads_the_four_files_with_the_official_split(tmp_path):
    data = load_dataset("mnist", data_dir=write_mnist_dir(tmp_path))
    assert (data.x_train.shape, data.x_test.shape) == ((12, 1, 28, 28), (6, 1, 28, 28))
    assert data.x_train.dtype == np.float32 and data.x_train.flags.c_contiguous
    assert data.y_train.dtype == np.int64
    assert data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
    np.testing.assert_array_equal(data.y_test, np.arange(6) % 10)
    assert (data.input_shape, data.n_classes) == ((1, 28, 28), 10)


def test_load_mnist_accepts_the_dotted_file_names(tmp_path):
    write_mnist_dir(tmp_path)
    plain = tmp_path / "t10k-images-idx3-ubyte"
    plain.rename(tmp_path / "t10k-images.idx3-ubyte")
    assert load_dataset("mnist", data_dir=tmp_path).x_test.shape == (6, 1, 28, 28)


def test_load_mnist_without_data_dir_names_the_option():
    with pytest.raises(ConfigError, match="--data-dir"):
        load_dataset("mnist")


def test_load_mnist_with_a_missing_directory_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"--data-dir.*absent"):
        load_dataset("mnist", data_dir=tmp_path / "absent")


def test_load_mnist_names_a_missing_file_and_the_directory(tmp_path):
    write_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert "t10k-labels-idx1-ubyte" in str(info.value)
    assert str(tmp_path) in str(info.value)
    assert "train-images" not in str(info.value).split("holds")[-1]


def test_load_mnist_rejects_a_label_count_that_differs_from_the_images(tmp_path):
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8))
    with pytest.raises(ConfigError, match="labels: got 5; expected 6"):
        load_dataset("mnist", data_dir=tmp_path)


def test_load_mnist_rejects_a_label_above_nine(tmp_path):
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(6, 10, dtype=np.uint8))
    with pytest.raises(ConfigError, match=r"label: got 10; expected 0\.\.9"):
        load_dataset("mnist", data_dir=tmp_path)


def test_load_mnist_rejects_images_that_are_not_three_dimensional(tmp_path):
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((6, 784), dtype=np.uint8))
    with pytest.raises(ConfigError, match="dims"):
        load_dataset("mnist", data_dir=tmp_path)


# --- the small data sets --------------------------------------------------------------------


def test_load_dataset_rejects_an_unknown_name():
    with pytest.raises(ConfigError, match="one of mnist, mnist-5k, digits, iris"):
        load_dataset("cifar")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_load_dataset_rejects_a_bad_test_fraction(fraction):
    with pytest.raises(ConfigError, match="test_fraction"):
        load_dataset("iris", test_fraction=fraction)


def test_mnist_5k_splits_its_5000_rows(mnist_5k):
    assert (len(mnist_5k.x_train), len(mnist_5k.x_test)) == (4000, 1000)
    assert mnist_5k.x_train.shape[1:] == (1, 28, 28) and mnist_5k.n_classes == 10


def test_mnist_5k_split_is_stratified(mnist_5k):
    assert np.bincount(mnist_5k.y_test).tolist() == [100] * 10
    assert np.bincount(mnist_5k.y_train).tolist() == [400] * 10


def test_mnist_5k_split_is_shuffled(mnist_5k):
    assert not np.all(np.diff(mnist_5k.y_train) >= 0)


def test_mnist_5k_pixels_are_float32_in_the_unit_interval(mnist_5k):
    x = mnist_5k.x_train
    assert x.dtype == np.float32 and x.flags.c_contiguous
    assert x.min() == 0.0 and x.max() == 1.0


def test_mnist_5k_split_is_deterministic_for_a_seed(mnist_5k):
    again = load_dataset("mnist-5k", seed=3)
    other = load_dataset("mnist-5k", seed=4)
    np.testing.assert_array_equal(again.y_train, mnist_5k.y_train)
    np.testing.assert_array_equal(again.x_test, mnist_5k.x_test)
    assert not np.array_equal(other.y_train, mnist_5k.y_train)


def test_digits_are_8x8_images_in_the_unit_interval():
    data = load_dataset("digits")
    assert len(data.x_train) + len(data.x_test) == 1797
    assert data.input_shape == (1, 8, 8) and data.n_classes == 10
    assert data.x_train.dtype == np.float32 and 0.0 <= data.x_train.min() <= data.x_train.max() <= 1
    assert set(np.unique(data.y_test)) == set(range(10))


def test_iris_is_standardised_with_the_train_split():
    data = load_dataset("iris", test_fraction=0.2)
    assert (data.x_train.shape, data.x_test.shape) == ((120, 4), (30, 4))
    assert data.x_train.dtype == np.float32 and data.n_classes == 3
    np.testing.assert_allclose(data.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.std(axis=0), 1.0, atol=1e-5)
    assert np.bincount(data.y_test).tolist() == [10, 10, 10]


def test_datasets_lists_every_loader():
    assert DATASETS == ("mnist", "mnist-5k", "digits", "iris")


# --- shard ----------------------------------------------------------------------------------

X = np.arange(103, dtype=np.float32).reshape(103, 1)
Y = np.arange(103, dtype=np.int64)


@pytest.mark.parametrize("count", [1, 2, 7, 103])
def test_shard_parts_are_disjoint_and_cover_the_set(count):
    parts = [shard(X, Y, i, count, seed=5)[1] for i in range(count)]
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(103))


@pytest.mark.parametrize("count", [2, 7, 10])
def test_shard_sizes_differ_by_at_most_one(count):
    sizes = [len(shard(X, Y, i, count, seed=5)[0]) for i in range(count)]
    assert max(sizes) - min(sizes) <= 1


def test_shard_keeps_features_with_their_labels():
    x, y = shard(X, Y, 2, 5, seed=1)
    np.testing.assert_array_equal(x[:, 0], y.astype(np.float32))


def test_shard_is_the_same_for_the_same_seed():
    np.testing.assert_array_equal(shard(X, Y, 1, 3, seed=9)[1], shard(X, Y, 1, 3, seed=9)[1])
    assert not np.array_equal(shard(X, Y, 1, 3, seed=9)[1], shard(X, Y, 1, 3, seed=10)[1])


@pytest.mark.parametrize(
    ("index", "count", "field"),
    [
        (0, 0, "shard count"),
        (3, 3, "shard index"),
        (-1, 3, "shard index"),
        (True, 3, "index"),
        (0, 2.0, "shard count"),
    ],
)
def test_shard_rejects_bad_arguments(index, count, field):
    with pytest.raises(ConfigError, match=field):
        shard(X, Y, index, count, seed=0)


def test_shard_rejects_mismatched_labels():
    with pytest.raises(ConfigError, match="labels"):
        shard(X, Y[:-1], 0, 2, seed=0)


# --- batches --------------------------------------------------------------------------------


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batches_have_exactly_batch_size_rows():
    got = take(batches(X, Y, 10, seed=0), 25)  # 10 full batches per epoch, 3 rows dropped
    assert all(x.shape == (10, 1) and y.shape == (10,) for x, y in got)


def test_batches_are_deterministic_for_a_seed():
    first = [y for _, y in take(batches(X, Y, 8, seed=4), 30)]
    second = [y for _, y in take(batches(X, Y, 8, seed=4), 30)]
    other = [y for _, y in take(batches(X, Y, 8, seed=5), 30)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_batches_cover_each_row_once_per_epoch_and_reshuffle():
    x, y = X[:100], Y[:100]
    got = take(batches(x, y, 20, seed=2), 10)
    epochs = [np.concatenate([b for _, b in got[:5]]), np.concatenate([b for _, b in got[5:]])]
    assert all(sorted(epoch.tolist()) == list(range(100)) for epoch in epochs)
    assert not np.array_equal(epochs[0], epochs[1])


def test_batches_drop_the_incomplete_last_batch_of_each_epoch():
    epoch = np.concatenate([b for _, b in take(batches(X, Y, 10, seed=3), 10)])
    assert len(np.unique(epoch)) == 100


def test_batches_reject_a_shard_smaller_than_a_batch():
    with pytest.raises(ConfigError, match="batch_size: got 200; expected at most the shard's 103"):
        batches(X, Y, 200, seed=0)


@pytest.mark.parametrize("batch_size", [0, -1, True])
def test_batches_reject_a_bad_batch_size(batch_size):
    with pytest.raises(ConfigError, match="batch_size"):
        batches(X, Y, batch_size, seed=0)
