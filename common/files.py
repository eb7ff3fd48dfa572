"""Files we do not control, read so that they cannot hang or exhaust a run, and the locks on the
folders we write.

Data folders, caches, checkpoints and model folders come from users, other jobs and downloads. A
name can point at a FIFO (open() waits for a writer forever), at /dev/zero (read() never ends),
or at gigabytes where a few bytes were expected. So:

    open_regular(path)            a binary file object, only for a regular file
    read_bounded(path, limit)     its bytes, refused above `limit` without reading them
    read_json(path)               a JSON file of at most MAX_JSON_BYTES
    sha256(path)                  the hash of a regular file, in constant memory
    plain_name(name)              True for a bare file name, which stays inside its folder
    probe_writable(folder)        make the folder and show it takes a write, or raise OSError

    lock_folder(folder, shared=False, purpose="")   an OS lock on FOLDER/.lock

The lock is fcntl.flock on FOLDER/.lock: exclusive for the one process that writes the folder (a
training run on its --out, `python -m datafeed cache` on its cache), shared for those that read it
(training runs reading a cache). The kernel drops it when its holder ends, however it ends
(SIGKILL included), so a killed run never leaves a stale lock. The file holds the holder's PID and
host, which a refused process names. On NFS, Linux implements flock with NFS locks, which work
across hosts; Lustre needs the `flock` mount option.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import stat
import tempfile
import time
from pathlib import Path

MAX_JSON_BYTES = 16 << 20  # config.json, cache.json: a few KB each (a cache of 10⁸ items: ~6 MB)
LOCK_NAME = ".lock"
ORPHAN_WAIT_S = 30.0  # how long to wait for the children of a dead holder (DataLoader workers) to exit


class RefusedFile(OSError):
    """A file we will not read: not a regular file, or larger than its limit."""


class TooLarge(RefusedFile):
    """A regular file larger than the limit for its kind."""


def open_regular(path):
    """Open a regular file for reading in binary mode; RefusedFile for anything else (a FIFO, a
    device, a socket, a folder), without blocking: O_NONBLOCK makes open() of a FIFO return at
    once, and fstat of the opened file decides (so a name swapped for a FIFO after a check is
    refused too)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise RefusedFile(errno.EINVAL, f"not a regular file ({kind_of(mode)})", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a file"


def read_bounded(path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; TooLarge (nothing read) above it."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise TooLarge(errno.EFBIG, f"{size} bytes, more than the {limit} allowed", str(path))
        blob = f.read(limit + 1)  # the file may have grown since fstat
    if len(blob) > limit:
        raise TooLarge(errno.EFBIG, f"more than the {limit} bytes allowed", str(path))
    return blob


def read_json(path, limit: int = MAX_JSON_BYTES):
    """A JSON file of at most `limit` bytes (ValueError if it is not JSON, OSError if unreadable)."""
    return json.loads(read_bounded(path, limit))


def sha256(path, block: int = 1 << 24) -> str:
    """The SHA-256 of a regular file, read in 16 MiB blocks (a 2B model's 8 GB in constant memory)."""
    digest = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def plain_name(name) -> bool:
    """True for a bare file name (no folder part, not '.', '..' or hidden): joined to a folder it
    names a file inside that folder and nowhere else."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not name.startswith(".")
            and "/" not in name and "\\" not in name and "\0" not in name and os.path.basename(name) == name)


def probe_writable(folder):
    """Make the folder and write a few bytes into a file in it, or raise the OSError that says why not
    (a path through a file, a read-only disk, a full one). The probe is an anonymous temporary file
    (tempfile.TemporaryFile: O_TMPFILE, or a unique name unlinked at once), so that processes probing
    one folder at the same moment, as every torchrun rank does at start-up, never touch each other's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder) as probe:
        probe.write(b"ok")
        probe.flush()


# ----------------------------------------------------------------------------------------------
# Folder locks
# ----------------------------------------------------------------------------------------------


class FolderBusy(ValueError):
    """Another process holds the lock on a folder."""


class FolderLock:
    """A held lock on a folder; release() (or the end of the process) drops it."""

    def __init__(self, fd: int | None, path: Path):
        self.fd, self.path = fd, path

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


def holder_of(fd: int) -> tuple[str, str, str]:
    """(PID, host, purpose) as the holder wrote them into the lock file ('?' where missing)."""
    pid, host, purpose = (os.pread(fd, 4096, 0).decode("utf-8", "replace").strip().split(" ", 2) + ["?"] * 3)[:3]
    return pid, host, purpose


def pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return True  # not a number: cannot tell; EPERM: it exists
    return True


def lock_folder(folder, shared: bool = False, purpose: str = "") -> FolderLock:
    """Take the exclusive (or shared) lock on FOLDER/.lock without waiting, and write this
    process's PID, host and purpose into it; FolderBusy naming the holder otherwise. A folder that
    cannot be written and has no lock file (a read-only cache) is read unlocked: nothing can
    write it either. When the recorded holder is a process of this host that has ended, its
    children still hold the lock (forked DataLoader workers share the descriptor, and exit within
    seconds of their parent): wait for them up to ORPHAN_WAIT_S."""
    path, writable = Path(folder) / LOCK_NAME, True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        if not shared:
            raise
        try:
            fd, writable = os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
        except OSError:
            return FolderLock(None, path)
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while True:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pid, host, holder = holder_of(fd)
            if host == socket.gethostname() and not pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)  # the holder has ended; its children are exiting
                continue
            os.close(fd)
            raise FolderBusy(f"{Path(folder)} is in use by PID {pid} on host {host} ({holder}; lock file {path}): "
                             "wait for it to end or stop it, or use another folder")
    if writable:  # several readers may share the lock: the file names the last one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {purpose}\n".encode(), 0)
    return FolderLock(fd, path)
