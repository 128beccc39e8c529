"""`Session`: one node's whole run with a built-in model and data set (what ``p2pml run`` does).

It loads the data set and takes this node's shard, builds the model from the run's seed (so every
node starts from the same parameters), derives the run manifest, then either trains through a
peer-mode `Node` or a parameter server's `Worker` with a `Trainer` until the last step (`run`), or
serves the model as the parameter server (`serve`), and optionally saves the final model.

With an `AggregationConfig` other than the plain mean (``--aggregate``, ``--norm-filter``), a peer
combines and screens the deltas it receives (`train/robust.py`) and a server the deltas of a BSP
round (`node/server.py`); a worker's deltas are combined by its server, so a worker ignores it.
It is a node's own defence, not part of the run manifest: nodes of one run may differ in it.

A peer checkpoints its parameters, optimiser state and step every `checkpoint_every` steps and
resumes from the newest usable checkpoint of a folder (`train/checkpoint.py`); the server resumes
from its own checkpoints (`node/server.py`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from p2pml.core.run import HyperValue, NodeConfig, RunManifest
from p2pml.core.types import Address
from p2pml.errors import ConfigError
from p2pml.io.modelfile import SavedModel, find_checkpoint, load_latest, save_model
from p2pml.node.node import Node
from p2pml.node.server import CHECKPOINT_PREFIX, ParameterServer, UpdateLog
from p2pml.node.worker import Worker
from p2pml.protocol import deltas as rules
from p2pml.protocol.aggregate import AggregationConfig
from p2pml.protocol.auth import Admission
from p2pml.protocol.identity import NodeKey
from p2pml.protocol.messages import TensorBlob
from p2pml.train.checkpoint import Checkpoint, load_checkpoint
from p2pml.train.datasets import Dataset, Features, Labels, batches, load_dataset, shard
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
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    admission: Admission = field(default_factory=Admission)

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
        aggregation: AggregationConfig | None = None,
        admission: Admission | None = None,
    ) -> Session:
        """Load the data, build the model and the manifest.

        Args:
            aggregation: how a peer combines received deltas, or a server a BSP round's (the
                plain mean by default).
            admission: who may take part (`--run-key`, `--allow-keys`); open by default.

        Raises:
            ConfigError: for an unknown model or data set, missing data, a bad run ID or a bad
                aggregation setting.
        """
        aggregation = (aggregation or AggregationConfig()).validate()
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
        return cls(
            config,
            manifest,
            net,
            optimizer,
            data,
            key,
            batch_size,
            seed,
            shard,
            aggregation,
            admission or Admission(),
        )

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
        checkpoint_dir: Path | None = None,
        checkpoint_every: int | None = None,
        resume: Path | None = None,
        trainer_class: type[Trainer] = Trainer,
    ) -> TrainResult:
        """Join, wait for `min_peers`, train `steps` steps, finish, and save the model; as a
        worker of the parameter server at `server` when it is given, else as a peer.

        Args:
            checkpoint_dir: where checkpoints go; by default the `resume` folder.
            checkpoint_every: checkpoint every this many steps (0: never); by default
                `config.checkpoint_every`.
            resume: continue a peer from the newest usable checkpoint in this folder, on the
                batches it would have had without the break (unless the run is more than the
                staleness bound ahead: then from the run's current model and step).
            trainer_class: a `Trainer` subclass to train with (experiments, such as a peer that
                misbehaves on purpose in benchmarks/byzantine.py).

        Raises:
            ConfigError: for `resume` with `server` (a worker continues from its server's model
                and step), for `resume` without a usable checkpoint (naming each file refused and
                why), or for checkpointing without a folder; all before joining the network.
        """
        every = self.config.checkpoint_every if checkpoint_every is None else checkpoint_every
        folder = resume if checkpoint_dir is None else checkpoint_dir
        if resume is not None and server is not None:
            raise ConfigError(
                "resume",
                str(resume),
                "no resume for a worker: it continues from its server's model",
            )
        if every and folder is None:
            raise ConfigError("checkpoint_dir", None, "a folder when checkpoint_every > 0")
        checkpoint: Checkpoint | None = None
        if resume is not None:
            checkpoint = await asyncio.to_thread(load_checkpoint, resume, self.manifest)
            log.info("checkpoint %s holds step %d", checkpoint.path, checkpoint.step)
        driver: Node | Worker
        if server is None:
            driver = Node(self.config, self.manifest, key=self.key, admission=self.admission)
        else:
            driver = Worker(
                self.config, self.manifest, server, key=self.key, admission=self.admission
            )
        async with driver as node:
            if on_ready is not None:
                on_ready(node)
            if self.config.min_peers and isinstance(node, Node):
                await node.wait_for_peers(self.config.min_peers)
            async with trainer_class(
                node,
                self.model,
                self.optimizer,
                eval_data=(self.data.x_test, self.data.y_test),
                eval_every=eval_every,
                slow_s=slow_s,
                checkpoint_dir=folder,
                checkpoint_every=every,
                aggregation=self.aggregation if server is None else None,  # see the docstring
            ) as trainer:
                result = await trainer.train(
                    self._batches(node.peer_id),
                    steps=steps,
                    on_step=on_step,
                    time_budget_s=time_budget_s,
                    resume=checkpoint,
                    skip_completed=checkpoint is not None,
                )
        if save is not None:
            blobs = to_blobs([(n, p.detach().clone()) for n, p in trainable(self.model)])
            await asyncio.to_thread(save_model, save, self.manifest.tag, result.steps, blobs)
            log.info("saved the final model to %s", save)
        return result

    def _batches(self, peer_id: bytes) -> Iterator[tuple[Features, Labels]]:
        """This node's endless batches of its shard, in its own order."""
        x, y = self.data.x_train, self.data.y_train
        if self.shard is not None:
            x, y = shard(x, y, self.shard[0], self.shard[1], seed=self.seed)
        return batches(x, y, self.batch_size, seed=data_seed(self.seed, peer_id))

    def _server_params(
        self, checkpoint_dir: Path | None, resume: Path | None
    ) -> tuple[list[TensorBlob], int]:
        """The model as numpy views of the torch parameters (the server updates them in place,
        and evaluation reads them), loaded from the newest usable checkpoint of `resume` (which
        must hold one), else of `checkpoint_dir` when there is one there."""
        version = 0
        found: tuple[Path, SavedModel] | None = None

        def check(saved: SavedModel) -> None:
            rules.check_tensors(saved.tensors, self.manifest.params, what="checkpoint")
            rules.check_finite_tensors(saved.tensors, "checkpoint")

        tag = self.manifest.tag
        if resume is not None:
            found = find_checkpoint(resume, CHECKPOINT_PREFIX, tag, check=check)
        elif checkpoint_dir is not None:
            found = load_latest(checkpoint_dir, CHECKPOINT_PREFIX, tag, check=check)
        if found is not None:
            path, saved = found
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
        resume: Path | None = None,
    ) -> dict[str, object]:
        """Run the parameter server until its workers have finished; returns its summary.

        A server restarted with the same `checkpoint_dir` resumes from the newest usable
        checkpoint in it (or starts afresh when there is none); with `resume`, from the newest
        usable one in that folder, which must hold one.

        Raises:
            ConfigError: for `resume` without a usable server checkpoint, naming each file
                refused and why.
        """
        torch.set_num_threads(1)  # evaluation runs in the server's one apply thread
        params, version = await asyncio.to_thread(self._server_params, checkpoint_dir, resume)
        data = (self.data.x_test, self.data.y_test)
        async with ParameterServer(
            self.config,
            self.manifest,
            params,
            version=version,
            key=self.key,
            admission=self.admission,
            evaluate=lambda: accuracy(self.model, data),
            eval_every=eval_every,
            checkpoint_dir=checkpoint_dir,
            on_update=on_update,
            aggregation=self.aggregation,
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
