"""Writing files others must not read or redirect: keys, node state, checkpoints.

``atomic_file`` is the one way the project writes them: the content appears under its name all at
once (a reader sees the old file or the new one), with the mode it is meant to have from the first
byte, and never through a symbolic link someone planted at the name or at a temporary name.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_file(path: Path, mode: int = 0o600) -> Iterator[IO[bytes]]:
    """A binary handle whose content replaces ``path`` when the block ends without error.

    Why this way: the temporary file is made by ``mkstemp`` in ``path``'s folder (so the final
    ``os.replace`` is atomic), which creates it exclusively (``O_EXCL``, never through a planted
    symlink) with mode 0600, so the content is never readable by others, not even for a moment;
    ``mode`` is applied to the open file before it gets its name. A symlink at ``path`` itself is
    refused rather than replaced: it is not what this code writes, so someone put it there.
    """
    if path.is_symlink():
        raise OSError(errno.ELOOP, "refusing to write through a symbolic link", str(path))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode != 0o600:
                os.fchmod(handle.fileno(), mode)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # rename(2) replaces a name; it never follows a link there
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
