"""FedBiF wire efficiency: measured bytes of one round's downlink and uplink, with a breakdown.

Runs the real strategy and client code for one round on synthetic data of the model's input shape
(``benchmarks.common.one_round``) and reports measured bpp against the nominal m (down) and
s (up), the bytes of each array, and the client's VBI state size (what 1,000 clients would hold).

    python -m benchmarks.fedbif_wire [--models digits-cnn-bn cnn4 resnet18]
"""

from __future__ import annotations

import argparse
import io

import numpy as np

from benchmarks.common import RoundMeasure, one_round


def npy_header(array: np.ndarray) -> int:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return len(buffer.getvalue()) - array.nbytes


def breakdown(arrays: list[np.ndarray], names: list[str]) -> str:
    parts = [f"{name} {a.nbytes:,} B" for name, a in zip(names, arrays, strict=True)]
    return ", ".join(parts) + f", headers {sum(npy_header(a) for a in arrays)} B"


def report(measure: RoundMeasure, bits: int = 4, active: int = 1) -> None:
    print(f"\n{measure.model}: {measure.num_scalars:,} scalars")
    print(
        f"  down {measure.downlink_bytes:,} B = {measure.downlink_bpp:.4f} bpp (nominal {bits}, "
        f"{measure.downlink_bpp / bits - 1:+.2%}): "
        f"{breakdown(measure.downlink, ['codes', 'steps', 'extras'])}"
    )
    print(
        f"  up   {measure.uplink_bytes:,} B = {measure.uplink_bpp:.4f} bpp (nominal {active}, "
        f"{measure.uplink_bpp / active - 1:+.2%}): "
        f"{breakdown(measure.uplink, ['codes', 'extras'])}"
    )
    print(
        f"  VBI state per client: {measure.client_state_bytes:,} B; 1,000 clients: "
        f"{measure.client_state_bytes * 1e3 / 2**30:.2f} GiB; fit {measure.fit_seconds:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits-cnn-bn", "cnn4", "resnet18"])
    args = parser.parse_args()
    for name in args.models:
        report(one_round("fedbif", name, samples=64))


if __name__ == "__main__":
    main()
