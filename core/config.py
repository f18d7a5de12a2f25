"""The run config: the common keys as typed fields, every validated key in ``values``.

``RunConfig`` is the ``Settings`` group of the keys every run has (``strategy``, ``seed``,
``learning-rate``, ...): ``cfg.learning_rate`` is the validated float of ``learning-rate``.
Method keys are validated here too but read through each method's own settings group
(``contracts``), built from ``cfg.values``.

The names a user may give ``strategy``, ``dataset``, ``model`` and ``partitioner`` live in
registries of the wiring layer above; that layer fills in their ``choices`` and resolves
``model = "auto"`` to the dataset's usual model (``fl_app.methods``), so this module imports
nothing above it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compression.downlink_codec import DOWNLINK_MODES, ENTROPY_MODES
from core.link import PROFILE_CHOICES
from core.run_identity import config_fingerprint
from core.settings import ConfigError, ConfigKey, Scalar, Settings, parse_values, setting

__all__ = ["ConfigError", "ConfigKey", "RunConfig", "parse_run_config", "with_choices"]

AGGREGATIONS = ("mean", "trimmed-mean", "median")
ATTACKS = (
    "none",
    "nonfinite",
    "huge",
    "wrong-dtype",
    "inflate-examples",
    "bad-metrics",
    "sign-flip",
    "scaled-update",
    "crash",
    "stall",
)
#: the value of a wire key that lets the method's capabilities decide (``fl_app.methods``).
AUTO = "auto"
#: What a key stands for in a run config written before the key existed, where that is not its
#: default: such a run ran without the stage the key now turns on (resume and the harness's
#: labels read old configs through it).
LEGACY_VALUES: dict[str, Scalar] = {
    "entropy": "none",
    "downlink-reference": "none",
    "uplink-reference": "none",
}
#: The common keys' values that no paper has (this project's defences and wire stages) set back
#: to what the papers do; every ``experiments/paper-*.toml`` sets them, together with each of its
#: methods' ``Settings.paper_literal`` (a test checks it), and the README's fidelity section
#: lists them with why they differ by default.
PAPER_LITERAL: dict[str, Scalar] = {
    "update-norm-bound": 0.0,  # no paper scales long updates down
    "update-norm-reject": 0.0,  # nor rejects them
    "entropy": "none",  # nominal wire widths, as the papers count bits
    "downlink-reference": "none",
    "uplink-reference": "none",
}
#: a run name is one path component: no separator, never "." or "..".
_PLAIN_NAME = re.compile(r"(?!\.\.?$)[A-Za-z0-9._=,+-]+")


@dataclass(frozen=True)
class RunConfig(Settings):
    """Validated run config; see the module docstring."""

    strategy: str = setting("fedbif", "method to run")
    dataset: str = setting("digits", "dataset name")
    model: str = setting("auto", "model name; auto: the dataset's usual model")
    partitioner: str = setting("dirichlet", "how data is split")
    dirichlet_alpha: float = setting(
        0.5, "Dirichlet concentration", min=0.0, min_inclusive=False, max=1e6
    )
    labels_per_client: int = setting(2, "classes per client (label-count)", min=1, max=10_000)
    dirichlet_min_size: int = setting(
        0, "Dirichlet: redraw until every client has this many samples", min=0, max=1_000_000
    )
    dirichlet_self_balancing: bool = setting(
        False, "Dirichlet: no more samples of a class for clients above the mean size"
    )
    data_files: str = setting("", "folder with local train.*/test.* files of a hub dataset")
    validation_fraction: float = setting(
        0.0,
        "share of the training data held out (seeded, stratified) to choose settings on; "
        "0 = none, below 0.5",
        min=0.0,
        max=0.5,
    )
    client_data_fraction: float = setting(
        1.0,
        "share of its partition each client trains on (a subset seeded by the run seed and the "
        "partition; for ablations sized for small machines, never for final tables); 1 = all",
        min=0.0,
        max=1.0,
        min_inclusive=False,
    )
    num_server_rounds: int = setting(20, "federated rounds", min=1, max=100_000)
    fraction_fit: float = setting(
        1.0, "share of clients sampled per round", min=0.0, max=1.0, min_inclusive=False
    )
    min_available_clients: int = setting(
        2, "clients to wait for before a round", min=1, max=100_000
    )
    local_epochs: int = setting(2, "local epochs per round", min=1, max=1_000)
    batch_size: int = setting(32, "local mini-batch size", min=1, max=1_000_000)
    learning_rate: float = setting(
        0.02,
        "client SGD learning rate (default chosen on validation: experiments/digits-tuned.toml)",
        min=0.0,
        min_inclusive=False,
        max=100.0,
    )
    momentum: float = setting(0.9, "client SGD momentum", min=0.0, max=1.0)
    weight_decay: float = setting(0.0, "client SGD weight decay", min=0.0, max=10.0)
    seed: int = setting(
        42, "seed for data split, init, sampling and training", min=0, max=2**63 - 1
    )
    device: str = setting("auto", "where to train and evaluate", choices=("auto", "cpu", "cuda"))
    torch_threads: int = setting(
        0,
        "CPU threads of torch's kernels in each client (torch.set_num_threads); a seed "
        "reproduces a CPU run exactly only at the same count; 0 = auto: the CPUs the run gives "
        "the client (client-resources-num-cpus under Ray, the node config's num-cpus, else 1 "
        "in-process and the machine's cores on a SuperNode)",
        min=0,
        max=4096,
    )
    server_torch_threads: int = setting(
        0,
        "CPU threads of torch in the server (evaluation, decoding); 0 = torch-threads when "
        "that is set, else 1 (the server shares the machine with client workers)",
        min=0,
        max=4096,
    )
    results_dir: str = setting("results", "folder for results (relative: to the launch dir)")
    run_name: str = setting(
        "",
        "results sub-folder; empty: derived from the config (strategy, dataset, model, "
        "partitioner, seed and a hash of every other key, so other settings never share it)",
    )
    overwrite: bool = setting(
        False,
        "replace the results in the run's folder even when another config (or federation "
        "size) wrote them; off: such a run is refused at start",
    )
    round_timeout: float = setting(
        0.0,
        "seconds to wait for clients per round (modelled seconds with a link-profile); "
        "0 = no limit",
        min=0.0,
        max=604_800.0,
    )
    min_fit_results: int = setting(
        1, "fewer valid client updates skip the round", min=1, max=100_000
    )
    link_profile: str = setting(
        "none",
        "modelled client links (core.link): round times on these links in rounds.csv; with a "
        "profile, round-timeout is the modelled deadline",
        choices=PROFILE_CHOICES,
    )
    link_up_mbps: float = setting(
        1.0, "link-profile=custom: median uplink Mbit/s", min=0.0, min_inclusive=False, max=1e6
    )
    link_down_mbps: float = setting(
        10.0, "link-profile=custom: median downlink Mbit/s", min=0.0, min_inclusive=False, max=1e6
    )
    link_rtt_ms: float = setting(
        50.0, "link-profile=custom: round-trip time in ms", min=0.0, max=60_000.0
    )
    link_spread: float = setting(
        0.5, "link-profile=custom: sigma of the clients' log-normal rate factor", min=0.0, max=3.0
    )
    link_wire_up: float = setting(
        1.0,
        "with a link-profile: bytes the deployment puts on the uplink per app byte (framing, "
        "Flower's own messages; benchmarks.link_validation measures it); 1 = the app's bytes",
        min=0.0,
        min_inclusive=False,
        max=100.0,
    )
    link_wire_down: float = setting(
        1.0,
        "with a link-profile: bytes on the downlink per app byte (as link-wire-up)",
        min=0.0,
        min_inclusive=False,
        max=100.0,
    )
    link_overhead_s: float = setting(
        0.0,
        "with a link-profile: seconds per client round the deployment adds beyond transfer and "
        "training (message handling, ClientApp start; measured unshaped); 0 = the link alone",
        min=0.0,
        max=3_600.0,
    )
    target_accuracy: float = setting(
        0.0,
        "accuracy whose first round summary.json reports (link_seconds_to_target); 0 = none",
        min=0.0,
        max=1.0,
    )
    aggregation: str = setting(
        "mean",
        "how client updates combine: weighted mean, coordinate-wise trimmed mean or median",
        choices=AGGREGATIONS,
    )
    trim_fraction: float = setting(
        0.1, "share of the round's updates trimmed from each end (trimmed-mean)", min=0.0, max=0.49
    )
    update_norm_bound: float = setting(
        3.0,
        "an update longer than this times the round's median norm is scaled down (0: off)",
        min=0.0,
        max=1e6,
    )
    update_norm_reject: float = setting(
        100.0,
        "an update longer than this times the round's lower median norm is rejected (0: off)",
        min=0.0,
        max=1e9,
    )
    max_examples: int = setting(
        0,
        "cap on a client's claimed example count (0: its partition's size where the server can "
        "compute it, else 10x the round's median claim)",
        min=0,
        max=2**31 - 1,
    )
    attack: str = setting("none", "simulated attack by some clients (evaluation)", choices=ATTACKS)
    attack_fraction: float = setting(
        0.1, "share of the partitions that attack, chosen by seed", min=0.0, max=1.0
    )
    attack_scale: float = setting(10.0, "factor of scaled-update attacks", min=0.0, max=1e6)
    attack_stall_seconds: float = setting(
        30.0,
        "how long a stall attack sleeps before answering (with round-timeout the stalled client "
        "becomes a failure; without, it holds the round this long, an hour at most)",
        min=0.0,
        max=3_600.0,
    )
    downlink: str = setting(
        "method",
        "what the server sends where a method sends the float32 model: method (its paper's "
        "choice), fp32, fp16 or uq (uniform-quantized codes, downlink-bits)",
        choices=DOWNLINK_MODES,
    )
    downlink_bits: int = setting(4, "bits per weight of downlink=uq", min=2, max=8)
    downlink_scale: str = setting(
        "channel",
        "scale groups of downlink=uq: per output channel or per tensor",
        choices=("channel", "tensor"),
    )
    downlink_rounding: str = setting(
        "nearest",
        "rounding of downlink=uq (stochastic: unbiased, seeded per round)",
        choices=("nearest", "stochastic"),
    )
    entropy: str = setting(
        AUTO,
        "lossless entropy stage for packed codes (downlink=uq codes; FedBiF, FedPAQ, QSGD, "
        "DAdaQuant, clipped UQ and LBI-FL messages): none, ans (adaptive ANS, model sent), or "
        "auto: ans wherever the method has codes it applies to, else none",
        choices=(*ENTROPY_MODES, AUTO),
    )
    downlink_reference: str = setting(
        AUTO,
        "last: code the downlink's codes as their difference from the codes the client kept "
        "from its last accepted round (lossless; needs entropy=ans; FedBiF's words and "
        "downlink=uq codes); auto: last wherever it applies, else none",
        choices=("none", "last", AUTO),
    )
    reference_memory_mb: float = setting(
        256.0,
        "most MB of codes the server keeps for downlink-reference=last; past it the oldest "
        "rounds go and their holders get full codes (the model is the same, only bytes "
        "change); 0 = no limit",
        min=0.0,
        max=1e6,
    )
    uplink_reference: str = setting(
        AUTO,
        "received: code the uplink's codes as their difference from the codes the client "
        "received that round (lossless; needs entropy=ans; FedBiF's activated bits, LBI-FL's "
        "weight codes; lbi-uplink-reference=true is the same for LBI-FL); auto: received "
        "wherever it applies, else none",
        choices=("none", "received", AUTO),
    )
    checkpoint: bool = setting(True, "write checkpoint.npz to the run folder every round")
    resume_from: str = setting("", "a run folder (or its checkpoint.npz) to continue from")
    #: every validated key, method keys included (method settings are built from it).
    values: Mapping[str, Scalar] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # The key's range is [0, 0.5): ``setting`` bounds are inclusive, so the top is here.
        if self.validation_fraction >= 0.5:
            raise ConfigError(
                f"validation-fraction must be below 0.5 (the clients keep the larger share of "
                f"the training data), got {self.validation_fraction}"
            )
        if self.run_name and not _PLAIN_NAME.fullmatch(self.run_name):
            raise ConfigError(
                f"run-name must be a plain folder name (letters, digits, '.', '_', '-', '=', "
                f"',', '+'; not '.' or '..'), got {self.run_name!r}: results stay inside "
                "results-dir"
            )

    def __getitem__(self, key: str) -> Scalar:
        return self.values[key]

    def as_dict(self) -> dict[str, Scalar]:
        return dict(self.values)

    @property
    def results_name(self) -> str:
        """The results sub-folder: the user's ``run-name``, or one derived from the config."""
        if self.run_name:
            return self.run_name
        return (
            f"{self.strategy}-{self.dataset}-{self.model}-{self.partitioner}-seed{self.seed}-"
            f"{config_fingerprint(self.values)}"
        )

    def run_dir(self, base: Path | None = None) -> Path:
        """Absolute results folder: the ServerApp runs from Flower's app cache, not the project,
        so a relative ``results-dir`` is resolved against ``base`` (default: the working dir)."""
        root = Path(self.results_dir).expanduser()
        if not root.is_absolute():
            root = (base or Path.cwd()) / root
        return root.resolve() / self.results_name


def with_choices(keys: Iterable[ConfigKey], choices: Mapping[str, Iterable[Scalar]]) -> list:
    """``keys`` with the allowed values of the named ones filled in (registry names)."""
    return [
        dataclasses.replace(key, choices=tuple(choices[key.name])) if key.name in choices else key
        for key in keys
    ]


def parse_run_config(raw: Mapping[str, Any], keys: Iterable[ConfigKey]) -> RunConfig:
    """Validate ``raw`` against ``keys`` (see ``core.settings.parse_values``)."""
    values = parse_values(raw, list(keys))
    return RunConfig.from_values(values, values=values)
