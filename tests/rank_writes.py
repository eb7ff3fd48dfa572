"""Run train.py as one torchrun rank, recording every file this rank creates, writes, renames or deletes
below a folder (Python's audit hooks: open, os.remove, os.rename, shutil.rmtree, …), so that a test can
show that no two ranks touch one file name: two ranks writing and deleting the same name race, and the
loser stops with an error (a probe file of one name in --out did, under load).

    torchrun --nproc_per_node 2 tests/rank_writes.py RECORD WATCHED train.py [train.py's flags]

writes RECORD-rank<RANK>.json: the sorted paths below WATCHED this rank wrote or removed. An anonymous
file (O_TMPFILE) names its folder, not a file, and is left out; so is a folder made by mkdir (made
with exist_ok by each rank, as torch.distributed.checkpoint makes its folder, which cannot race).
Files written by native code raise no audit event: safetensors' save_file and torch.save are wrapped
to raise one ("rank_writes.save").
"""
from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
O_TMPFILE = getattr(os, "O_TMPFILE", 0)


def writes_of(event: str, args: tuple) -> list:
    """The paths an audit event writes or removes ([] for the rest)."""
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int) or (O_TMPFILE and flags & O_TMPFILE == O_TMPFILE):
            return []
        writing = bool(flags & WRITE_FLAGS) if mode is None else any(c in str(mode) for c in "wax+")
        return [path] if writing else []
    if event in ("os.remove", "os.rmdir", "os.truncate", "shutil.rmtree"):
        return [args[0]]
    if event == "os.rename":  # os.rename and os.replace
        return [args[0], args[1]]
    if event == "rank_writes.save":
        return [args[0]]
    return []


def announced(save, where: int):
    """`save`, raising the audit event rank_writes.save with the path it writes (argument `where`)."""
    def announcing(*args, **kwargs):
        if isinstance(args[where] if len(args) > where else None, (str, bytes, os.PathLike)):
            sys.audit("rank_writes.save", args[where])
        return save(*args, **kwargs)
    return announcing


def main():
    record, watched, script = sys.argv[1], Path(sys.argv[2]).resolve(), sys.argv[3]
    touched: set[str] = set()

    def hook(event, args):
        for path in writes_of(event, args):
            if isinstance(path, (str, bytes, os.PathLike)):
                full = Path(os.fsdecode(path)).resolve()
                if full.is_relative_to(watched) and not (event == "open" and full.is_dir()):
                    touched.add(str(full))
    sys.addaudithook(hook)
    import safetensors.torch
    import torch
    safetensors.torch.save_file = announced(safetensors.torch.save_file, 1)  # (tensors, filename)
    torch.save = announced(torch.save, 1)                                     # (obj, f)

    def save():
        names = sorted(touched)  # copied before writing: the write is an event too
        Path(f"{record}-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(names))
    atexit.register(save)
    sys.argv = [script, *sys.argv[4:]]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
