"""Entries every client and strategy exchange, whatever the method.

Fit config (server -> client): ``ROUND``, the round number of the message (a resumed run keeps
counting from its checkpoint). Fit metrics (client -> server): ``PARTITION_ID`` (orders updates
so sums do not depend on arrival order), ``TRAIN_LOSS`` (mean batch loss of the round) and
``TRAIN_SECONDS`` (the client's own training time), ``TORCH_THREADS`` (the CPU threads it
trained with; ``summary.json`` reports them).
"""

from __future__ import annotations

ROUND = "server-round"
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
TORCH_THREADS = "torch-threads"
