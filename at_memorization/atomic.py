"""Writing files so that a reader never sees half of one, and checking a folder is writable first.

The one place the package writes a file atomically: the text files of a run folder and of a study,
reports, evaluation records, the method catalog's cache, and (through ``checkpoint.save_atomic``)
checkpoints. A write goes to a temporary file ``.<name>.<random>.tmp`` in the same folder (the name
``RunFolder.remove_stale_temporaries`` looks for), is fsynced, gets the mode a plain ``open`` would
give it, and is renamed over the file: a reader, or a resumed run, sees the old version or the new
one. Torch-free, so that the CLI and the report can use it without importing torch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable

from .user_errors import UserError


class WriteError(UserError, OSError):
    """A file or folder cannot be written (disk full, file size limit, read-only folder, a file where a
    folder should be); the message names it and the operating system's reason in one line."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, mode: str, write: Callable[[IO], object]) -> None:
    """Call ``write(handle)`` on a temporary file opened with ``mode`` ("w": UTF-8 text, "wb": bytes),
    then put it in place of ``path`` (its folders made if need be).

    A failure is a WriteError naming ``path`` and the reason; the previous version of the file is intact.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600
        os.replace(tmp, path)
    except OSError as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        failure = WriteError(f"cannot write {path}: {error.strerror or error} [Errno {error.errno}]")
        failure.errno = error.errno
        raise failure from error
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write ``text`` to ``path`` (UTF-8) atomically, as ``write_atomic``."""
    write_atomic(path, "w", lambda handle: handle.write(text))


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """Make ``target`` the same file as ``source`` (a hard link, so no copy; a copy where the file
    system has no hard links), replacing ``target`` atomically."""
    source, target = Path(source), Path(target)
    if target.is_file() and os.path.samefile(source, target):
        return
    link = target.parent / f".{target.name}.{os.getpid()}.tmp"
    link.unlink(missing_ok=True)
    try:
        os.link(source, link)
    except OSError:  # file systems without hard links
        shutil.copyfile(source, link)
    os.replace(link, target)
    link.unlink(missing_ok=True)  # rename() between two links of one file leaves both names


def check_writable_folder(path: str | Path, what: str) -> None:
    """A WriteError unless ``path`` is, or can be made into, a folder we can write in; ``what`` names it
    in the message (e.g. "--out"). Called before minutes of work, not after them."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WriteError(f"{what} {path} is a file, not a folder")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise WriteError(f"{what} {path}: {ancestor} is a file, so no folder can be made under it")
    try:  # a real write, not os.access: also right for root, read-only mounts and ACLs
        fd, probe = tempfile.mkstemp(prefix=".at-mem-write-probe.", suffix=".tmp", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise WriteError(f"{what} {path}: cannot write in {ancestor} ({error.strerror or error})") from None
