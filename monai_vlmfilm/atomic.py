"""Atomic file writes: a reader (or a resumed run) sees the old complete file or the new complete file, never a part.

The one write path for files a run depends on after a crash (training checkpoints, inference outputs): write a
temporary file in the target's directory, flush and ``fsync`` it, ``os.replace`` it over the target, ``fsync`` the
directory. A SIGKILL, a power loss or a full disk at any moment leaves the previous file in place plus, at worst, a
temporary file that :func:`remove_stale_temp_files` deletes on the next start.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["DiskWriteError", "atomic_write", "describe_write_error", "temp_name", "remove_stale_temp_files"]

logger = logging.getLogger(__name__)

#: ``.<target name>.<pid>.tmp<suffix>``: hidden (globs such as ``checkpoint_*.pt`` never match it) and named after
#: its writer, so a later start can tell a dead writer's leftover from a live one's file.
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.tmp(?P<suffix>\.[^/]*)?$")

_NO_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskWriteError(OSError):
    """A file could not be written (no space left, file size limit, permissions); the previous file is untouched."""


def temp_name(path: str | os.PathLike, suffix: str = "") -> Path:
    """The temporary file :func:`atomic_write` writes before renaming it to ``path``.

    Args:
        path: the target file.
        suffix: appended after ``.tmp`` (e.g. ``".nii.gz"`` for writers that pick the format by extension).
    """
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.tmp{suffix}")


def _os_error(e: BaseException | None) -> OSError | None:
    """The ``OSError`` behind ``e``: itself, or the one torch's C++ writer swallowed (its ``__context__``)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _is_write_failure(e: BaseException) -> bool:
    # torch.save reports a failed write as RuntimeError("[enforce fail at inline_container.cc] ...")
    return _os_error(e) is not None or (isinstance(e, RuntimeError) and "inline_container" in str(e))


def describe_write_error(e: BaseException) -> tuple[int, str]:
    """(errno, plain reason) of a failed write: ENOSPC / EFBIG / EDQUOT say "no space left ... file size limit".

    Args:
        e: the exception of the write (an ``OSError``, or torch's ``RuntimeError`` with the ``OSError`` as context).
    """
    os_err = _os_error(e)
    code = os_err.errno if os_err is not None and os_err.errno else errno.EIO
    if code in _NO_SPACE:
        return code, (
            f"no space left on the device or the file size limit was reached ({os.strerror(code)}); "
            "free space (or raise `ulimit -f`) and run again"
        )
    text = str(os_err if os_err is not None else e).strip()
    return code, (text.splitlines()[0] if text else type(e).__name__)


@contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = "", fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically and durably.

    The caller writes the complete file to the yielded path (``torch.save``, ``nib.save``, ``PIL.Image.save``, ...);
    ``torch.save`` should get an open file, not the path, so that a failed write keeps its errno.
    On any error the temporary file is removed, ``path`` keeps its previous content, and an ``OSError`` of the
    write becomes a :class:`DiskWriteError` whose message names ``path`` and the reason ("no space left ..." for
    ``ENOSPC`` / ``EFBIG`` / ``EDQUOT``).

    Args:
        path: the file to (re)write.
        suffix: extension of the temporary file (for writers that choose the format by it).
        fsync: ``fsync`` the file and the directory (durability after a power loss, not only a process kill).

    Raises:
        DiskWriteError: the write, flush or rename failed.
    """
    target = Path(path)
    tmp = temp_name(target, suffix)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
        if fsync:
            _fsync_dir(target.parent)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if _is_write_failure(e):
            code, why = describe_write_error(e)
            # `from None`: the message says all a user needs; the torch / zlib frames below it add nothing
            raise DiskWriteError(code, f"could not write {str(target)!r}: {why}") from None
        raise


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier failed write in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(directory: str | os.PathLike, log: logging.Logger | None = None) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write` whose writer process is gone (killed mid-write).

    Args:
        directory: the folder to clean (not recursive).
        log: where to report each removed file (default: this module's logger).

    Returns:
        the removed paths.
    """
    d = Path(directory)
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    for f in d.iterdir():
        m = _TEMP_RE.match(f.name)
        if m is None or not f.is_file() or _alive(int(m.group("pid"))):
            continue
        try:
            f.unlink()
        except OSError:
            continue
        removed.append(f)
        (log or logger).warning(f"removed {f}: partial write of {m.group('target')} left by a killed process")
    return removed
