"""Server side of reference coding (``downlink-reference=last``, ``compression.reference``).

The server may code a client's downlink against codes the client kept only if it knows the
client holds them. It learns that from accepted replies: a client whose update was accepted in
round r received round r's message. A client that was sent a message but gave no accepted reply
(failed, late, rejected) may or may not have kept it, so it is forgotten and gets full codes
next time. Forgetting is always safe, which is also why nothing here is checkpointed: a resumed
run starts with full messages.

Memory: the book keeps one code array per round some client still holds, which under partial
participation is many rounds (resnet18, 100 clients, 10 a round: ~30 arrays of 11 M codes).
Past ``limit_bytes`` it drops the oldest rounds first; their holders get full codes next time,
exactly as a client the server forgot. The model never changes, only the bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from compression.reference import Basis


class ReferenceBook:
    """Which round's codes each client holds, and the codes of every such round (at most
    ``limit_bytes`` of them; 0: no limit)."""

    def __init__(self, limit_bytes: int = 0) -> None:
        self.held_round: dict[str, int] = {}
        self.codes_of_round: dict[int, np.ndarray] = {}
        self.limit_bytes = limit_bytes
        #: rounds dropped for the limit (their holders were sent full codes).
        self.dropped_rounds = 0

    @property
    def nbytes(self) -> int:
        return sum(codes.nbytes for codes in self.codes_of_round.values())

    def basis_for(self, cid: str) -> Basis | None:
        """The codes ``cid`` holds, or None (send it full codes)."""
        held = self.held_round.get(cid)
        if held is None or held not in self.codes_of_round:
            return None
        return Basis(held, self.codes_of_round[held])

    def end_round(
        self,
        server_round: int,
        sent: Iterable[str],
        accepted: set[str],
        codes: Callable[[], np.ndarray],
    ) -> None:
        """Note who holds ``server_round``'s codes (``codes()``: that round's), forget the
        clients without an accepted reply, drop codes no client holds any more."""
        for cid in sent:
            if cid in accepted:
                self.held_round[cid] = server_round
            else:
                self.held_round.pop(cid, None)
        if server_round in self.held_round.values():
            self.codes_of_round[server_round] = codes()
        in_use = set(self.held_round.values())
        for old in [r for r in self.codes_of_round if r not in in_use]:
            del self.codes_of_round[old]
        while self.limit_bytes and self.nbytes > self.limit_bytes and self.codes_of_round:
            oldest = min(self.codes_of_round)
            del self.codes_of_round[oldest]
            self.held_round = {c: r for c, r in self.held_round.items() if r != oldest}
            self.dropped_rounds += 1
