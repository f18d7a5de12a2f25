"""SignSGD with majority vote (Bernstein et al. 2019) and EF-SignSGD (Karimireddy et al. 2019).

SignSGD: every client sends sign(delta) of its trainable parameters (weights, biases, BatchNorm
affine) at 1 bit per scalar; the server takes the elementwise majority (one vote per client, a tie
broken by a seeded coin) and moves the global parameters by ``signsgd-server-lr`` times the voted
sign. BatchNorm running statistics are not gradients: they travel as float16 values (clients send
theirs, the server sends the example-weighted mean) and their bytes count.

Downlink: a client that holds the previous global model (it took part in the previous round) gets
only the voted sign, 1 bit per parameter, plus the float16 statistics, and rebuilds the new global
with the same float32 operation as the server (``compression.sign_codec.apply_sign_step``). Any
other client (first round, or it missed rounds) gets the full fp32 model, and those bytes count.
The fit config says which (``signsgd-downlink`` = ``full`` | ``sign``, ``signsgd-base-round`` =
the round of the global the sign applies to). ``rounds.csv`` gains ``full_downlinks``.

Sign downlink (2 arrays): uint8 ``pack_signs(vote)`` over the p parameter scalars (wire order,
ceil(p / 8) bytes); float16 (e,) the running statistics. Uplink: the same two arrays with the
client's sign(delta) and its own statistics.

EF-SignSGD: clients send the scaled sign of (delta + residual) per parameter tensor
(``compression.sign_codec.encode_scaled_sign``) and keep the residual in their state; BatchNorm
running statistics travel as float16 values, as in SignSGD (a scaled sign step can drive a running
variance negative). Uplink (3 arrays): uint8 signs (ceil(p / 8)), float32 scales (one per
parameter tensor), float16 statistics (e,). The server adds the example-weighted mean of the
decoded parameter updates and takes the weighted mean of the statistics. Full-precision downlink.
"""

from __future__ import annotations

import numpy as np
from flwr.common import FitRes, Scalar, parameters_to_ndarrays

from compression.layout import SplitLayout, concat_flat, split_flat
from compression.sign_codec import (
    apply_sign_step,
    decode_scaled_sign,
    majority_vote,
    pack_signs,
    unpack_signs,
)
from fl_app.config import ConfigKey
from fl_app.torch_utils import parameter_split
from strategies.base import ClientUpdate, CommunicationStrategy, PayloadError
from strategies.delta import DeltaStrategy, expect_arrays

CONFIG_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey(
        "signsgd-server-lr",
        float,
        0.001,
        "server step size applied to the voted sign",
        min=0.0,
        min_inclusive=False,
    ),
)


def join_state(
    layout: SplitLayout,
    p_index: list[int],
    b_index: list[int],
    params: np.ndarray,
    buffers: np.ndarray,
) -> list[np.ndarray]:
    """The wire state from flat parameters and flat buffers."""
    state: list[np.ndarray | None] = [None] * (len(p_index) + len(b_index))
    for index, piece in zip(p_index, split_flat(params, layout.quantized_shapes), strict=True):
        state[index] = piece.astype(np.float32).copy()
    for index, piece in zip(b_index, split_flat(buffers, layout.extra_shapes), strict=True):
        state[index] = piece.astype(np.float32).copy()
    return state  # type: ignore[return-value]


class SignSGDStrategy(CommunicationStrategy):
    """SignSGD with majority vote, 1-bit both ways; see the module docstring."""

    extra_columns = ("full_downlinks",)

    def __init__(self, cfg, **kwargs) -> None:  # noqa: ANN001, ANN003
        super().__init__(cfg, **kwargs)
        self.p_index, self.b_index, self.layout = parameter_split(self.model)
        self.step = float(cfg["signsgd-server-lr"])
        self.holds: dict[str, int] = {}  # cid -> round of the global model the client holds
        self.vote_message: list[np.ndarray] | None = None  # the last round's sign downlink
        self.vote_round = -1
        self.full_downlinks: dict[int, int] = {}

    def flat_params(self) -> np.ndarray:
        return concat_flat([self.global_state[i] for i in self.p_index], np.float32)

    def flat_buffers(self) -> np.ndarray:
        return concat_flat([self.global_state[i] for i in self.b_index], np.float32)

    def _sign_ready(self, server_round: int, cid: str) -> bool:
        return self.vote_round == server_round - 1 and self.holds.get(cid) == server_round - 2

    def downlink_arrays(self, server_round: int, cid: str) -> list[np.ndarray]:
        if self._sign_ready(server_round, cid):
            assert self.vote_message is not None
            return self.vote_message
        self.full_downlinks[server_round] = self.full_downlinks.get(server_round, 0) + 1
        return self.global_state

    def fit_config(self, server_round: int, cid: str) -> dict[str, Scalar]:
        if self._sign_ready(server_round, cid):
            return {"signsgd-downlink": "sign", "signsgd-base-round": server_round - 2}
        return {"signsgd-downlink": "full", "signsgd-base-round": server_round - 1}

    def decode_uplink(self, server_round: int, cid: str, fit_res: FitRes) -> ClientUpdate:
        # A client that answered has installed this round's downlink: it now holds global r - 1.
        self.holds[cid] = server_round - 1
        try:
            arrays = parameters_to_ndarrays(fit_res.parameters)
            expect_arrays(arrays, 2, "SignSGD")
            signs = unpack_signs(arrays[0], self.layout.num_quantized)
            buffers = np.asarray(arrays[1])
            if buffers.dtype != np.float16 or buffers.shape != (self.layout.num_extras,):
                raise ValueError(
                    f"statistics must be float16 ({self.layout.num_extras},), got "
                    f"{buffers.dtype} {buffers.shape}"
                )
            if not np.all(np.isfinite(buffers)):
                raise ValueError("statistics contain NaN or infinity")
        except Exception as err:
            raise PayloadError(f"SignSGD uplink: {type(err).__name__}: {err}") from None
        return ClientUpdate.of(cid, fit_res, [signs.astype(np.int8), buffers.astype(np.float32)])

    def tie_break(self, server_round: int) -> np.ndarray:
        rng = np.random.default_rng([self.cfg.seed, server_round, 0x5165])
        return rng.integers(0, 2, size=self.layout.num_quantized).astype(np.float32) * 2 - 1

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        vote = majority_vote(np.stack([u.arrays[0] for u in updates]), self.tie_break(server_round))
        total = sum(u.num_examples for u in updates)
        buffers = np.zeros(self.layout.num_extras, dtype=np.float64)
        for update in updates:
            buffers += update.num_examples / total * update.arrays[1]
        # What clients receive is float16: keep the server's copy identical to theirs.
        buffers16 = buffers.astype(np.float16)
        params = apply_sign_step(self.flat_params(), vote, self.step)
        self.vote_message = [pack_signs(vote), buffers16]
        self.vote_round = server_round
        return join_state(
            self.layout, self.p_index, self.b_index, params, buffers16.astype(np.float32)
        )

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
        self.vote_message, self.vote_round = None, -1  # no vote this round unless aggregate runs
        return super().aggregate_fit(server_round, results, failures)

    def round_row(self, server_round: int, loss: float, accuracy: float) -> dict:
        row = super().round_row(server_round, loss, accuracy)
        row["full_downlinks"] = self.full_downlinks.get(server_round, 0)
        return row


class EFSignSGDStrategy(DeltaStrategy):
    """EF-SignSGD server: decode per-tensor scaled signs, example-weighted mean."""

    label = "EF-SignSGD"

    def __init__(self, cfg, **kwargs) -> None:  # noqa: ANN001, ANN003
        super().__init__(cfg, **kwargs)
        self.p_index, self.b_index, self.layout = parameter_split(self.model)
        self.param_sizes = [int(np.prod(s)) for s in self.layout.quantized_shapes]

    def decode_delta(self, server_round, cid, arrays, fit_res) -> np.ndarray:  # noqa: ANN001
        """A full-length update: decoded scaled signs for the parameters, and for the
        statistics the client's value minus the global one (so the mean update yields their
        weighted mean)."""
        expect_arrays(arrays, 3, self.label)
        params = decode_scaled_sign(arrays[0], arrays[1], self.param_sizes)
        buffers = np.asarray(arrays[2])
        if buffers.dtype != np.float16 or buffers.shape != (self.layout.num_extras,):
            raise ValueError(
                f"statistics must be float16 ({self.layout.num_extras},), got "
                f"{buffers.dtype} {buffers.shape}"
            )
        global_buffers = concat_flat([self.global_state[i] for i in self.b_index], np.float32)
        delta = join_state(
            self.layout,
            self.p_index,
            self.b_index,
            params,
            buffers.astype(np.float32) - global_buffers,
        )
        return concat_flat(delta, np.float32)
