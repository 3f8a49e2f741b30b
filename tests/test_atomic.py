"""The package's one atomic writer and write probe (at_memorization/atomic.py)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from at_memorization import atomic
from at_memorization.atomic import WriteError, check_writable_folder, link_or_copy, write_atomic, write_text_atomic


def _temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_write_text_atomic_replaces_the_file_with_the_umasks_mode(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    write_text_atomic("a\n", path)
    write_text_atomic("b ± 1\n", path)
    assert path.read_bytes() == "b ± 1\n".encode()  # UTF-8 whatever the locale
    assert _temp_files(path.parent) == []
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_a_failed_write_keeps_the_old_file_and_says_why_in_one_line(tmp_path):
    path = tmp_path / "config.json"
    write_text_atomic("old\n", path)

    def full_disk(handle):
        handle.write("partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError) as caught:
        write_atomic(path, "w", full_disk)
    assert str(caught.value) == f"cannot write {path}: No space left on device [Errno {errno.ENOSPC}]"
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert path.read_text() == "old\n" and _temp_files(tmp_path) == []


def test_an_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    write_atomic(path, "wb", lambda handle: handle.write(b"v1"))

    def interrupted(handle):
        handle.write(b"partial")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a write

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "wb", interrupted)
    assert path.read_bytes() == b"v1" and _temp_files(tmp_path) == []


def test_a_file_in_the_folder_path_is_a_write_error(tmp_path):
    (tmp_path / "blocker").write_text("a file")
    with pytest.raises(WriteError, match=r"cannot write .*blocker/out/table.md: .*\[Errno"):
        write_text_atomic("x", tmp_path / "blocker" / "out" / "table.md")


def test_link_or_copy_replaces_the_target(tmp_path, monkeypatch):
    source, target = tmp_path / "last.pt", tmp_path / "last-prev.pt"
    source.write_bytes(b"new")
    target.write_bytes(b"old")
    link_or_copy(source, target)
    assert target.read_bytes() == b"new" and os.path.samefile(source, target)  # a hard link: no copy
    link_or_copy(source, target)  # already the same file
    assert source.read_bytes() == target.read_bytes() == b"new" and _temp_files(tmp_path) == []

    def no_hard_links(*args):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(atomic.os, "link", no_hard_links)
    copy = tmp_path / "copy.pt"
    link_or_copy(source, copy)
    assert copy.read_bytes() == b"new" and not os.path.samefile(source, copy) and _temp_files(tmp_path) == []


def test_check_writable_folder(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    check_writable_folder(tmp_path / "new" / "run", "--out")  # can be made
    assert not (tmp_path / "new").exists() and _temp_files(tmp_path) == []  # and is not made by the check
    with pytest.raises(WriteError, match=r"^--out .*afile is a file, not a folder$"):
        check_writable_folder(afile, "--out")
    with pytest.raises(WriteError, match=r"afile/run: .*afile is a file, so no folder can be made under it$"):
        check_writable_folder(afile / "run", "--out")

    def read_only(*args, **kwargs):  # a real read-only folder is writable for root
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    with pytest.raises(WriteError, match=rf"^the results folder .*eval: cannot write in {tmp_path} \(Permission denied\)$"):
        check_writable_folder(tmp_path / "eval", "the results folder")


def test_the_module_imports_no_torch():
    code = "import sys, at_memorization.atomic; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
