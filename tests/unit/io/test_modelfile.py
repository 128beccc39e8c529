"""Model files and checkpoint folders: round trips, checksums, truncation, fallback, refusals."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from p2pml.core.types import PeerId
from p2pml.errors import ConfigError
from p2pml.io.modelfile import (
    find_checkpoint,
    load_latest,
    load_model,
    save_checkpoint,
    save_model,
)
from p2pml.protocol.messages import ModelReply, TensorBlob
from p2pml.protocol.wire import encode_frames

TAG = "run@0123456789abcdef"
TRAILER_BYTES = 40


def tensors(fill: float = 1.0) -> tuple[TensorBlob, ...]:
    return (
        TensorBlob.of("w", np.full((3, 4), fill, np.float32)),
        TensorBlob.of("optim/w/momentum_buffer", np.arange(12, dtype=np.float64).reshape(3, 4)),
    )


def save_steps(folder, *steps, keep=10):
    return [
        save_checkpoint(folder, "node", TAG, tensors(s), version=s, step=s, keep=keep)
        for s in steps
    ]


def refuse_if_step(step):
    def check(saved):
        if saved.step == step:
            raise ConfigError("checkpoint tensor", "w", "something else")

    return check


def test_save_model_round_trips_tensors_step_version_and_tag(tmp_path):
    path = tmp_path / "m.p2pml"
    save_model(path, TAG, 7, tensors(), version=9)
    saved = load_model(path)
    assert (saved.run_tag, saved.step, saved.version) == (TAG, 7, 9)
    assert saved.tensors == tensors()
    assert [p.name for p in tmp_path.iterdir()] == ["m.p2pml"]  # no temporary file left


@pytest.mark.parametrize(
    "keep_bytes",
    [
        pytest.param(lambda n: 0, id="empty"),
        pytest.param(lambda n: 10, id="in-the-header"),
        pytest.param(lambda n: n - TRAILER_BYTES - 5, id="in-the-tensors"),
        pytest.param(lambda n: n - 1, id="in-the-checksum"),
        pytest.param(lambda n: n - TRAILER_BYTES + 3, id="in-the-trailer-magic"),
    ],
)
def test_load_model_refuses_a_truncated_file_naming_it(tmp_path, keep_bytes):
    path = tmp_path / "m.p2pml"
    save_model(path, TAG, 1, tensors())
    data = path.read_bytes()
    path.write_bytes(data[: keep_bytes(len(data))])
    with pytest.raises(ConfigError, match="truncated or corrupt") as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_load_model_refuses_a_file_whose_bytes_changed_on_disk(tmp_path):
    path = tmp_path / "m.p2pml"
    save_model(path, TAG, 1, tensors())
    data = bytearray(path.read_bytes())
    data[-TRAILER_BYTES - 8] ^= 0x01  # one bit of the last tensor: still decodes, still finite
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="checksum does not match") as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_load_model_reads_a_file_written_before_checksums(tmp_path):
    path = tmp_path / "old.p2pml"
    msg = ModelReply(TAG, PeerId(bytes(20)), 3, 3, tensors())
    path.write_bytes(b"".join(bytes(f) for f in encode_frames(msg)))
    assert load_model(path).tensors == tensors()


def test_load_model_refuses_a_missing_file_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="a readable file"):
        load_model(tmp_path / "nothing.p2pml")


def test_save_model_refuses_a_name_the_loader_would_refuse(tmp_path):
    long = (TensorBlob.of("x" * 5000, np.zeros(1, np.float32)),)
    with pytest.raises(ConfigError, match="tensor names of at most"):
        save_model(tmp_path / "m.p2pml", TAG, 1, long)
    assert list(tmp_path.iterdir()) == []


def test_save_checkpoint_keeps_the_newest_few(tmp_path):
    save_steps(tmp_path, 5, 10, 15, 20, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "node-000000000010.p2pml",
        "node-000000000015.p2pml",
        "node-000000000020.p2pml",
    ]


def test_save_checkpoint_never_deletes_the_file_it_just_wrote(tmp_path):
    save_steps(tmp_path, 90, 100, keep=2)
    (written,) = save_steps(tmp_path, 5, keep=2)
    assert written.exists()


def test_load_latest_falls_back_past_a_truncated_newest_checkpoint(tmp_path, caplog):
    _, second, newest = save_steps(tmp_path, 5, 10, 15)
    newest.write_bytes(newest.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING, logger="p2pml.io.modelfile"):
        found = load_latest(tmp_path, "node", TAG)
    assert found is not None and found[0] == second and found[1].step == 10
    (warning,) = caplog.records
    assert newest.name in warning.getMessage() and "truncated" in warning.getMessage()


def test_load_latest_skips_a_checkpoint_the_check_refuses(tmp_path, caplog):
    save_steps(tmp_path, 5, 10)
    with caplog.at_level(logging.WARNING, logger="p2pml.io.modelfile"):
        found = load_latest(tmp_path, "node", TAG, check=refuse_if_step(10))
    assert found is not None and found[1].step == 5
    assert "something else" in caplog.text


def test_load_latest_skips_a_checkpoint_of_another_run(tmp_path, caplog):
    save_steps(tmp_path, 5)
    save_checkpoint(tmp_path, "node", "other@0000000000000000", tensors(), version=9, step=9)
    found = load_latest(tmp_path, "node", TAG)
    assert found is not None and found[1].step == 5
    assert "of run other@" in caplog.text


def test_load_latest_ignores_files_of_another_prefix_and_temporary_files(tmp_path):
    save_steps(tmp_path, 5)
    (tmp_path / "server-000000000099.p2pml").write_bytes(b"junk")
    (tmp_path / ".node-000000000099.p2pml.tmpabc").write_bytes(b"junk")
    found = load_latest(tmp_path, "node", TAG)
    assert found is not None and found[1].step == 5


def test_find_checkpoint_with_every_file_refused_names_each_and_why(tmp_path):
    first, second = save_steps(tmp_path, 5, 10)
    first.write_bytes(first.read_bytes()[:50])
    with pytest.raises(ConfigError) as info:
        find_checkpoint(tmp_path, "node", TAG, check=refuse_if_step(10))
    message = str(info.value)
    assert "all 2 were refused" in message
    assert first.name in message and "truncated" in message
    assert second.name in message and "something else" in message


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(lambda p: p / "missing", "an existing folder", id="missing"),
        pytest.param(lambda p: p, r"node-<step>\.p2pml checkpoints", id="empty"),
    ],
)
def test_find_checkpoint_without_any_checkpoint_says_so(tmp_path, make, expected):
    with pytest.raises(ConfigError, match=expected):
        find_checkpoint(make(tmp_path), "node", TAG)
