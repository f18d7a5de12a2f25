"""FedBAT client: learns a binarized update of every Conv2d/Linear weight during local training.

Each round every Conv2d/Linear weight w_l stays frozen at the received global value and a
trainable update u_l starts at zero; the forward pass uses w_l + u_l. Of the T local steps, the
first ``warmup_steps(T, phi)`` = floor(phi * T) (the authors' code; ``fedbat-warmup-rounding =
ceil`` gives ceil(phi * T)) train u_l in full precision. At that step the client fixes
a0_l = mean|u_l| and from then on the forward pass uses

    w_l + B(u_l, a_l),   a_l = clamp(a0_l * exp(rho * a_e_l), a_min, a_max),

with the stochastic binarizer B of ``compression.binarize`` (fresh noise every step) and a_e_l a
learnable scalar starting at 0. Updates and a_e use SGD at ``fedbat-lr`` (with the run's momentum,
no weight decay: decay on an update would pull it towards the old model, not towards zero);
biases and BatchNorm parameters train as usual at ``learning-rate``.

After training the client binarizes u_l once more with a seeded draw, keeps the result as
``self.binarized`` (what the server will rebuild, bit for bit), and sends the bits, the float32
a_l and the extras (``compression.fedbat_codec``). Nothing persists between rounds.
Contract: ``contracts.fedbat``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from flwr.common import NDArrays, Scalar
from torch import nn

from clients.base import TrainingClient
from compression.binarize import (
    binarize_to_codes,
    codes_to_values,
    learnable_step,
    stochastic_binarize,
    uniform_noise,
)
from compression.fedbat_codec import UplinkMessage
from compression.layout import concat_flat
from contracts import fedbat
from contracts.fedbat import FedBATSettings
from contracts.messages import ROUND
from core.seeding import torch_generator
from core.wire_state import quantized_split, set_wire_state, wire_keys

UPLINK_TAG = 0xBA7  # separates the uplink draw's seed from the training seed


def warmup_steps(total_steps: int, phi: float, rounding: str = "floor") -> int:
    """Number of full-precision steps (steps 0 .. n - 1 skip the binarizer): floor(phi * T), as
    the authors' code binarizes once ``iter > phi * T``, or ceil(phi * T). The 1e-9 keeps a
    product like 0.3 * 10 = 3.0000000000000004 on its integer."""
    if rounding == "floor":
        return min(total_steps, math.floor(phi * total_steps + 1e-9))
    if rounding == "ceil":
        return min(total_steps, math.ceil(phi * total_steps - 1e-9))
    raise ValueError(f"rounding must be 'floor' or 'ceil', got {rounding!r}")


class FedBATClient(TrainingClient):
    """Binarization-aware local training; see the module docstring."""

    settings: FedBATSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.b_index, self.e_index, self.split = quantized_split(self.model)
        keys = wire_keys(self.model)
        self.b_keys = [keys[i] for i in self.b_index]
        self.e_keys = [keys[i] for i in self.e_index]
        self.up = fedbat.uplink_codec(self.settings, self.model)
        self.rho = self.settings.rho
        self.phi = self.settings.warmup
        self.alpha_min = self.settings.alpha_min
        self.alpha_max = self.settings.alpha_max
        self.base: list[torch.Tensor] = []
        self.updates: list[nn.Parameter] = []
        self.alpha_e: list[nn.Parameter] = []
        self.alpha0: list[float] | None = None
        self.switch_step: int | None = None  # the step at which binarization started
        self.binarized: list[torch.Tensor] = []
        self.sent_alphas: list[float] = []
        #: 1 unless a simulated attacker reverses (< 0) or scales the binarized update.
        self.uplink_factor = 1.0

    # ----------------------------------------------------------------- downlink
    def load_downlink(self, arrays: NDArrays, config: dict[str, Scalar]) -> None:
        set_wire_state(self.model, arrays)
        state = self.model.state_dict()
        self.base = [state[key].detach().clone() for key in self.b_keys]
        self.updates = [nn.Parameter(torch.zeros_like(w)) for w in self.base]
        self.alpha_e = [nn.Parameter(torch.zeros((), device=self.device)) for _ in self.base]
        self.alpha0, self.switch_step = None, None
        for name, parameter in self.model.named_parameters():
            if name in self.b_keys:
                parameter.requires_grad_(False)  # frozen: only the update is trained

    # ----------------------------------------------------------------- training
    def make_optimizer(self) -> torch.optim.Optimizer:
        b_names = set(self.b_keys)
        others = [p for name, p in self.model.named_parameters() if name not in b_names]
        return torch.optim.SGD(
            [
                {
                    "params": [*self.updates, *self.alpha_e],
                    "lr": self.settings.lr,
                    "weight_decay": 0.0,
                },
                {
                    "params": others,
                    "lr": self.cfg.learning_rate,
                    "weight_decay": self.cfg.weight_decay,
                },
            ],
            momentum=self.cfg.momentum,
        )

    def start_binarization(self, step: int) -> None:
        """End of warm-up: fix a0 = mean|u| per layer (the clamp keeps a0 = 0 usable)."""
        self.alpha0 = [float(u.detach().abs().mean()) for u in self.updates]
        self.switch_step = step

    def step_sizes(self) -> list[torch.Tensor]:
        """The current a_l (differentiable in a_e_l)."""
        if self.alpha0 is None:
            raise RuntimeError("step sizes exist only after the warm-up")
        return [
            learnable_step(a0, a_e, self.rho, self.alpha_min, self.alpha_max)
            for a0, a_e in zip(self.alpha0, self.alpha_e, strict=True)
        ]

    def current_weights(self, binarize: bool) -> dict[str, torch.Tensor]:
        """w + u (warm-up) or w + B(u, a) with fresh noise (after it)."""
        if not binarize:
            return {
                key: w + u for key, w, u in zip(self.b_keys, self.base, self.updates, strict=True)
            }
        return {
            key: w + stochastic_binarize(u, alpha)
            for key, w, u, alpha in zip(
                self.b_keys, self.base, self.updates, self.step_sizes(), strict=True
            )
        }

    def weight_overrides(self, step: int, total_steps: int) -> dict[str, torch.Tensor] | None:
        """w + u during warm-up, w + B(u, a) after it (the switch: ``warmup_steps``)."""
        binarize = step >= warmup_steps(total_steps, self.phi, self.settings.warmup_rounding)
        if binarize and self.alpha0 is None:
            self.start_binarization(step)
        return self.current_weights(binarize)

    # ----------------------------------------------------------------- uplink
    def final_binarization(self, server_round: int) -> tuple[np.ndarray, np.ndarray]:
        """Bits (d,) and float32 alphas (L,) of the trained updates; sets ``self.binarized``."""
        if self.alpha0 is None:  # phi = 1: no binarized step ran, a0 from the final update
            self.start_binarization(-1)
        generator = torch_generator(self.cfg.seed, self.partition_id, server_round, UPLINK_TAG)
        bits, alphas, self.binarized = [], [], []
        with torch.no_grad():
            for update, alpha in zip(self.updates, self.step_sizes(), strict=True):
                alpha32 = alpha.detach().to(torch.float32)
                codes = binarize_to_codes(update, alpha32, uniform_noise(update, generator))
                if self.uplink_factor != 1.0:  # simulated attack (``poison``)
                    alpha32 = alpha32 * abs(self.uplink_factor)
                    codes = 1 - codes if self.uplink_factor < 0 else codes
                self.binarized.append(codes_to_values(codes, alpha32))
                bits.append(codes.reshape(-1).cpu().numpy())
                alphas.append(float(alpha32))
        self.sent_alphas = alphas
        flat_bits = np.concatenate(bits) if bits else np.zeros(0, dtype=np.uint8)
        return flat_bits, np.asarray(alphas, dtype=np.float32)

    def poison(self, received: NDArrays, factor: float) -> None:
        """Extras as the base class; the binarized update is reversed or scaled as it is
        encoded (bits flipped for a negative factor, step sizes times |factor|)."""
        super().poison(received, factor)
        self.uplink_factor = factor

    def encode_uplink(self, config: dict[str, Scalar]) -> NDArrays:
        bits, alphas = self.final_binarization(int(config.get(ROUND, 0)))
        state = self.model.state_dict()
        with torch.no_grad():  # the module now holds what the server will rebuild
            for key, w, delta in zip(self.b_keys, self.base, self.binarized, strict=True):
                state[key].copy_(w + delta)
        extras = concat_flat(
            [state[key].detach().cpu().numpy() for key in self.e_keys],
            self.settings.extras_dtype,
        )
        return self.up.encode(UplinkMessage(bits, alphas, extras))
