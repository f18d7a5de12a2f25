"""Wire efficiency and local-training overhead of every method, in one run.

For each model: one round of each method on the same synthetic batch stream (one client), the
measured uplink/downlink bpp against the method's nominal bit-width, and the client's local
training time relative to FedAvg's on the same model and data (training overhead ratio), in wall
and in CPU seconds (CPU time is what the work costs on a box shared with other jobs).

    python benchmarks/methods_bench.py [--models digits-cnn-bn cnn4 resnet18] [--samples 256]
        [--device cpu|cuda] [--int8-mode auto|always|never]

``--device cuda`` times the same work on a GPU (``make gpu-check`` runs it on resnet18);
``--int8-mode never`` keeps LBI-FL on fake quantization there, for comparison with the
integer kernels that ``auto`` picks on CUDA (``compression.int8_matmul``).
"""

from __future__ import annotations

import argparse

from benchmarks.common import one_round
from compression.int8_matmul import MODES, set_int8_mode

# Nominal bits per parameter (uplink, downlink) at the defaults; None = adaptive.
NOMINAL = {
    "fedavg": (32, 32),
    "fedbif": (1, 4),
    "fedbat": (1, 32),
    "clipped-uq": (4, 32),
    "signsgd": (1, 32),
    "ef-signsgd": (1, 32),
    "fedpaq": (4, 32),
    "qsgd": (None, 32),
    "feddq": (None, 32),
    "dadaquant": (None, 32),
    "lbi-fl": (4, 4),
}


def ratio(measured: float, nominal: int | None) -> str:
    return "adaptive" if nominal is None else f"{measured / nominal - 1:+.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits-cnn-bn", "cnn4", "resnet18"])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=list(NOMINAL))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--int8-mode", default="auto", choices=MODES)
    args = parser.parse_args()
    # LBI-FL's client sets its own mode from the run config; other code follows the global one.
    set_int8_mode(args.int8_mode)
    int8 = {"lbi-int8-kernels": args.int8_mode}
    print(
        "| model | method | up bpp (vs nominal) | down bpp (vs nominal) | fit s | x FedAvg "
        "| fit CPU s | x FedAvg (CPU) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        # warm-up: first-call costs (and CUDA's start-up) out of the timings
        one_round("fedavg", model, samples=32, device=args.device)
        base = base_cpu = None
        for method in args.methods:
            extra = int8 if method == "lbi-fl" else {}
            measure = one_round(method, model, samples=args.samples, device=args.device, **extra)
            base = base or measure.fit_seconds
            base_cpu = base_cpu or measure.fit_cpu_seconds
            up, down = NOMINAL[method]
            print(
                f"| {model} | {method} | {measure.uplink_bpp:.3f} ({ratio(measure.uplink_bpp, up)})"
                f" | {measure.downlink_bpp:.3f} ({ratio(measure.downlink_bpp, down)}) | "
                f"{measure.fit_seconds:.2f} | {measure.fit_seconds / base:.2f} | "
                f"{measure.fit_cpu_seconds:.2f} | {measure.fit_cpu_seconds / base_cpu:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
