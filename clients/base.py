"""The training client every method builds on: a Flower ``NumPyClient`` with a local SGD loop.

A method client overrides the hooks, not ``fit``:

* ``load_downlink(arrays, config)``: turn what the server sent into the local model
  (default: a full-precision wire state);
* ``make_optimizer()`` / ``weight_overrides(step, total)``: what is trained, and which tensors
  replace the module's weights in the forward pass (default: plain SGD on the model's own
  parameters with cross-entropy; ``training_step`` can be overridden whole if a method needs it);
* ``encode_uplink(config)``: what goes back (default: the full-precision wire state).

Per-client state that must outlive a round (error residuals, virtual-bit magnitudes) belongs in
``self.context.state``: Flower keeps the node's ``Context`` across rounds in simulation and in
deployment, whereas this object is rebuilt for every message. ``self.settings`` is the method's
typed settings group (``contracts``), ``self.cfg`` the run config with the common keys.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.common import Array, ArrayRecord, Context, NDArrays, Scalar
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from compression import reference
from compression.packing import pack_codes, unpack_codes
from contracts.downlink import Downlink
from contracts.messages import PARTITION_ID, ROUND, TORCH_THREADS, TRAIN_LOSS, TRAIN_SECONDS
from core.config import RunConfig
from core.seeding import derive_seed, seed_everything
from core.settings import NoSettings, Settings
from core.torch_utils import evaluate_model, iterate_minibatches, select_device
from core.wire_state import get_wire_state, set_wire_state

#: ``context.state`` record of the ``downlink=uq`` codes last received (reference coding).
UQ_CODES_KEY = "downlink-codes"


def held_basis(context: Context, key: str, bits: int, count: int) -> reference.Basis | None:
    """The codes a node kept under ``key`` (``keep_basis``) with their round, if any."""
    record = context.state.get(key)
    if not isinstance(record, ArrayRecord) or "codes" not in record or "round" not in record:
        return None
    held_round = int(record["round"].numpy().reshape(-1)[0])
    return reference.Basis(held_round, unpack_codes(record["codes"].numpy(), bits, count))


def keep_basis(context: Context, key: str, codes: np.ndarray, bits: int, server_round: int) -> None:
    """Keep ``codes`` (packed, ``bits`` each) as the basis of the next reference-coded message."""
    if server_round < 1:
        raise ValueError(f"reference coding needs the round in the config, got {server_round}")
    context.state[key] = ArrayRecord(
        {
            "codes": Array(pack_codes(codes, bits)),
            "round": Array(np.array([server_round], dtype=np.int64)),
        }
    )


class TrainingClient(NumPyClient):
    """Local training on one partition; full precision both ways unless a subclass says so."""

    #: set on a simulated model-poisoning attacker (``clients.attacks``): the uplink then
    #: carries received + factor * (trained - received) instead of the trained result.
    poison_factor: float | None = None

    def __init__(
        self,
        cfg: RunConfig,
        settings: Settings | None = None,
        *,
        context: Context,
        model: nn.Module,
        train_set: TensorDataset,
        partition_id: int,
    ) -> None:
        self.cfg = cfg
        self.settings = settings if settings is not None else NoSettings()
        self.context = context
        self.partition_id = partition_id
        self.device = select_device(cfg.device)
        self.model = model.to(self.device)
        self.train_set = train_set
        self.downlink = Downlink.from_config(cfg)

    # ----------------------------------------------------------------- hooks for methods
    def load_downlink(self, arrays: NDArrays, config: dict[str, Scalar]) -> None:
        """Install the server's message into ``self.model``."""
        set_wire_state(self.model, arrays)

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Optimizer over what this method trains; default: all model parameters."""
        return torch.optim.SGD(
            self.model.parameters(),
            lr=self.cfg.learning_rate,
            momentum=self.cfg.momentum,
            weight_decay=self.cfg.weight_decay,
        )

    def weight_overrides(self, step: int, total_steps: int) -> dict[str, torch.Tensor] | None:
        """Tensors that stand in for module parameters in this step's forward pass (quantized,
        binarized or rebuilt weights, through ``torch.func.functional_call``); None: the
        module's own. ``step`` counts from 0 within the round."""
        return None

    def training_step(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        step: int,
        total_steps: int,
    ) -> float:
        """One optimisation step; returns the batch loss. ``step`` counts from 0 in the round."""
        optimizer.zero_grad(set_to_none=True)
        overrides = self.weight_overrides(step, total_steps)
        if overrides is None:
            logits = self.model(images)
        else:
            logits = functional_call(self.model, overrides, (images,), strict=False)
        loss = nn.functional.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    def encode_uplink(self, config: dict[str, Scalar]) -> NDArrays:
        """Arrays sent back to the server."""
        return get_wire_state(self.model)

    def poison(self, received: NDArrays, factor: float) -> None:
        """Simulated attack: make the trained result received + factor * (trained - received)
        before it is encoded (the wire state; methods whose uplink is not the model's weights
        extend this)."""
        trained = get_wire_state(self.model)
        scale = np.float32(factor)
        set_wire_state(
            self.model, [r + scale * (t - r) for r, t in zip(received, trained, strict=True)]
        )

    # ----------------------------------------------------------------- Flower NumPyClient API
    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return get_wire_state(self.model)

    def receive(self, arrays: NDArrays, config: dict[str, Scalar] | None = None) -> NDArrays:
        """The wire state a generic ``downlink=fp16|uq`` message stands for (the message itself
        otherwise): every method's client starts from exactly what it decoded. With reference
        coding the codes are resolved against the ones this node kept, and a training message
        (``config`` given) leaves its codes as the next basis."""
        if not self.downlink.active:
            return arrays
        shapes = [tuple(a.shape) for a in get_wire_state(self.model)]
        if not self.downlink.reference:
            return self.downlink.decode(arrays, shapes)
        count = self.downlink.layout(shapes).num_codes
        held = held_basis(self.context, UQ_CODES_KEY, self.downlink.bits, count)
        state, codes = self.downlink.decode_codes(arrays, shapes, held)
        if config is not None and codes is not None:
            server_round = int(config.get(ROUND, 0))
            keep_basis(self.context, UQ_CODES_KEY, codes, self.downlink.bits, server_round)
        return state

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        server_round = int(config.get(ROUND, 0))
        self.load_downlink(self.receive(parameters, config), config)
        received = get_wire_state(self.model) if self.poison_factor is not None else None
        started = time.perf_counter()
        train_loss = self.train(server_round)
        train_seconds = time.perf_counter() - started
        if received is not None and self.poison_factor is not None:
            self.poison(received, self.poison_factor)
        payload = self.encode_uplink(config)
        metrics: dict[str, Scalar] = {
            PARTITION_ID: self.partition_id,
            TRAIN_LOSS: train_loss,
            TRAIN_SECONDS: train_seconds,
            TORCH_THREADS: torch.get_num_threads(),
        }
        return payload, len(self.train_set), metrics

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Loss/accuracy of the received model on this client's data (federated evaluation)."""
        self.load_downlink(self.receive(parameters), config)
        loss, accuracy = evaluate_model(self.model, self.train_set, self.device)
        return loss, len(self.train_set), {"accuracy": accuracy, PARTITION_ID: self.partition_id}

    # ----------------------------------------------------------------- local SGD loop
    def train(self, server_round: int) -> float:
        """``local-epochs`` passes over the partition; returns the mean batch loss.

        The shuffling and any randomness in the step depend on (seed, partition, round) only,
        so a run repeats exactly whatever Ray worker executes this client.
        """
        seed = derive_seed(self.cfg.seed, self.partition_id, server_round)
        seed_everything(seed)
        generator = torch.Generator().manual_seed(seed)
        epochs = self.cfg.local_epochs
        batch_size = self.cfg.batch_size
        steps_per_epoch = -(-len(self.train_set) // batch_size)
        total_steps = epochs * steps_per_epoch
        optimizer = self.make_optimizer()
        self.model.train()
        losses: list[float] = []
        step = 0
        for _ in range(epochs):
            for images, labels in iterate_minibatches(
                self.train_set, batch_size, generator, self.device
            ):
                losses.append(self.training_step(images, labels, optimizer, step, total_steps))
                step += 1
        return float(np.mean(losses)) if losses else float("nan")
