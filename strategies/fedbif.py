"""FedBiF (Federated Bits Freezing): m-bit quantized downlink, s activated bits per weight uplink.

Each round the server quantizes every Conv2d/Linear weight of its float global model to m bits
(Eq. 5: alpha_l = max|theta_l| / 2^(m-1), stochastic rounding of Eq. 1-2), picks the bits clients
may train (the same pattern for all clients of the round), and after training rebuilds each
client's integer weights from its activated bits plus the frozen bits it sent, then averages
(Eq. 6; uniform as in the paper, or example-weighted).

Biases and BatchNorm tensors (parameters and running statistics) are not quantized: they are
trained normally and travel as one float16 (default) or float32 vector both ways, and their bytes
count in the measured bpp. Wire format: ``compression.fedbif_codec``.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.common import FitRes, Scalar, parameters_to_ndarrays

from compression.bits import LAYOUTS, BitLayout
from compression.fedbif_codec import EXTRAS_DTYPES, decode_uplink, encode_downlink, spread_codes
from compression.layout import concat_flat, split_flat
from compression.quantization import max_abs_step, quantize
from fl_app.config import ConfigKey, RunConfig
from fl_app.torch_utils import quantized_split
from strategies.base import ClientUpdate, CommunicationStrategy, PayloadError

SELECTORS = ("sequential", "fixed", "random")

CONFIG_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("fedbif-bits", int, 4, "m: bits per quantized weight (downlink)", min=2, max=8),
    ConfigKey(
        "fedbif-active-bits", int, 1, "s: bits clients train and send per weight", min=1, max=8
    ),
    ConfigKey(
        "fedbif-selector",
        str,
        "sequential",
        "which bits are activated each round",
        choices=SELECTORS,
    ),
    ConfigKey(
        "fedbif-fixed-bit",
        int,
        2,
        "highest activated bit (0 = LSB) for selector=fixed",
        min=0,
        max=7,
    ),
    ConfigKey("fedbif-vbi", bool, True, "virtual bits inheritance across a client's rounds"),
    ConfigKey("fedbif-sign-bit", bool, False, "ablation: sign bit + (m-1) magnitude bits"),
    ConfigKey(
        "fedbif-weighting",
        str,
        "uniform",
        "aggregation weights (Eq. 6 is uniform)",
        choices=("uniform", "examples"),
    ),
    ConfigKey(
        "fedbif-rounding",
        str,
        "stochastic",
        "server quantizer rounding (Eq. 2)",
        choices=("stochastic", "deterministic"),
    ),
    ConfigKey(
        "fedbif-extras-dtype",
        str,
        "float16",
        "dtype of biases/BatchNorm on the wire",
        choices=EXTRAS_DTYPES,
    ),
    ConfigKey(
        "fedbif-lr", float, 0.1, "learning rate of the virtual bits", min=0.0, min_inclusive=False
    ),
    ConfigKey(
        "fedbif-ste",
        str,
        "identity",
        "virtual-bit gradient: identity (dw/dv = 1) or chain",
        choices=("identity", "chain"),
    ),
)


def bit_layout(cfg: RunConfig) -> BitLayout:
    """The integer layout of the run (offset, or sign-magnitude for the ablation)."""
    kind = LAYOUTS[1] if bool(cfg["fedbif-sign-bit"]) else LAYOUTS[0]
    return BitLayout(int(cfg["fedbif-bits"]), kind)


def select_active_bits(
    selector: str, server_round: int, bits: int, active: int, fixed_bit: int, seed: int
) -> tuple[int, ...]:
    """Activated bit positions (ascending; 0 = LSB) of a round, shared by all its clients.

    ``sequential`` walks the bits from the MSB down in non-overlapping windows of ``active``
    bits, so every bit is trained once within m / s rounds; ``fixed`` always trains the window
    whose highest bit is ``fixed_bit``; ``random`` draws ``active`` distinct bits per (seed, round).
    """
    if not 1 <= active <= bits:
        raise ValueError(f"fedbif-active-bits must be in 1..{bits}, got {active}")
    if selector == "sequential":
        if bits % active:
            raise ValueError(
                f"selector 'sequential' needs fedbif-bits ({bits}) divisible by "
                f"fedbif-active-bits ({active})"
            )
        window = (server_round - 1) % (bits // active)
        top = bits - 1 - window * active
        return tuple(range(top - active + 1, top + 1))
    if selector == "fixed":
        if not active - 1 <= fixed_bit < bits:
            raise ValueError(
                f"fedbif-fixed-bit must be in {active - 1}..{bits - 1}, got {fixed_bit}"
            )
        return tuple(range(fixed_bit - active + 1, fixed_bit + 1))
    if selector == "random":
        rng = np.random.default_rng([seed, server_round, 0xB1F])
        return tuple(sorted(int(b) for b in rng.choice(bits, size=active, replace=False)))
    raise ValueError(f"fedbif-selector must be one of {SELECTORS}, got {selector!r}")


def positions_to_mask(positions: tuple[int, ...]) -> int:
    return sum(1 << p for p in positions)


def mask_to_positions(mask: int, bits: int) -> tuple[int, ...]:
    return tuple(p for p in range(bits) if mask >> p & 1)


class FedBiFStrategy(CommunicationStrategy):
    """Server side of FedBiF; see the module docstring."""

    extra_columns = ("sparsity", "active_bits")

    def __init__(self, cfg: RunConfig, **kwargs) -> None:  # noqa: ANN003
        super().__init__(cfg, **kwargs)
        self.layout = bit_layout(cfg)
        self.active = int(cfg["fedbif-active-bits"])
        self.q_index, self.e_index, self.split = quantized_split(self.model)
        self.extras_dtype = str(cfg["fedbif-extras-dtype"])
        # Fail at start, not in round 1, on an impossible selector setting.
        select_active_bits(
            str(cfg["fedbif-selector"]),
            1,
            self.layout.bits,
            self.active,
            int(cfg["fedbif-fixed-bit"]),
            cfg.seed,
        )
        self._round: int | None = None
        self._words = np.zeros(0, dtype=np.uint8)
        self._steps = np.zeros(0, dtype=np.float32)
        self._positions: tuple[int, ...] = ()
        self._downlink: list[np.ndarray] = []
        self.round_metrics: dict[int, dict[str, float]] = {}

    # --------------------------------------------------------------- per-round quantization
    def _prepare_round(self, server_round: int) -> None:
        """Quantize the global model once per round; every client gets the same message."""
        if self._round == server_round:
            return
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + server_round)
        stochastic = self.cfg["fedbif-rounding"] == "stochastic"
        words, steps, zeros = [], [], 0
        for index in self.q_index:
            weights = torch.from_numpy(self.global_state[index])
            step = max_abs_step(weights, self.layout.scale_levels)
            codes = quantize(
                weights,
                step,
                self.layout.low,
                self.layout.high,
                stochastic=stochastic,
                generator=generator,
            )
            zeros += int((codes == 0).sum())
            words.append(self.layout.to_unsigned(codes).numpy().reshape(-1))
            steps.append(step)
        self._words = np.concatenate(words) if words else np.zeros(0, dtype=np.uint8)
        self._steps = np.asarray(steps, dtype=np.float32)
        self._positions = select_active_bits(
            str(self.cfg["fedbif-selector"]),
            server_round,
            self.layout.bits,
            self.active,
            int(self.cfg["fedbif-fixed-bit"]),
            self.cfg.seed,
        )
        extras = concat_flat([self.global_state[i] for i in self.e_index], self.extras_dtype)
        self._downlink = encode_downlink(self._words, self._steps, extras, self.layout.bits)
        self._round = server_round
        self.round_metrics[server_round] = {
            "sparsity": zeros / max(self.split.num_quantized, 1),
            "active_bits": float(positions_to_mask(self._positions)),
        }

    def downlink_arrays(self, server_round: int, cid: str) -> list[np.ndarray]:
        self._prepare_round(server_round)
        return self._downlink

    def fit_config(self, server_round: int, cid: str) -> dict[str, Scalar]:
        self._prepare_round(server_round)
        return {"fedbif-active-mask": positions_to_mask(self._positions)}

    # --------------------------------------------------------------- uplink and aggregation
    def decode_uplink(self, server_round: int, cid: str, fit_res: FitRes) -> ClientUpdate:
        try:
            arrays = parameters_to_ndarrays(fit_res.parameters)
            codes, extras = decode_uplink(arrays, self.split, self.active)
        except Exception as err:  # garbage bytes, wrong sizes, dtypes or values
            raise PayloadError(f"FedBiF uplink: {err}") from None
        return ClientUpdate.of(cid, fit_res, [codes, extras])

    def client_weights(self, updates: list[ClientUpdate]) -> np.ndarray:
        if self.cfg["fedbif-weighting"] == "examples":
            raw = np.array([u.num_examples for u in updates], dtype=np.float64)
        else:
            raw = np.ones(len(updates), dtype=np.float64)
        return raw / raw.sum()

    def recover_integers(self, codes: np.ndarray) -> np.ndarray:
        """A client's signed integer weights: its activated bits over the frozen bits sent."""
        frozen = self._words & np.uint8(0xFF ^ positions_to_mask(self._positions))
        words = frozen | spread_codes(codes, self._positions)
        return self.layout.to_signed(torch.from_numpy(words)).numpy()

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        weights = self.client_weights(updates)
        mean_integer = np.zeros(self.split.num_quantized, dtype=np.float64)
        mean_extras = np.zeros(self.split.num_extras, dtype=np.float64)
        for weight, update in zip(weights, updates, strict=True):
            codes, extras = update.arrays
            mean_integer += weight * self.recover_integers(codes)
            mean_extras += weight * extras
        step_per_scalar = np.repeat(self._steps.astype(np.float64), self.split.quantized_sizes)
        quantized = (mean_integer * step_per_scalar).astype(np.float32)
        new_state = [array.copy() for array in self.global_state]
        for index, piece in zip(
            self.q_index, _split(quantized, self.split.quantized_shapes), strict=True
        ):
            new_state[index] = piece
        for index, piece in zip(
            self.e_index,
            _split(mean_extras.astype(np.float32), self.split.extra_shapes),
            strict=True,
        ):
            new_state[index] = piece
        return new_state

    def round_row(self, server_round: int, loss: float, accuracy: float) -> dict:
        row = super().round_row(server_round, loss, accuracy)
        row.update(
            self.round_metrics.get(server_round, {"sparsity": float("nan"), "active_bits": 0.0})
        )
        return row


def _split(flat: np.ndarray, shapes: tuple[tuple[int, ...], ...]) -> list[np.ndarray]:
    return [piece.copy() for piece in split_flat(flat, shapes)]
