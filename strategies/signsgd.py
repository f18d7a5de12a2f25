"""SignSGD with majority vote (Bernstein et al. 2019) and EF-SignSGD (Karimireddy et al. 2019).

SignSGD: every client sends sign(delta) of its trainable parameters (weights, biases, BatchNorm
affine) at 1 bit per scalar; the server takes the elementwise majority (one vote per client, a tie
broken by a seeded coin) and moves the global parameters by ``signsgd-server-lr`` times the voted
sign. (The vote is its own robust rule: no norm bound, and ``aggregation`` does not apply to
it.) BatchNorm running statistics are not gradients: they travel as float16 values (clients send
theirs, the server sends their norm-bounded combination under ``aggregation``, by default the
example-weighted mean) and their bytes count.

Downlink: a client that holds the previous global model (it took part in the previous round) gets
only the voted sign, 1 bit per parameter, plus the float16 statistics, and rebuilds the new global
with the same float32 operation as the server (``compression.sign_codec.apply_sign_step``). Any
other client (first round, or it missed rounds) gets the full fp32 model, and those bytes count.
The fit config says which (``contracts.signsgd``: ``signsgd-downlink`` = ``full`` | ``sign``,
``signsgd-base-round`` = the round of the global the sign applies to). ``rounds.csv`` gains
``full_downlinks``.

Sign downlink and uplink: ``compression.sign_codec.SignCodec`` (packed signs over the p parameter
scalars in wire order, float16 statistics).

EF-SignSGD: clients send the scaled sign of (delta + residual) per parameter tensor and keep the
residual in their state; BatchNorm running statistics travel as float16 values, as in SignSGD (a
scaled sign step can drive a running variance negative). Uplink:
``compression.sign_codec.ScaledSignCodec``. The server adds the example-weighted mean of the
decoded parameter updates and takes the weighted mean of the statistics. Full-precision downlink.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.common import Scalar

from compression.sign_codec import (
    ScaledSignCodec,
    SignCodec,
    SignMessage,
    apply_sign_step,
    majority_vote,
    scaled_sign_values,
)
from contracts import signsgd
from contracts.signsgd import SignSGDSettings, join_state
from core.seeding import numpy_rng
from core.wire_state import parameter_split
from strategies.aggregation import clip_norms, combine, gather_flat
from strategies.base import ClientReply, ClientUpdate, CommunicationStrategy
from strategies.delta import DeltaStrategy


class SignSGDStrategy(CommunicationStrategy):
    """SignSGD with majority vote, 1-bit both ways; see the module docstring."""

    uplink_name = "SignSGD uplink"
    round_columns = {"full_downlinks": 0}
    generic_downlink = False  # the paper's own compressed downlink (the voted sign)
    settings: SignSGDSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.p_index, self.b_index, self.layout = parameter_split(self.model)
        self.codec = SignCodec(self.layout.num_quantized, self.layout.num_extras)
        self.holds: dict[str, int] = {}  # cid -> round of the global model the client holds
        self.vote_message: list[np.ndarray] | None = None  # the last round's sign downlink
        self.vote_round = -1
        self.vote_state: list[np.ndarray] | None = None  # the model the vote produced

    def _sign_ready(self, server_round: int, cid: str) -> bool:
        # ``is``: a refused aggregate (``aggregate_problem``) leaves the old global in place,
        # and then the vote does not lead to it.
        return (
            self.vote_round == server_round - 1
            and self.vote_state is self.global_state
            and self.holds.get(cid) == server_round - 2
        )

    def downlink_arrays(self, server_round: int, cid: str) -> list[np.ndarray]:
        if self._sign_ready(server_round, cid):
            assert self.vote_message is not None
            return self.vote_message
        self.count_metric(server_round, "full_downlinks")
        return self.global_state

    def fit_config(self, server_round: int, cid: str) -> dict[str, Scalar]:
        if self._sign_ready(server_round, cid):
            return {signsgd.DOWNLINK: signsgd.SIGN, signsgd.BASE_ROUND: server_round - 2}
        return {signsgd.DOWNLINK: signsgd.FULL, signsgd.BASE_ROUND: server_round - 1}

    def decode_update(self, server_round: int, reply: ClientReply) -> ClientUpdate:
        message = self.codec.decode(reply.arrays)
        # A client whose answer is valid has installed this round's downlink: it now holds
        # global r - 1 (a client whose answer is refused gets the full model next time).
        self.holds[reply.cid] = server_round - 1
        update = reply.update([message.signs.astype(np.int8)])
        # The statistics' change is the delta: norm-checked and combined as other methods' are.
        buffers = gather_flat(self.global_state, self.b_index, "float32")
        update.delta = message.stats.astype(np.float32) - buffers
        return update

    def tie_break(self, server_round: int) -> np.ndarray:
        rng = numpy_rng(self.cfg.seed, server_round, 0x5165)
        return rng.integers(0, 2, size=self.layout.num_quantized).astype(np.float32) * 2 - 1

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        vote = majority_vote(np.stack([u.arrays[0] for u in updates]), self.tie_break(server_round))
        # The statistics are values, not votes: bounded and combined as every method's deltas.
        old_buffers = gather_flat(self.global_state, self.b_index, "float32")
        deltas, clipped = clip_norms(
            [u.delta for u in updates if u.delta is not None], self.cfg.update_norm_bound
        )
        self.progress.traffic.round(server_round).clipped += clipped
        buffers = old_buffers + combine(
            deltas,
            self.client_weights(updates),
            [self.layout.num_extras],
            self.cfg.aggregation,
            self.cfg.trim_fraction,
        )
        params = gather_flat(self.global_state, self.p_index, "float32")
        params = apply_sign_step(params, vote, self.settings.server_lr)
        # What clients receive is float16: keep the server's copy identical to theirs.
        buffers16 = buffers.astype(np.float16).astype(np.float32)
        state = self.clamp_variances(
            join_state(self.layout, self.p_index, self.b_index, params, buffers16)
        )
        buffers16 = gather_flat(state, self.b_index, "float16")
        self.vote_message = self.codec.encode(SignMessage(vote, buffers16))
        self.vote_round = server_round
        self.vote_state = state
        return state


class EFSignSGDStrategy(DeltaStrategy):
    """EF-SignSGD server: decode per-tensor scaled signs, example-weighted mean."""

    uplink_name = "EF-SignSGD uplink"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.p_index, self.b_index, self.layout = parameter_split(self.model)
        self.param_sizes = tuple(int(np.prod(s)) for s in self.layout.quantized_shapes)
        self.codec = ScaledSignCodec(self.param_sizes, self.layout.num_extras)

    def decode_delta(self, server_round: int, reply: ClientReply) -> np.ndarray:
        """A full-length update: decoded scaled signs for the parameters, and for the
        statistics the client's value minus the global one (so the mean update yields their
        weighted mean)."""
        message = self.codec.decode(reply.arrays)
        params = scaled_sign_values(message.signs, message.scales, self.param_sizes)
        global_buffers = gather_flat(self.global_state, self.b_index, "float32")
        delta = join_state(
            self.layout,
            self.p_index,
            self.b_index,
            params,
            message.stats.astype(np.float32) - global_buffers,
        )
        return gather_flat(delta, range(len(delta)), "float32")
