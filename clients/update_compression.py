"""Clients of the post-training compression baselines: train normally, then compress the update.

``DeltaClient`` keeps the model it received, trains with the ordinary local SGD loop, and passes
delta = local - received (float32, all wire tensors concatenated in wire order) to ``compress``.
Each method's client is a few lines: its quantizer and codec (``compression.update_quantizers``,
``compression.sign_codec``) and, where the method needs it, per-client state in
``self.context.state`` (EF-SignSGD's residual, SignSGD's copy of the global model). Stochastic
rounding draws from a generator seeded by (seed, partition, round), so runs repeat exactly.
Contracts: ``contracts.update_quantization``, ``contracts.signsgd``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.common import Array, ArrayRecord, ConfigRecord, NDArrays, Scalar

from clients.base import TrainingClient
from compression.layout import concat_flat, split_flat
from compression.sign_codec import (
    ScaledSignCodec,
    ScaledSignMessage,
    SignCodec,
    SignMessage,
    apply_sign_step,
    scaled_sign,
    scaled_sign_values,
)
from compression.update_quantizers import (
    FixedStepCodec,
    QSGDCodec,
    SymmetricCodec,
    quantize_fixed_step,
    quantize_qsgd,
    quantize_symmetric,
)
from contracts import signsgd
from contracts.messages import ROUND
from contracts.signsgd import SignSGDSettings, join_state
from contracts.update_quantization import (
    DADAQUANT_LEVELS,
    FedDQSettings,
    FedPAQSettings,
    QSGDSettings,
)
from core.seeding import torch_generator
from core.wire_state import get_wire_state, parameter_split, set_wire_state

EF_STATE_KEY = "ef-signsgd"
SIGNSGD_STATE_KEY = "signsgd"


class DeltaClient(TrainingClient):
    """Trains on the received fp32 model and sends ``compress(local - received)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        state = get_wire_state(self.model)
        self.shapes = [a.shape for a in state]
        self.sizes = tuple(int(a.size) for a in state)
        self.received = np.zeros(sum(self.sizes), dtype=np.float32)

    def load_downlink(self, arrays: NDArrays, config: dict[str, Scalar]) -> None:
        super().load_downlink(arrays, config)
        self.received = concat_flat(get_wire_state(self.model), np.float32)

    def update(self) -> np.ndarray:
        """delta = trained wire state - received wire state, float32 (d,)."""
        return concat_flat(get_wire_state(self.model), np.float32) - self.received

    def generator(self, config: dict[str, Scalar]) -> torch.Generator:
        return torch_generator(self.cfg.seed, self.partition_id, int(config.get(ROUND, 0)), 7)

    def compress(self, delta: np.ndarray, config: dict[str, Scalar]) -> NDArrays:
        raise NotImplementedError

    def encode_uplink(self, config: dict[str, Scalar]) -> NDArrays:
        return self.compress(self.update(), config)


class FedPAQClient(DeltaClient):
    """b-bit unbiased symmetric quantization of the update."""

    settings: FedPAQSettings

    def compress(self, delta: np.ndarray, config: dict[str, Scalar]) -> NDArrays:
        levels = self.settings.levels
        message = quantize_symmetric(delta, self.sizes, levels, self.generator(config))
        return SymmetricCodec(self.sizes, levels, self.cfg.entropy).encode(message)


class DAdaQuantClient(DeltaClient):
    """Symmetric quantization with the level the server assigned this client this round."""

    def compress(self, delta: np.ndarray, config: dict[str, Scalar]) -> NDArrays:
        levels = int(config.get(DADAQUANT_LEVELS, 0))
        if levels < 1:
            raise ValueError(f"fit config lacks a positive {DADAQUANT_LEVELS!r}")
        message = quantize_symmetric(delta, self.sizes, levels, self.generator(config))
        return SymmetricCodec(self.sizes, levels, self.cfg.entropy).encode(message)


class QSGDClient(DeltaClient):
    """QSGD: s-level L2-norm-scaled stochastic quantization in buckets."""

    settings: QSGDSettings

    def compress(self, delta: np.ndarray, config: dict[str, Scalar]) -> NDArrays:
        levels, bucket = self.settings.levels, self.settings.bucket_size
        message = quantize_qsgd(delta, levels, bucket, self.generator(config))
        return QSGDCodec(delta.size, levels, bucket, self.cfg.entropy).encode(message)


class FedDQClient(DeltaClient):
    """FedDQ: fixed step, per-tensor width just covering the update's range."""

    settings: FedDQSettings

    def compress(self, delta: np.ndarray, config: dict[str, Scalar]) -> NDArrays:
        message = quantize_fixed_step(delta, self.sizes, self.settings.step, self.generator(config))
        return FixedStepCodec(self.sizes).encode(message)


class EFSignSGDClient(DeltaClient):
    """Scaled sign of (parameter update + residual); the residual stays in ``context.state``.
    BatchNorm running statistics are sent as float16 values (see ``strategies.signsgd``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.p_index, self.b_index, self.layout = parameter_split(self.model)
        self.param_sizes = tuple(int(np.prod(s)) for s in self.layout.quantized_shapes)
        self.codec = ScaledSignCodec(self.param_sizes, self.layout.num_extras)

    def residual(self) -> np.ndarray:
        record = self.context.state.get(EF_STATE_KEY)
        if isinstance(record, ArrayRecord) and "residual" in record:
            return record["residual"].numpy().astype(np.float32)
        return np.zeros(self.layout.num_quantized, dtype=np.float32)

    def compress(self, delta: np.ndarray, config: dict[str, Scalar]) -> NDArrays:
        pieces = split_flat(delta, self.shapes)
        params = concat_flat([pieces[i] for i in self.p_index], np.float32)
        corrected = params + self.residual()
        signs, scales = scaled_sign(corrected, self.param_sizes)
        sent = scaled_sign_values(signs, scales, self.param_sizes)
        self.context.state[EF_STATE_KEY] = ArrayRecord(
            {"residual": Array((corrected - sent).astype(np.float32))}
        )
        state = get_wire_state(self.model)
        buffers = concat_flat([state[i] for i in self.b_index], np.float16)
        return self.codec.encode(ScaledSignMessage(signs, scales, buffers))


class SignSGDClient(DeltaClient):
    """SignSGD: 1-bit sign uplink; rebuilds the global from a 1-bit voted sign when it can.

    The node's ``context.state`` keeps the global model it last installed and that model's round,
    so a ``sign`` downlink is applied to exactly the model the server assumes.
    """

    settings: SignSGDSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.p_index, self.b_index, self.layout = parameter_split(self.model)
        self.codec = SignCodec(self.layout.num_quantized, self.layout.num_extras)

    def load_downlink(self, arrays: NDArrays, config: dict[str, Scalar]) -> None:
        mode = config.get(signsgd.DOWNLINK, signsgd.FULL)
        base_round = int(config.get(signsgd.BASE_ROUND, -1))
        if mode == signsgd.FULL:
            set_wire_state(self.model, arrays)
            holds = base_round
        elif mode == signsgd.SIGN:
            holds = self._apply_vote(arrays, base_round, self.settings.server_lr)
        else:
            raise ValueError(f"unknown {signsgd.DOWNLINK} {mode!r}")
        state = get_wire_state(self.model)
        self.received = concat_flat(state, np.float32)
        self.context.state[SIGNSGD_STATE_KEY] = ArrayRecord({"global": Array(self.received)})
        self.context.state[SIGNSGD_STATE_KEY + "-round"] = ConfigRecord({"round": holds})

    def _apply_vote(self, arrays: NDArrays, base_round: int, step: float) -> int:
        """Install global(base + 1) = global(base) + step * vote; returns base + 1."""
        record = self.context.state.get(SIGNSGD_STATE_KEY)
        meta = self.context.state.get(SIGNSGD_STATE_KEY + "-round")
        if not isinstance(record, ArrayRecord) or not isinstance(meta, ConfigRecord):
            raise ValueError("sign downlink but this client holds no global model")
        if int(meta["round"]) != base_round:
            raise ValueError(f"sign downlink for round {base_round}, client holds {meta['round']}")
        message = self.codec.decode(arrays)
        held = record["global"].numpy().astype(np.float32)
        sizes = np.cumsum([0, *self.sizes])
        params = concat_flat([held[sizes[i] : sizes[i + 1]] for i in self.p_index], np.float32)
        new_params = apply_sign_step(params, message.signs, step)
        buffers = message.stats.astype(np.float32)
        set_wire_state(
            self.model, join_state(self.layout, self.p_index, self.b_index, new_params, buffers)
        )
        return base_round + 1

    def compress(self, delta: np.ndarray, config: dict[str, Scalar]) -> NDArrays:
        sizes = np.cumsum([0, *self.sizes])
        params = concat_flat([delta[sizes[i] : sizes[i + 1]] for i in self.p_index], np.float32)
        state = get_wire_state(self.model)
        buffers = concat_flat([state[i] for i in self.b_index], np.float16)
        signs = np.where(params >= 0, np.float32(1.0), np.float32(-1.0))
        return self.codec.encode(SignMessage(signs, buffers))
