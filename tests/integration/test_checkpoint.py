"""Node checkpoints: saved every N steps, resumed with parameters, momentum and step; corrupt or
partial ones refused; in peer mode, a checkpoint too far behind the run gives way to its model."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from nodes import cluster, node_config
from test_node import N_IN, node_batches, sgd, tiny_model

from p2pml.core.types import Address
from p2pml.errors import ConfigError
from p2pml.node.node import Node
from p2pml.protocol.messages import TensorBlob
from p2pml.train.checkpoint import load_checkpoint, snapshot, write_checkpoint
from p2pml.train.loop import Trainer
from p2pml.train.session import Session
from p2pml.train.tensors import run_manifest, to_blobs, trainable

pytestmark = pytest.mark.integration

MOMENTUM = "momentum_buffer"


def manifest_of(model, **hyper):
    return run_manifest("ckpt", model, {"barrier": "ssp", **hyper})


def sgd_steps(steps: int, *, seed: int = 0):
    """A model and its SGD (with momentum) after `steps` single-process steps on node 0's
    batches: what a node training alone holds."""
    model = tiny_model(seed)
    opt = sgd(model)
    for x, y in node_batches(0, steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(
            model(torch.from_numpy(x)), torch.from_numpy(y)
        ).backward()
        opt.step()
    return model, opt


def momentum_of(model, opt):
    return {n: opt.state[p][MOMENTUM] for n, p in trainable(model) if p in opt.state}


def write_steps(folder, manifest, *steps):
    """Checkpoints of `sgd_steps(step)` for each step; their paths."""
    paths = []
    for step in steps:
        model, opt = sgd_steps(step)
        blobs = snapshot(trainable(model), opt)
        paths.append(write_checkpoint(folder, manifest.tag, step, blobs, keep=10))
    return paths


def assert_close_models(got, want):
    for (name, a), b in zip(got.named_parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


class FixedSource:
    """A run peer's model source: always `model` at `step`."""

    def __init__(self, step: int, model: torch.nn.Module) -> None:
        self.step = step
        self.blobs = to_blobs([(n, p.detach().clone()) for n, p in trainable(model)])

    async def snapshot(self):
        return self.step, self.blobs


# -- save and resume ------------------------------------------------------------------------------


async def test_a_resumed_node_continues_from_its_last_checkpoint_with_params_and_momentum(
    tmp_path,
):
    model = tiny_model()
    manifest = manifest_of(model)
    async with (
        Node(node_config(0, barrier="ssp"), manifest) as node,
        Trainer(node, model, sgd(model), checkpoint_dir=tmp_path, checkpoint_every=5) as t,
    ):
        await t.train(node_batches(0, 12), steps=12)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "node-000000000005.p2pml",
        "node-000000000010.p2pml",
    ]
    ck = load_checkpoint(tmp_path, manifest)
    assert ck.step == 10
    want, want_opt = sgd_steps(10)  # the checkpoint holds step 10's model and momentum
    for blob, param in zip(ck.params, want.parameters(), strict=True):
        torch.testing.assert_close(torch.from_numpy(blob.array.copy()), param.detach())
    want_momentum = momentum_of(want, want_opt)
    assert sorted(b.name for b in ck.state) == sorted(
        f"optim/{n}/{MOMENTUM}" for n in want_momentum
    )
    for blob in ck.state:
        name = blob.name.split("/")[1]
        torch.testing.assert_close(torch.from_numpy(blob.array.copy()), want_momentum[name])

    fresh = tiny_model(seed=7)
    opt = sgd(fresh)
    async with (
        Node(node_config(1, barrier="ssp"), manifest) as again,
        Trainer(again, fresh, opt) as t,
    ):
        assert await t.join(resume=ck) == 10 and again.step == 10
        for blob, (name, param) in zip(ck.params, trainable(fresh), strict=True):
            assert torch.equal(param.detach(), torch.from_numpy(blob.array.copy())), name
        state = {b.name: b.array for b in ck.state}
        for name, buf in momentum_of(fresh, opt).items():
            assert torch.equal(buf, torch.from_numpy(state[f"optim/{name}/{MOMENTUM}"].copy()))
        result = await t.train(node_batches(0, 20), steps=20, skip_completed=True)
    assert (result.start_step, result.steps) == (10, 20)
    uninterrupted, uninterrupted_opt = sgd_steps(20)
    assert_close_models(fresh, uninterrupted)
    for name, buf in momentum_of(fresh, opt).items():
        torch.testing.assert_close(buf, momentum_of(uninterrupted, uninterrupted_opt)[name])


async def test_checkpoints_every_n_steps_keep_only_the_newest_few(tmp_path):
    model = tiny_model()
    manifest = manifest_of(model)
    async with (
        Node(node_config(0, barrier="ssp"), manifest) as node,
        Trainer(
            node, model, sgd(model), checkpoint_dir=tmp_path, checkpoint_every=2, keep_checkpoints=2
        ) as t,
    ):
        await t.train(node_batches(0, 9), steps=9)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "node-000000000006.p2pml",
        "node-000000000008.p2pml",
    ]
    assert load_checkpoint(tmp_path, manifest).step == 8


@pytest.mark.parametrize(
    ("every", "folder", "keep", "field"),
    [(-1, True, 3, "checkpoint_every"), (5, False, 3, "checkpoint_dir"), (5, True, 0, "keep")],
)
async def test_trainer_refuses_bad_checkpoint_settings(tmp_path, every, folder, keep, field):
    model = tiny_model()
    async with Node(node_config(0), manifest_of(model)) as node:
        with pytest.raises(ConfigError, match=field):
            Trainer(
                node,
                model,
                sgd(model),
                checkpoint_dir=tmp_path if folder else None,
                checkpoint_every=every,
                keep_checkpoints=keep,
            )


# -- refusing bad checkpoints ---------------------------------------------------------------------


def test_a_truncated_newest_checkpoint_is_refused_and_the_previous_one_used(tmp_path, caplog):
    manifest = manifest_of(tiny_model())
    older, newest = write_steps(tmp_path, manifest, 5, 10)
    newest.write_bytes(newest.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING):
        ck = load_checkpoint(tmp_path, manifest)
    assert ck.step == 5 and ck.path == older
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refusals) == 1
    assert newest.name in refusals[0] and "truncated" in refusals[0]


def with_tensor(blobs, name, array):
    return [TensorBlob.of(name, array) if b.name == name else b for b in blobs]


W = "0.weight"
BAD_CONTENT = {
    "nan-parameter": lambda b: with_tensor(b, W, np.full((8, N_IN), np.nan, np.float32)),
    "wrong-shape": lambda b: with_tensor(b, W, np.zeros((N_IN, 8), np.float32)),
    "nan-momentum": lambda b: with_tensor(
        b, f"optim/{W}/{MOMENTUM}", np.full((8, N_IN), np.inf, np.float32)
    ),
    "momentum-of-an-unknown-parameter": lambda b: [
        *b,
        TensorBlob.of(f"optim/9.weight/{MOMENTUM}", np.zeros((8, N_IN), np.float32)),
    ],
    "momentum-of-another-shape": lambda b: with_tensor(
        b, f"optim/{W}/{MOMENTUM}", np.zeros((3, 3), np.float32)
    ),
    "missing-parameter": lambda b: b[1:],
}


@pytest.mark.parametrize("damage", BAD_CONTENT.values(), ids=BAD_CONTENT.keys())
def test_a_checkpoint_that_does_not_fit_the_run_is_refused(tmp_path, caplog, damage):
    manifest = manifest_of(tiny_model())
    write_steps(tmp_path, manifest, 5)
    model, opt = sgd_steps(10)
    bad = damage(list(snapshot(trainable(model), opt)))
    path = write_checkpoint(tmp_path, manifest.tag, 10, bad, keep=10)
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(tmp_path, manifest).step == 5
    assert path.name in caplog.text


def test_with_every_checkpoint_corrupt_loading_fails_naming_each(tmp_path):
    manifest = manifest_of(tiny_model())
    paths = write_steps(tmp_path, manifest, 5, 10)
    for path in paths:
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ConfigError, match="all 2 were refused") as info:
        load_checkpoint(tmp_path, manifest)
    assert all(p.name in str(info.value) for p in paths)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    model = tiny_model()
    write_steps(tmp_path, manifest_of(model, lr=0.5), 5)
    with pytest.raises(ConfigError, match="of run ckpt@"):
        load_checkpoint(tmp_path, manifest_of(model))


# -- peer mode: the checkpoint or the run's model ------------------------------------------------


async def resume_into_run(tmp_path, *, run_step: int, checkpoint_step: int, staleness: int):
    """Two peers at `run_step` serving `run_model`; a third node resumes from a checkpoint at
    `checkpoint_step`. Returns (its start, its model, its optimiser, the run's model, the
    checkpoint)."""
    model = tiny_model()
    manifest = manifest_of(model, staleness=staleness)
    write_steps(tmp_path, manifest, checkpoint_step)
    ck = load_checkpoint(tmp_path, manifest)
    run_model = tiny_model(seed=1)
    async with cluster(2, manifest, barrier="ssp", staleness=staleness) as nodes:
        for peer in nodes:
            peer.resume_at(run_step)
            peer.attach(FixedSource(run_step, run_model))
        config = node_config(
            2, bootstrap=(nodes[0].overlay.addr,), barrier="ssp", staleness=staleness
        )
        opt = sgd(model)
        async with Node(config, manifest) as late, Trainer(late, model, opt) as t:
            start = await t.join(resume=ck)
            assert late.step == start
    return start, model, opt, run_model, ck


async def test_a_checkpoint_beyond_the_staleness_bound_gives_way_to_the_runs_model(
    tmp_path, caplog
):
    with caplog.at_level(logging.INFO):
        start, model, opt, run_model, _ = await resume_into_run(
            tmp_path, run_step=50, checkpoint_step=10, staleness=2
        )
    assert start == 50
    assert_close_models(model, run_model)
    assert not opt.state, "the stale checkpoint's momentum was kept"
    assert "at step 10 is 40 steps behind the run" in caplog.text
    assert "staleness bound 2): pulling the current model from a peer instead" in caplog.text


async def test_a_checkpoint_within_the_staleness_bound_is_kept(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        start, model, opt, _, ck = await resume_into_run(
            tmp_path, run_step=12, checkpoint_step=10, staleness=2
        )
    assert start == 10
    for blob, param in zip(ck.params, model.parameters(), strict=True):
        assert torch.equal(param.detach(), torch.from_numpy(blob.array.copy()))
    assert len(opt.state) == len(ck.state) > 0
    assert "is 2 steps behind the run (staleness bound 2): keeping it" in caplog.text
    assert "pulling" not in caplog.text


# -- Session ---------------------------------------------------------------------------------------


def iris_session(tmp_path, index: int = 0, **config) -> Session:
    return Session.build(
        node_config(index, barrier="ssp", **config),
        run_id="ckpt",
        model="mlp",
        dataset="iris",
        batch_size=16,
        seed=2,
        key_path=tmp_path / "key",
    )


async def test_a_session_resumes_from_its_checkpoint_folder_and_keeps_writing_to_it(tmp_path):
    folder = tmp_path / "ckpt"
    first = await iris_session(tmp_path).run(steps=12, checkpoint_dir=folder, checkpoint_every=5)
    assert first.steps == 12
    second = await iris_session(tmp_path, 1).run(steps=17, checkpoint_every=5, resume=folder)
    assert (second.start_step, second.steps) == (10, 17)
    assert sorted(p.name for p in folder.iterdir())[-1] == "node-000000000015.p2pml"


async def test_a_session_asked_to_resume_without_a_usable_checkpoint_fails_before_joining(
    tmp_path,
):
    session = iris_session(tmp_path)
    (tmp_path / "node-000000000005.p2pml").write_bytes(b"P2PM")
    with pytest.raises(ConfigError, match=r"node-000000000005\.p2pml: .*truncated"):
        await session.run(steps=3, resume=tmp_path)


async def test_a_worker_session_refuses_resume(tmp_path):
    with pytest.raises(ConfigError, match="no resume for a worker"):
        await iris_session(tmp_path).run(steps=3, resume=tmp_path, server=Address("127.0.0.1", 9))


# -- a real process killed with SIGKILL ----------------------------------------------------------

SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from p2pml.core.config import DataPlaneConfig, OverlayConfig
from p2pml.core.run import NodeConfig
from p2pml.core.types import Address
from p2pml.train.session import Session

folder, steps, resume = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "resume"
host = Address("127.0.0.70", 0)
config = NodeConfig(
    overlay=OverlayConfig(listen=host), data=DataPlaneConfig(listen=host), barrier="ssp",
    linger_s=0.0,
)
session = Session.build(
    config, run_id="kill", model="mlp", dataset="digits", batch_size=16, seed=1,
    key_path=folder / "key",
)
result = asyncio.run(session.run(
    steps=steps, slow_s=0.02, checkpoint_dir=folder / "ckpt", checkpoint_every=5,
    resume=folder / "ckpt" if resume else None,
))
print(json.dumps({"start": result.start_step, "steps": result.steps}))
"""


def node_process(tmp_path, steps: int, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(steps), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_node_killed_with_sigkill_resumes_from_its_last_checkpoint(tmp_path):
    steps = 100
    first = node_process(tmp_path, steps, "fresh")
    try:
        deadline = time.monotonic() + 60
        while not any(p.name >= "node-000000000015" for p in (tmp_path / "ckpt").glob("*.p2pml")):
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no checkpoint of step 15 within 60 s"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    last_step = max(int(p.stem.split("-")[1]) for p in (tmp_path / "ckpt").glob("*.p2pml"))
    assert last_step < steps
    second = node_process(tmp_path, steps, "resume")
    out, err = second.communicate(timeout=100)
    assert second.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"start": last_step, "steps": steps}
