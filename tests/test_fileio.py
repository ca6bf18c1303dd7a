"""Every writer goes through scdm.runtime.fileio: atomic, and with the umask's permissions."""
import errno
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scdm.runtime import fileio


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writers_honour_umask(tmp_path, umask022):
    fileio.atomic_write(tmp_path / "a.txt", "hello")
    fileio.write_json({"a": 1}, tmp_path / "b.json")
    fileio.save_torch({"w": torch.ones(2)}, tmp_path / "c.pt")
    fileio.save_npy(np.arange(3), tmp_path / "d.npy")
    fileio.save_image(np.zeros((4, 4, 3), np.uint8), tmp_path / "e.png")
    for name in ("a.txt", "b.json", "c.pt", "d.npy", "e.png"):
        assert mode(tmp_path / name) == 0o644, name
    os.umask(0o077)
    fileio.atomic_write(tmp_path / "private.txt", "x")
    assert mode(tmp_path / "private.txt") == 0o600
    assert torch.load(tmp_path / "c.pt")["w"].sum() == 2
    assert np.load(tmp_path / "d.npy").tolist() == [0, 1, 2]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "result.json"
    fileio.write_json({"old": True}, target)

    def boom(f):
        f.write("partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(fileio.WriteError, match=f"cannot write {target}: No space left on device .the disk or quota "
                                                 "is full: free space and run again"):
        fileio.atomic_write(target, boom)
    assert target.read_text().strip().startswith("{") and "old" in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_symlinked_target_is_replaced_not_written_through(tmp_path):
    source = tmp_path / "source.txt"
    source.write_text("input annotation")
    link = tmp_path / "out.txt"
    link.symlink_to(source)
    fileio.atomic_write(link, "new")
    assert source.read_text() == "input annotation" and not link.is_symlink() and link.read_text() == "new"


def test_link_or_copy_keeps_the_source_mode(tmp_path, umask022):
    src = tmp_path / "img.jpg"
    src.write_bytes(b"jpeg")
    os.chmod(src, 0o444)
    fileio.link_or_copy(src, tmp_path / "out" / "img.jpg")
    assert (tmp_path / "out" / "img.jpg").read_bytes() == b"jpeg" and mode(src) == 0o444


def test_remove_temp_files_takes_only_those_of_writers_that_are_gone(tmp_path):
    """What a SIGKILL in the middle of a save leaves is removed by the next run in that folder; the
    temporary file of a writer still at work (another rank, another run) is not."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    host = fileio.host_name()
    killed = tmp_path / f".model000100.pt.{host}-{dead_pid}.abcd1234.tmp"
    legacy = tmp_path / ".x.png.abcd_123.tmp"
    live_peer = tmp_path / f".ema.pt.{host}-{os.getppid()}.zzzz9999.tmp"  # a live process (pytest's parent)
    own = tmp_path / f".opt.pt.{host}-{os.getpid()}.qqqq0000.tmp"
    remote = tmp_path / f".y.png.otherhost-{dead_pid}.abcd1234.tmp"
    old_remote = tmp_path / f".z.png.otherhost-{dead_pid}.abcd1234.tmp"
    not_ours = tmp_path / ".editor-swap.tmp"
    for f in (killed, legacy, live_peer, own, remote, old_remote, not_ours, tmp_path / "keep.png"):
        f.write_bytes(b"x")
    day_ago = time.time() - fileio.OTHER_HOST_GRACE_SECONDS - 60
    os.utime(old_remote, (day_ago, day_ago))
    assert fileio.remove_temp_files(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (live_peer, own, remote, not_ours, tmp_path / "keep.png"))


def test_temp_names_carry_host_and_pid(tmp_path):
    seen = []
    with fileio.atomic_path(tmp_path / "a.json") as tmp:
        seen.append(tmp.name)
        assert fileio.remove_temp_files(tmp_path) == 0  # its own writer is alive
        tmp.write_text("{}")
    assert seen[0].startswith(f".a.json.{fileio.host_name()}-{os.getpid()}.") and seen[0].endswith(".tmp")
    assert fileio.TEMP_NAME.match(seen[0])
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_recorded_paths_are_relative_to_the_repository(tmp_path):
    root = Path(__file__).resolve().parents[1]  # the repository, found independently of fileio
    assert fileio.REPO_ROOT == root
    assert fileio.recorded_path(root / "docs" / "robustness.png") == "docs/robustness.png"
    assert fileio.recorded_path(root.parent / "shared" / "compat" / "x.npy") == "../shared/compat/x.npy"
    assert fileio.recorded_path("/") == "/"  # far outside: kept absolute
