"""Every file the project writes goes through here: atomically, and with the user's permissions.

A write lands in a temporary file beside its target and is renamed over it only when complete, so a
crash, a full disk or Ctrl-C never leaves a half-written checkpoint, PNG or report under the final
name (a rerun that skips existing files would otherwise trust a broken one). A temporary file's name
says which host and process writes it, so a run that starts in a folder removes what a killed writer
left there (`remove_temp_files`) without touching the files of writers still at work. Temporary files are
created 0600 by `mkstemp`; the finished file gets the permissions the umask gives any new file
(0644 under umask 022), so results can be shared on a cluster. Renaming replaces a symbolic link
at the target instead of writing through it.
"""
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from .errors import UserError

TEMP_SUFFIX = ".tmp"
# .<target name>.<host>-<pid>.<mkstemp's characters>.tmp, and the older .<target name>.<characters>.tmp
TEMP_NAME = re.compile(r"^\.(?P<target>.+?)\.(?:(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.)?[A-Za-z0-9_]+\.tmp$")
# A writer on another host of a shared file system cannot be asked whether it still runs: its
# temporary files are left alone for this long.
OTHER_HOST_GRACE_SECONDS = 24 * 3600


def host_name():
    """This host's short name as it appears in temporary-file names."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"


def _temp_prefix(path):
    return f".{path.name}.{host_name()}-{os.getpid()}."


def current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode():
    """What `open(path, "w")` would give a new file: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def default_dir_mode():
    """What `mkdir` would give a new folder: 0777 minus the umask (`mkdtemp` gives 0700)."""
    return 0o777 & ~current_umask()


class WriteError(UserError):
    """A file could not be written (full disk, quota, read-only file system, no permission)."""


# errno values that mean "no room", where the user's fix is to free space, not to change a flag.
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def write_failure(exc):
    """The reason in words, with what to do about a full disk."""
    reason = exc.strerror or str(exc)
    if exc.errno in NO_SPACE:
        reason += " (the disk or quota is full: free space and run again)"
    return reason


@contextlib.contextmanager
def atomic_path(path, fsync=False, set_mode=True):
    """Yield a temporary path beside `path`; when the block succeeds it becomes `path` (umask
    permissions unless not `set_mode`), otherwise it is removed. `fsync` flushes it to disk first."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {write_failure(e)}") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if set_mode:
            os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {write_failure(e)}") from None
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def atomic_write(path, data, mode="w", fsync=False):
    """Write `data` (str, bytes, or a callable taking the open file) to `path` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, mode) as f:
            if callable(data):
                data(f)
            else:
                f.write(data)


def write_json(obj, path, **dump_kwargs):
    """Indented JSON with a trailing newline, written atomically."""
    dump_kwargs.setdefault("indent", 2)
    atomic_write(path, json.dumps(obj, **dump_kwargs) + "\n")


def save_torch(obj, path):
    """torch.save, atomically and flushed to disk (checkpoints are what a crash must not lose)."""
    import torch

    def write(f):
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's zip writer reports a failed write(2) this way
            if "write" not in str(e) and "unexpected pos" not in str(e):
                raise
            f.flush()  # raises the OSError behind it (ENOSPC, EFBIG, ...) when there is one
            _probe_write(f)  # or a write of our own does, in the OS's words
            raise OSError(errno.EIO,
                          f"the write failed; is the disk or quota full? ({str(e).splitlines()[0][:100]})") from None

    atomic_write(path, write, mode="wb", fsync=True)


def _probe_write(f, chunk=1 << 16, chunks=64):
    """torch's zip writer hides the OSError of a failed write; writing on at the end of the file
    raises it again (ENOSPC "No space left on device", EDQUOT, EFBIG) while there is still no room.
    The file is a temporary one that is removed afterwards."""
    fd = f.fileno()
    os.lseek(fd, 0, os.SEEK_END)
    for _ in range(chunks):
        os.write(fd, b"\0" * chunk)


def save_npy(array, path):
    import numpy as np
    atomic_write(path, lambda f: np.save(f, array), mode="wb")


def save_image(image, path, **save_kwargs):
    """A PIL image or an (H, W[, C]) uint8/uint16 array as PNG (or the format `path` names)."""
    from PIL import Image
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    fmt = save_kwargs.pop("format", None) or Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    atomic_write(path, lambda f: image.save(f, format=fmt, **save_kwargs), mode="wb")


def link_or_copy(src, dst):
    """Hard-link `src` at `dst` (a copy across file systems), replacing `dst` atomically. A link
    shares the source's inode, so its permissions are left as they are."""
    with atomic_path(dst, set_mode=False) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def copy_file(src, dst):
    """A real copy, atomically (the copy must not change when the source does)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def move_file(src, dst):
    """Move a finished file to `dst` in one rename (same file system), creating its folder; a
    link at `dst` is replaced, never written through. For trees built in a staging folder."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def file_sha256(path, chunk=1 << 20):
    """The sha256 of a file's bytes, read in chunks (checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def first_non_folder(path):
    """The first existing path on the way to `path` that is not a folder (None when there is
    none): a path "under a regular file" cannot be created, and saying which file is in the way
    beats "Not a directory"."""
    path = Path(path)
    for p in [*reversed(path.parents), path]:
        if p.exists() and not p.is_dir():
            return p
    return None


def folder_problem(folder):
    """Why no file can be written in `folder` (created when missing), or None when one can."""
    blocker = first_non_folder(folder)
    if blocker is not None:
        return f"{blocker} is a file, not a folder"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", suffix=TEMP_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return str(e.strerror or e)
    return None


def check_writable(folder, flag):
    """Create `folder` and prove a file can be written there, before any long work starts; then
    clear what killed writers left in it (`remove_temp_files`)."""
    why = folder_problem(folder)
    if why:
        raise PermissionError(f"{flag} {folder} is not writable: {why}")
    note_removed_temp_files(folder)


def check_writable_file(path, flag):
    """The single-file counterpart of `check_writable`: `path` is not a folder and its folder takes
    a new file (created when missing), so an output flag fails before the work, not after it."""
    path = Path(path)
    if path.is_dir():
        raise PermissionError(f"{flag} {path} is a folder; expected the path of a file to write")
    if path.name in ("", ".", ".."):
        raise PermissionError(f"{flag} {str(path)!r} has no file name; expected the path of a file to write")
    why = folder_problem(path.parent)
    if why:
        raise PermissionError(f"{flag} {path} cannot be written: {why}")
    note_removed_temp_files(path.parent)


def note_removed_temp_files(folder):
    """`remove_temp_files`, saying on stderr when there was something to remove."""
    removed = remove_temp_files(folder)
    if removed:
        print(f"note: removed {removed} temporary file(s) of an interrupted write in {folder}", file=sys.stderr)
    return removed


REPO_ROOT = Path(__file__).resolve().parents[2]  # scdm/runtime/fileio.py -> the repository


def recorded_path(path):
    """`path` as committed results record it: relative to the repository when it lies inside it or
    in a sibling folder, so that a results JSON names no machine's folders."""
    resolved = Path(path).resolve()
    rel = os.path.relpath(resolved, REPO_ROOT)
    return resolved.as_posix() if rel.startswith(os.pardir + os.sep + os.pardir) else Path(rel).as_posix()


def _writer_gone(match, path):
    if match.group("pid") is None:  # named before writers were recorded: no writer of today's runs
        return True
    if match.group("host") != host_name():
        try:
            return time.time() - path.stat().st_mtime > OTHER_HOST_GRACE_SECONDS
        except OSError:
            return False
    pid = int(match.group("pid"))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_temp_files(folder):
    """Delete the temporary files that killed writers left in `folder` (not recursive): ours by
    name, and only where the writing process is gone. Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for f in folder.glob(f".*{TEMP_SUFFIX}"):
        match = TEMP_NAME.match(f.name)
        if match and f.is_file() and _writer_gone(match, f):
            f.unlink(missing_ok=True)
            removed += 1
    return removed
