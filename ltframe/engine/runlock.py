"""One writer per run directory: an exclusive `flock` on RUN/.lock (stdlib only).

`ltframe run` and `ltframe resume` (rank 0 under torchrun) hold the lock while they write the
run; a second writer is refused with the PID recorded in the file. The kernel drops the lock
when its process dies, so the lock of a killed run is simply taken over. The file itself is
never removed (removing a locked file would let two processes hold "the" lock).
"""

from __future__ import annotations

import os
from pathlib import Path

from ltframe.errors import DiskWriteError, RunLockedError

try:  # Linux / macOS; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


def _pid_in(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        return "?"
    return text if text.isdigit() else "?"


class RunLock:
    """The run directory's lock; `acquire()` raises RunLockedError naming the holder."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        if fcntl is None or self.fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DiskWriteError(f"cannot open the run's lock file {self.path} "
                                 f"({exc.strerror}); make {self.path.parent} writable",
                                 str(self.path), exc.errno) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is being written by process {pid} (it holds {self.path}); "
                "wait for it to finish, or stop it and run `ltframe resume "
                f"{self.path.parent}`") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def try_lock(run_dir: Path) -> RunLock | None:
    """The lock of `run_dir`, or None when another process holds it."""
    try:
        return RunLock(run_dir).acquire()
    except RunLockedError:
        return None


def holder(run_dir: Path) -> str | None:
    """The PID (as text, "?" if unknown) of the process writing `run_dir`, or None."""
    path = Path(run_dir) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _pid_in(fd)
    finally:
        os.close(fd)  # also drops the shared lock taken for the probe
    return None


def clean_tmp(run_dir: Path) -> list[Path]:
    """Remove the `.NAME.XXXX.tmp` files interrupted atomic writes left (call with the lock
    held); returns them."""
    stale = [p for p in Path(run_dir).rglob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
