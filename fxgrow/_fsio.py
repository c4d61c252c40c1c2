"""Crash-safe file writes, shared by model saving, checkpoints and the run directory.

One guarantee everywhere: a reader (or a process started after a crash) sees either the old
content of a path or the complete new one, never a part. Files are written under a temporary
name in the same directory, fsynced, renamed into place with ``os.replace`` (atomic on POSIX),
and the directory is fsynced so the rename itself survives a power loss. An ``OSError`` of
the file system (full, read-only, a path that is a file) becomes
:class:`fxgrow.errors.StorageError`, with the temporary file removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import storage_error


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a file system that cannot fsync directories is accepted)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file below ``root``, then every directory, ``root`` included."""
    for item in sorted(root.rglob("*")):
        if item.is_file():
            fsync_path(item)
    for directory in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        fsync_path(directory)


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn an ``OSError`` inside the block into a :class:`StorageError` about ``what``."""
    try:
        yield
    except OSError as exc:
        raise storage_error(exc, what) from exc


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Replace ``path``'s content by ``data`` atomically (see the module docstring). The new
    file gets the permissions of a file created under the umask."""
    target = Path(path)
    with storage_errors(f"writing {target}"):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would make it private
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_path(target.parent)
    return target


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new empty directory in ``parent`` with the permissions of one made under the umask
    (mkdtemp's 0700 would make a saved model private)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(tmp: Path, target: Path) -> None:
    """Make the complete directory ``tmp`` appear at ``target`` in one step, replacing a
    directory already there (the caller decides whether it may be replaced)."""
    if not target.exists():
        os.replace(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp)  # now holds the previous content
    else:
        # Without an atomic exchange: set the old directory aside, then move the new one in.
        # A crash between the two renames leaves nothing at ``target`` but the old one intact.
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, aside / "old")
        os.replace(tmp, target)
        shutil.rmtree(aside)
    fsync_path(target.parent)
