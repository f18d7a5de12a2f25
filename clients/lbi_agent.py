"""The LBI-FL bit-width agent at run time (paper Section 4.3): state, actions, Q-network, file.

Pure torch/NumPy (no Flower): the client imports it to take decisions, and the training command
``tools.lbi_agent.train`` imports it to learn the Q-network.

State (``STATE_SIZE`` = 10 floats, in this order; ``STATE_SPEC`` names them):

====  ==========================  ===========================================================
idx   name                        value
====  ==========================  ===========================================================
0     ``time``                    training progress t = epoch (or round) / total, in [0, 1]
1-3   ``bits-{w,a,g}``            current bit-width / 8 (INT4 0.5, INT6 0.75, INT8 1.0; FP32 4.0)
4-6   ``loss-{w,a,g}``            Eq. 5 quantization loss of the last training period, as is
7-9   ``changed-{w,a,g}``         time step t of the kind's last raise, -1 if never raised
====  ==========================  ===========================================================

Widths are divided by 8 so the largest width the agent can choose maps to 1, the scale of the
other features. Eq. 5 losses enter unscaled: they are already relative errors (dimensionless),
which is what lets the agent move between models and datasets (Section 4.3 excludes features tied
to a model or dataset). ``w, a, g`` follow ``compression.lowbit.KINDS``.

Actions: ``ACTIONS`` = keep, or raise the weight / activation / gradient width by 2. Widths start
at INT4 and never go down; a raise that would pass 8 bits is invalid (``valid_actions``), and the
agent only ever picks among valid actions.

Network: ``QNetwork`` (10 -> 128 -> ReLU -> 4, 1,924 parameters: the paper's "1.92K"); the
client only runs it greedily (``BitWidthAgent.act``). How it is learned (reward of Eqs. 6-8,
behaviour cloning of Eq. 9, DQN) is the tools layer's: ``tools.lbi_agent``.

The agent is stored as JSON (``BitWidthAgent.save``), because a Flower app bundle only carries
``*.py``, ``*.toml``, ``*.md`` and ``*.json`` files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compression import lowbit
from compression.lowbit import KINDS, BitWidths

STATE_SIZE = 10
HIDDEN_SIZE = 128
ACTIONS: tuple[str, ...] = ("keep", "raise-weight", "raise-activation", "raise-gradient")
NUM_ACTIONS = len(ACTIONS)
#: bits added by a raise and the largest width the agent may reach (INT4 -> INT6 -> INT8).
BIT_STEP = 2
MAX_BITS = 8
#: widths are divided by this in the state (INT8 -> 1.0).
BITS_SCALE = 8.0
#: value of a "last changed" feature for a kind that was never raised.
NEVER_CHANGED = -1.0
_SHORT = {"weight": "w", "activation": "a", "gradient": "g"}
STATE_SPEC: tuple[str, ...] = (
    "time",
    *(f"bits-{_SHORT[k]}" for k in KINDS),
    *(f"loss-{_SHORT[k]}" for k in KINDS),
    *(f"changed-{_SHORT[k]}" for k in KINDS),
)
FORMAT_NAME = "lbi-fl-bit-width-agent"
FORMAT_VERSION = 1
DEFAULT_AGENT_PATH = Path(__file__).with_name("lbi_agent.json")


# --------------------------------------------------------------------------- state and actions
def build_state(
    time_step: float,
    widths: BitWidths,
    losses: Mapping[str, float],
    last_change: Mapping[str, float],
) -> np.ndarray:
    """The 10-float state of the module docstring's table (float32).

    ``losses`` and ``last_change`` are keyed by ``KINDS``; a missing loss (e.g. a kind at FP32
    that recorded nothing) counts as 0, a missing change time as never changed.
    """
    state = [float(time_step)]
    state += [widths.get(kind) / BITS_SCALE for kind in KINDS]
    state += [float(losses.get(kind, 0.0)) for kind in KINDS]
    state += [float(last_change.get(kind, NEVER_CHANGED)) for kind in KINDS]
    return np.asarray(state, dtype=np.float32)


def action_kind(action: int) -> str | None:
    """The tensor kind an action raises; None for keep."""
    _check_action_index(action)
    return None if action == 0 else KINDS[action - 1]


def _check_action_index(action: int) -> None:
    if isinstance(action, bool) or not isinstance(action, int | np.integer):
        raise ValueError(f"action must be an integer index into ACTIONS, got {action!r}")
    if not 0 <= int(action) < NUM_ACTIONS:
        raise ValueError(f"action must be in 0..{NUM_ACTIONS - 1} ({ACTIONS}), got {action}")


def valid_actions(widths: BitWidths) -> np.ndarray:
    """Boolean mask over ``ACTIONS``: keep always; raising a kind only while it stays <= 8 bits.

    FP32 (32 bits) counts as above 8, so a full-precision kind is never "raised".
    """
    mask = np.ones(NUM_ACTIONS, dtype=bool)
    for index, kind in enumerate(KINDS, start=1):
        mask[index] = widths.get(kind) + BIT_STEP <= MAX_BITS
    return mask


def apply_action(widths: BitWidths, action: int) -> BitWidths:
    """Widths after ``action``; ValueError for an unknown or invalid (masked) action."""
    kind = action_kind(action)
    if not valid_actions(widths)[int(action)]:
        raise ValueError(
            f"action {ACTIONS[int(action)]!r} is invalid at widths {widths}: "
            f"a width may not exceed {MAX_BITS} bits"
        )
    if kind is None:
        return widths
    return widths.replace(kind, widths.get(kind) + BIT_STEP)


# --------------------------------------------------------------------------- networks
class QNetwork(nn.Module):
    """One hidden layer of 128 (Section 4.3): small enough that a decision costs nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(STATE_SIZE, HIDDEN_SIZE), nn.ReLU(), nn.Linear(HIDDEN_SIZE, NUM_ACTIONS)
        )

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.net(states)


def masked_argmax(q_values: np.ndarray, mask: np.ndarray) -> int:
    """Index of the largest Q-value among the valid actions (ties: the lowest index, so keep
    wins a tie and the agent never raises without a reason)."""
    masked = np.where(mask, q_values, -np.inf)
    return int(np.argmax(masked))


class BitWidthAgent:
    """A Q-network plus the metadata saved with it; picks actions among the valid ones."""

    def __init__(self, q_net: QNetwork | None = None, metadata: dict[str, Any] | None = None):
        self.q_net = q_net if q_net is not None else QNetwork()
        self.q_net.eval()
        self.metadata: dict[str, Any] = dict(metadata or {})

    @torch.no_grad()
    def q_values(self, state: np.ndarray) -> np.ndarray:
        """Q-values of every action at ``state`` (shape (4,))."""
        tensor = torch.as_tensor(np.asarray(state, dtype=np.float32)).reshape(1, STATE_SIZE)
        return self.q_net(tensor)[0].numpy().astype(np.float64)

    def act(
        self,
        state: np.ndarray,
        widths: BitWidths,
        epsilon: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> int:
        """Greedy valid action; with probability ``epsilon`` a uniform draw among valid actions.

        ``rng`` drives the exploration (a fresh unseeded generator if omitted and needed).
        """
        mask = valid_actions(widths)
        if epsilon > 0.0:
            rng = rng if rng is not None else np.random.default_rng()
            if rng.random() < epsilon:
                return int(rng.choice(np.flatnonzero(mask)))
        return masked_argmax(self.q_values(state), mask)

    # ----------------------------------------------------------------- persistence
    def to_json(self) -> dict[str, Any]:
        """Weights as nested lists (float32 values written exactly) plus the format header."""
        weights = {
            name: tensor.detach().cpu().to(torch.float32).tolist()
            for name, tensor in self.q_net.state_dict().items()
        }
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "state_size": STATE_SIZE,
            "state_spec": list(STATE_SPEC),
            "actions": list(ACTIONS),
            "hidden_size": HIDDEN_SIZE,
            "metadata": self.metadata,
            "weights": weights,
        }

    def save(self, path: str | Path) -> None:
        """Write the agent as JSON (Flower app bundles ship *.json, not *.pt)."""
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> BitWidthAgent:
        """Rebuild an agent; refuses files of another format or with another state/action layout,
        since a Q-network read against the wrong layout would act on garbage silently."""
        if payload.get("format") != FORMAT_NAME or payload.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"not a {FORMAT_NAME} v{FORMAT_VERSION} file "
                f"(format={payload.get('format')!r}, version={payload.get('version')!r})"
            )
        if list(payload.get("state_spec", [])) != list(STATE_SPEC):
            raise ValueError(f"state layout {payload.get('state_spec')} != {list(STATE_SPEC)}")
        if list(payload.get("actions", [])) != list(ACTIONS):
            raise ValueError(f"actions {payload.get('actions')} != {list(ACTIONS)}")
        q_net = QNetwork()
        expected = q_net.state_dict()
        weights = payload["weights"]
        if set(weights) != set(expected):
            raise ValueError(f"weights {sorted(weights)} != {sorted(expected)}")
        state = {}
        for name, reference in expected.items():
            tensor = torch.tensor(weights[name], dtype=torch.float32)
            if tensor.shape != reference.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(reference.shape)}")
            state[name] = tensor
        q_net.load_state_dict(state)
        return cls(q_net, dict(payload.get("metadata", {})))

    @classmethod
    def load(cls, path: str | Path) -> BitWidthAgent:
        """Read an agent written by ``save``."""
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def lowbit_code_hash() -> str:
    """SHA-256 of ``compression/lowbit.py``, the low-bit training an agent learned its schedule
    on (its quantizers, Eq. 5 losses and widths); recorded in an agent's metadata when trained."""
    return hashlib.sha256(Path(lowbit.__file__).read_bytes()).hexdigest()


def provenance_problem(agent: BitWidthAgent) -> str | None:
    """Why ``agent`` was not trained on the low-bit code it now runs with, or ``None``.

    An agent's Q-values encode what raising a width did to the Eq. 5 losses and accuracy under
    the quantizers of its training: a changed ``lowbit.py`` makes them describe other code.
    """
    recorded = agent.metadata.get("lowbit_sha256")
    if not recorded:
        return "it records no lowbit_sha256"
    current = lowbit_code_hash()
    if recorded != current:
        return (
            f"it was trained on compression/lowbit.py {str(recorded)[:8]}, this code is "
            f"{current[:8]}: retrain it (README, LBI-FL agent)"
        )
    return None


def load_default_agent() -> BitWidthAgent:
    """The agent shipped next to this module (``clients/lbi_agent.json``)."""
    return BitWidthAgent.load(DEFAULT_AGENT_PATH)


__all__ = [
    "ACTIONS",
    "DEFAULT_AGENT_PATH",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "NUM_ACTIONS",
    "STATE_SIZE",
    "STATE_SPEC",
    "BitWidthAgent",
    "QNetwork",
    "action_kind",
    "apply_action",
    "build_state",
    "load_default_agent",
    "lowbit_code_hash",
    "provenance_problem",
    "masked_argmax",
    "valid_actions",
]
