"""Atomic file output: a destination either keeps its old contents or gets the complete new ones.

Every file mlcompress writes (decoded checkpoints, ``.mrc`` containers) goes through
:func:`atomic_output`. The writer fills a temporary file in the destination's own directory (so
the final rename never crosses a file system), the data is flushed to disk, and only then is the
temporary file renamed over the destination. An exception or a kill at any point before the
rename leaves the destination exactly as it was and, for exceptions, no temporary file behind.
"""

from __future__ import annotations

import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mlcompress.errors import InputError


def check_destination(path: str | Path, *, force: bool = False) -> Path:
    """Refuse destinations that cannot or must not be written, before any work is done.

    Checking up front lets a command fail in a second rather than after a long encode.
    """
    dest = Path(path)
    if dest.is_dir():
        raise InputError(f"{dest} is a directory", hint="give a file name as the output")
    if not dest.parent.is_dir():
        raise InputError(
            f"cannot write {dest}: directory {dest.parent} does not exist",
            hint="create it first or choose another output path",
        )
    if not force and (dest.exists() or dest.is_symlink()):
        raise InputError(f"{dest} already exists", hint="pass --force to replace it")
    return dest


@contextmanager
def atomic_output(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on normal exit move it to ``path``.

    Without ``force`` an existing destination is refused, both before writing and at the final
    step (a hard link cannot replace an existing name, so a file created meanwhile by someone
    else is never clobbered). The result gets the usual umask-derived permissions, whatever the
    writer did to the temporary file, so it looks like any other file the user writes.
    """
    dest = check_destination(path, force=force)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        yield tmp
        os.chmod(tmp, mode)  # some writers (safetensors) recreate the file as owner-only
        _fsync_file(tmp)
        if force:
            os.replace(tmp, dest)
        else:
            _publish_without_overwrite(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(dest.parent)


def _publish_without_overwrite(tmp: Path, dest: Path) -> None:
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise InputError(f"{dest} already exists", hint="pass --force to replace it") from None
    except OSError:
        # File systems without hard links (some network and FAT mounts): fall back to a checked
        # rename, which is still atomic for readers but has a tiny window against other writers.
        if dest.exists():
            raise InputError(f"{dest} already exists", hint="pass --force to replace it") from None
        os.replace(tmp, dest)
        return
    tmp.unlink()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened this way on Windows.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
