"""Files and folders that appear whole or not at all: written under a temporary name beside the
destination (same filesystem) and renamed into place, so a reader, a resumed run or a crash
never meets a half-written one. Every writer in mi_jax goes through here (store manifests,
reports, the VAE trainer's checkpoint, import / export folders)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator


def write_file(path: str, data: bytes) -> str:
    """Writes `data` to `path` through a fsynced temporary sibling; returns `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; these files are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def check_new_folder(out_dir: str, overwrite: bool) -> str:
    """`out_dir` as an absolute path; raises when it exists and `overwrite` is False."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose a new folder or pass overwrite=True.")
    return out_dir


@contextlib.contextmanager
def folder(out_dir: str) -> Iterator[str]:
    """Yields a fresh temporary sibling of `out_dir` to fill; when the block ends normally it
    replaces `out_dir` (an old one is removed only then), otherwise it is removed."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.partial-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        commit(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit(tmp: str, out_dir: str) -> None:
    """Moves the finished `tmp` into place (replacing an old `out_dir` only now, at the end)."""
    old = None
    if os.path.exists(out_dir):
        old = f"{tmp}.old"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old:
        shutil.rmtree(old)
