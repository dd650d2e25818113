"""Outputs checked before work starts, and files that appear whole or not at all.

A run that fails only after all its work (an output path that is a folder, a folder it may not write to)
wastes that work; a run that dies mid-write must not leave a half file under the real name.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path


def check_writable(path: str | os.PathLike, *, folder: bool) -> None:
    """Refuse an output that cannot be written, as an OSError naming it: a file where a folder goes, a folder
    where a file goes, or a place this process may not write to."""
    path = os.fspath(path)
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(errno.EEXIST, "exists and is not a folder (give a folder for the results)", path)
    if not folder and os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder (give a file name to write)", path)
    existing = path if folder and os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    while existing and not os.path.exists(existing):  # new folders would be made in the nearest existing one
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(errno.ENOTDIR, "is not a folder, so nothing can be written under it", existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "Permission denied (this folder is not writable)", existing)


# errors of writing (not of reading an input): a file being written that fails with one of these names the output
WRITE_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS))


@contextlib.contextmanager
def partial_file(path: str | os.PathLike):
    """Yields a temporary path beside PATH (PATH.<random>.partial, in the same folder) to write; on success the
    file is flushed to disk (fsync) and renamed over PATH (os.replace), so PATH holds the old file or the whole
    new one, never a half (a full disk, a kill, a crash). On any failure the temporary file is removed and PATH is
    untouched. A write error that names no file (a full disk: "No space left on device") is raised naming PATH.

    The one way the tools write an output file; `write_bytes_atomic`, `write_text_atomic` and `open_atomic` are
    its shorthands. Each writer gets its own temporary name, so two runs writing one PATH at once each leave a
    whole file (the last rename wins) instead of interleaving into one shared temporary file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: a name of this writer's own; 0o666 less the umask, as any file written
        partial = path.with_name(f"{path.name}.{secrets.token_hex(4)}.partial")
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
    except OSError as error:
        if error.filename is not None:
            raise
        raise _naming(error, path) from None
    try:
        yield partial
        fsync_file(partial)
        os.replace(partial, path)
    except BaseException as error:
        partial.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None and error.errno in WRITE_ERRNOS:
            raise _naming(error, path) from None
        raise
    try:
        _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)  # the rename itself survives a power cut
    except OSError:
        pass  # some file systems cannot fsync a folder; the file itself is whole either way


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write DATA to PATH whole or not at all (see partial_file)."""
    with open_atomic(path, "wb") as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write TEXT to PATH whole or not at all (see partial_file)."""
    write_bytes_atomic(path, text.encode(encoding))


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w", **kwargs):
    """open(PATH, MODE) for writing, whose file appears at PATH whole when the block ends without an error, and
    not at all (the old PATH intact) when it fails (see partial_file). MODE: "w" or "wb" (+ open's keywords)."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"open_atomic writes a whole new file: mode 'w' or 'wb', not {mode!r}")
    with partial_file(path) as partial, open(partial, mode, **kwargs) as handle:
        yield handle


def _naming(error: OSError, path: Path) -> OSError:
    """The same error, naming the output path (h5py's and a file object's write errors name no file)."""
    what = error.strerror or (str(error).splitlines()[0] if str(error) else type(error).__name__)
    return OSError(error.errno or errno.EIO, what, str(path))


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a closed file's data to disk (before a rename or link makes it visible under its name)."""
    _fsync(path, os.O_RDONLY)


def _fsync(path: str | os.PathLike, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def relative_to_folder(path: str | os.PathLike, folder: str | os.PathLike) -> str:
    """PATH written relative to FOLDER (a results or report folder), so rows and reports name no machine's
    folders and survive moving the two together."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))


class ExclusiveLock:
    """An exclusive flock on the file `path`, held while one process writes an output (a context manager).

    The file records the holder's pid and command, so that a second writer is refused in one line naming who
    holds it: "another `heads predict` (pid 12) is writing o.csv; ...". `wait_seconds` > 0 waits that long
    for the holder first. `remove`: delete the lock file on release, for a lock beside a user's own file, which
    should leave nothing behind. Deleting a lock file is safe only with the check in acquire: a process that
    locked a file removed (or replaced) meanwhile lets go of it and locks the new one, so two processes never each
    hold a different file of one name.
    """

    def __init__(self, path: str | os.PathLike, *, command: str, target: str, advice: str,
                 wait_seconds: float = 0.0, poll_seconds: float = 0.2, remove: bool = False):
        self.path, self.command, self.target, self.advice = Path(path), command, target, advice
        self.wait_seconds, self.poll_seconds, self.remove = wait_seconds, poll_seconds, remove
        self._descriptor: int | None = None

    def acquire(self) -> "ExclusiveLock":
        import fcntl
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_seconds
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    message = self._refusal(descriptor)
                    os.close(descriptor)
                    raise ValueError(message) from None
                os.close(descriptor)
                time.sleep(self.poll_seconds)
                continue
            if self._still_the_file(descriptor):
                break
            os.close(descriptor)  # its holder removed it on release: lock the file now under that name
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()} {self.command}\n".encode(), 0)  # who holds it, for the refusal
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        if self._descriptor is not None:
            if self.remove:  # while still holding it: see acquire's check
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            os.close(self._descriptor)  # closing the descriptor releases the flock
            self._descriptor = None

    def __enter__(self) -> "ExclusiveLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _still_the_file(self, descriptor: int) -> bool:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(descriptor)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def _refusal(self, descriptor: int) -> str:
        """One line: who holds the lock, what it writes, and what this command can do instead."""
        text = os.pread(descriptor, 256, 0).decode("utf-8", "replace").strip()
        pid_text, _, command = text.partition(" ")
        command = command.strip() or self.command  # files written before the command was recorded: a pid only
        holder = f"pid {pid_text}" if pid_text.isdigit() else "pid unknown"
        if pid_text.isdigit():
            try:
                os.kill(int(pid_text), 0)
            except ProcessLookupError:  # it died; a child it forked may still hold the lock for a moment
                holder += ", which has exited: retry in a few seconds"
            except PermissionError:
                pass
        who = f"another `{command}`" if command == self.command else f"`{command}`"
        tail = "" if command == self.command else f", so this `{self.command}` cannot now"
        return f"{who} ({holder}) is writing {self.target}{tail}; {self.advice}"
