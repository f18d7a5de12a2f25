"""Private files on disk (issue 33): keys, checkpoints and node state are born 0600, no write
follows a planted symlink, and a private key that others may read is refused, not reused.

"Born 0600" is checked with the umask at its usual 022 and ``os.chmod`` made a no-op: what the
files look like before any chmod afterwards, i.e. what another user could open in that moment.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from core.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from core.node_state import NodeStateStore
from deploy import certs
from tests.test_node_state import assert_refused, sample_state

BACKENDS = ["python", pytest.param("cli", marks=pytest.mark.skipif(
    not certs.cli_tools_available(), reason="openssl or ssh-keygen not installed"))]  # fmt: skip


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def no_late_chmod(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """umask 022 and no ``os.chmod``: a file is only private if it was created private."""
    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    old = os.umask(0o022)
    yield
    os.umask(old)


def plant_link(link: Path, victim: Path) -> Path:
    """A symlink at ``link`` to ``victim``, a file an attacker wants overwritten; returns it."""
    for path in (link, victim):
        path.parent.mkdir(parents=True, exist_ok=True)
    victim.write_bytes(b"precious")
    link.symlink_to(victim)
    return victim


# ------------------------------------------------------------------------------ keys
@pytest.mark.parametrize("backend", BACKENDS)
def test_private_keys_are_created_0600(tmp_path, backend, no_late_chmod):
    material = certs.make_all(tmp_path / "certs", node_names=["n0"], backend=backend)
    for key in (material.ca_key, material.server_key, material.nodes[0].private_key):
        assert mode_of(key) == 0o600, key
    for public in (material.ca_cert, material.server_cert, material.nodes[0].public_key):
        assert mode_of(public) == 0o644, public
    assert not [p.name for p in material.directory.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", [certs.CA_KEY, certs.SERVER_KEY, "supernode-0", certs.CA_CERT])
def test_a_symlink_at_a_key_path_is_refused_not_followed(tmp_path, name, capsys):
    directory = tmp_path / "certs"
    victim = plant_link(directory / name, tmp_path / "victim")
    argv = [str(directory), "--nodes", "1", "--backend", "python"]
    assert certs.main(argv) == 2
    error = capsys.readouterr().err
    assert str(directory / name) in error and "symbolic link" in error
    assert len(error.strip().splitlines()) == 1
    assert victim.read_bytes() == b"precious"
    assert (directory / name).is_symlink()


@pytest.mark.parametrize("name", [certs.CA_KEY, "n0"])
def test_a_kept_private_key_that_others_may_read_is_refused(tmp_path, name, capsys):
    certs.make_all(tmp_path, node_names=["n0"], backend="python")
    (tmp_path / name).chmod(0o644)
    with pytest.raises(certs.KeyPermissionError, match="0644") as caught:
        certs.make_all(tmp_path, node_names=["n0"], backend="python")
    assert str(tmp_path / name) in str(caught.value)
    assert certs.main([str(tmp_path), "--node-name", "n0", "--backend", "python"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(tmp_path / name) in error and "0644" in error
    (tmp_path / name).chmod(0o600)  # the operator's fix: the same key is kept again
    assert certs.main([str(tmp_path), "--node-name", "n0", "--backend", "python"]) == 0


# ------------------------------------------------------------------------------ checkpoints
def test_checkpoints_are_created_0600(tmp_path, no_late_chmod):
    path = save_checkpoint(tmp_path, {"global/0": np.arange(3.0)}, {"round": 1})
    assert mode_of(path) == 0o600
    arrays, meta = load_checkpoint(tmp_path)
    np.testing.assert_array_equal(arrays["global/0"], np.arange(3.0))
    assert meta == {"round": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


def test_checkpoint_writes_never_follow_a_planted_symlink(tmp_path):
    # The temporary name the old writer used, predictable to anyone who can list the folder.
    victim = plant_link(tmp_path / (CHECKPOINT_NAME + ".tmp"), tmp_path / "victim")
    save_checkpoint(tmp_path, {"global/0": np.zeros(2)}, {"round": 1})
    assert victim.read_bytes() == b"precious"
    (tmp_path / CHECKPOINT_NAME).unlink()
    plant_link(tmp_path / CHECKPOINT_NAME, victim)
    with pytest.raises(OSError, match="symbolic link"):
        save_checkpoint(tmp_path, {"global/0": np.zeros(2)}, {"round": 2})
    assert victim.read_bytes() == b"precious"
    assert not list(tmp_path.glob(".*.tmp"))  # the refused write left no temporary behind


# ------------------------------------------------------------------------------ node state
def test_node_state_files_are_created_0600_and_never_written_through_a_symlink(
    tmp_path, no_late_chmod
):
    store = NodeStateStore(tmp_path / "state", 1, "fedbif", 0)
    # The temporary name the old writer used, predictable to anyone who can list the folder.
    victim = plant_link(store.path.with_name(store.path.name + ".tmp"), tmp_path / "victim")
    store.save(sample_state())
    assert mode_of(store.path) == 0o600
    assert victim.read_bytes() == b"precious"
    store.path.unlink()
    store.path.symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        store.save(sample_state())
    assert victim.read_bytes() == b"precious"
    assert_refused(store, "symbolic link")  # nor is a state file read through one
