"""`Session`: one node's whole run with a built-in model and data set (what ``p2pml run`` does).

It loads the data set and takes this node's shard, builds the model from the run's seed (so every
node starts from the same parameters), derives the run manifest, then either trains through a
peer-mode `Node` or a parameter server's `Worker` with a `Trainer` until the last step (`run`), or
serves the model as the parameter server (`serve`), and optionally saves the final model.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from p2pml.core.run import HyperValue, NodeConfig, RunManifest
from p2pml.core.types import Address
from p2pml.io.modelfile import load_latest, save_model
from p2pml.node.node import Node
from p2pml.node.server import CHECKPOINT_PREFIX, ParameterServer, UpdateLog
from p2pml.node.worker import Worker
from p2pml.protocol import deltas as rules
from p2pml.protocol.identity import NodeKey
from p2pml.protocol.messages import TensorBlob
from p2pml.train.datasets import Dataset, batches, load_dataset, shard
from p2pml.train.loop import StepDriver, StepLog, Trainer, TrainResult, accuracy
from p2pml.train.models import build_model
from p2pml.train.tensors import load_blobs, run_manifest, to_blobs, trainable

__all__ = ["Session", "data_seed"]

log = logging.getLogger(__name__)


def data_seed(seed: int, peer_id: bytes) -> int:
    """A node's own batch order: the run's seed mixed with the node's ID."""
    digest = hashlib.blake2b(seed.to_bytes(8, "little", signed=True) + peer_id, digest_size=8)
    return int.from_bytes(digest.digest(), "little")


@dataclass(slots=True)
class Session:
    """Everything one node needs for a run with a built-in model; see the module docstring."""

    config: NodeConfig
    manifest: RunManifest
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: Dataset
    key: NodeKey
    batch_size: int
    seed: int
    shard: tuple[int, int] | None

    @classmethod
    def build(
        cls,
        config: NodeConfig,
        *,
        run_id: str,
        model: str,
        dataset: str,
        data_dir: Path | None = None,
        lr: float = 0.05,
        momentum: float = 0.9,
        batch_size: int = 64,
        seed: int = 0,
        shard: tuple[int, int] | None = None,
        key_path: Path | None = None,
    ) -> Session:
        """Load the data, build the model and the manifest.

        Raises:
            ConfigError: for an unknown model or data set, missing data, or a bad run ID.
        """
        data = load_dataset(dataset, data_dir=data_dir, seed=seed)
        net = build_model(model, data.input_shape, data.n_classes, seed=seed)
        hyper: dict[str, HyperValue] = {
            "model": model,
            "dataset": dataset,
            "lr": lr,
            "momentum": momentum,
            "batch_size": batch_size,
            "seed": seed,
            "barrier": config.barrier,
            "staleness": config.staleness,
            "sample": str(config.sample),
        }
        manifest = run_manifest(run_id, net, hyper)
        optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
        key = NodeKey.load_or_create(key_path) if key_path is not None else NodeKey.generate()
        return cls(config, manifest, net, optimizer, data, key, batch_size, seed, shard)

    async def run(
        self,
        *,
        steps: int,
        slow_s: float = 0.0,
        eval_every: int = 0,
        on_step: Callable[[StepLog], None] | None = None,
        save: Path | None = None,
        on_ready: Callable[[StepDriver], None] | None = None,
        time_budget_s: float | None = None,
        server: Address | None = None,
    ) -> TrainResult:
        """Join, wait for `min_peers`, train `steps` steps, finish, and save the model; as a
        worker of the parameter server at `server` when it is given, else as a peer."""
        data = self.data
        x, y = data.x_train, data.y_train
        if self.shard is not None:
            x, y = shard(x, y, self.shard[0], self.shard[1], seed=self.seed)
        driver: Node | Worker
        if server is None:
            driver = Node(self.config, self.manifest, key=self.key)
        else:
            driver = Worker(self.config, self.manifest, server, key=self.key)
        async with driver as node:
            if on_ready is not None:
                on_ready(node)
            stream = batches(x, y, self.batch_size, seed=data_seed(self.seed, node.peer_id))
            if self.config.min_peers and isinstance(node, Node):
                await node.wait_for_peers(self.config.min_peers)
            async with Trainer(
                node,
                self.model,
                self.optimizer,
                eval_data=(data.x_test, data.y_test),
                eval_every=eval_every,
                slow_s=slow_s,
            ) as trainer:
                result = await trainer.train(
                    stream, steps=steps, on_step=on_step, time_budget_s=time_budget_s
                )
        if save is not None:
            blobs = to_blobs([(n, p.detach().clone()) for n, p in trainable(self.model)])
            await asyncio.to_thread(save_model, save, self.manifest.tag, result.steps, blobs)
            log.info("saved the final model to %s", save)
        return result

    def _server_params(self, checkpoint_dir: Path | None) -> tuple[list[TensorBlob], int]:
        """The model as numpy views of the torch parameters (the server updates them in place,
        and evaluation reads them), loaded from the newest good checkpoint when there is one."""
        version = 0
        if checkpoint_dir is not None:
            found = load_latest(checkpoint_dir, CHECKPOINT_PREFIX, self.manifest.tag)
            if found is not None:
                path, saved = found
                rules.check_tensors(saved.tensors, self.manifest.params, what="checkpoint")
                rules.check_finite_tensors(saved.tensors, "checkpoint")
                load_blobs(trainable(self.model), saved.tensors)
                version = saved.version
                log.info("resuming the server from %s (model version %d)", path, version)
        with torch.no_grad():
            views = [TensorBlob(n, p.detach().numpy()) for n, p in trainable(self.model)]
        return views, version

    async def serve(
        self,
        *,
        eval_every: int = 0,
        on_update: Callable[[UpdateLog], None] | None = None,
        checkpoint_dir: Path | None = None,
        save: Path | None = None,
        on_ready: Callable[[ParameterServer], None] | None = None,
    ) -> dict[str, object]:
        """Run the parameter server until its workers have finished; returns its summary.

        A server restarted with the same `checkpoint_dir` resumes from the newest good
        checkpoint in it.
        """
        torch.set_num_threads(1)  # evaluation runs in the server's one apply thread
        params, version = await asyncio.to_thread(self._server_params, checkpoint_dir)
        data = (self.data.x_test, self.data.y_test)
        async with ParameterServer(
            self.config,
            self.manifest,
            params,
            version=version,
            key=self.key,
            evaluate=lambda: accuracy(self.model, data),
            eval_every=eval_every,
            checkpoint_dir=checkpoint_dir,
            on_update=on_update,
        ) as server:
            if on_ready is not None:
                on_ready(server)
            await server.wait_finished()
            summary = server.summary()
            if save is not None:
                blobs = tuple(TensorBlob(b.name, b.array.copy()) for b in params)
                await asyncio.to_thread(save_model, save, self.manifest.tag, server.version, blobs)
                log.info("saved the final model to %s", save)
        return summary
