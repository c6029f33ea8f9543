"""The promotion lock: one per registered model, held by every alias move (register, promote,
rollback, repair).

Alias moves are read-check-write sequences; two of them interleaving could leave `champion` and
`previous-champion` disagreeing with the recorded decisions. Where the lock lives follows the store:
an OS file lock beside a SQLite file, the store itself (`registry_ledger.server_lock`) otherwise.
The waits are settings (`CXRCF_REGISTRY_LOCK_WAIT_S`, `CXRCF_REGISTRY_LOCK_STALE_S`) because how long
a healthy holder takes depends on the machine and the store, not on the code.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from cxrcf.errors import CxrcfError
from pipelines.registry_ledger import server_lock
from store.models import connect

LOCK_WAIT_S = 120.0
SERVER_LOCK_STALE_S = 300.0  # a server-side lock older than this belongs to a dead process


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).resolve()
    return None


def _waiting(name: str, where: str) -> None:
    print(f"registry: waiting for the promotion lock on {name!r} ({where})", file=sys.stderr, flush=True)


def _seconds_env(key: str, default: float) -> float:
    raw = os.environ.get(key, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise CxrcfError(f"{key}={raw!r}: expected seconds (a number)") from None
    if not value > 0:
        raise CxrcfError(f"{key}={raw!r}: must be positive")
    return value


def lock_stale_s() -> float:
    return _seconds_env("CXRCF_REGISTRY_LOCK_STALE_S", SERVER_LOCK_STALE_S)


def lock_wait_s() -> float:
    return _seconds_env("CXRCF_REGISTRY_LOCK_WAIT_S", LOCK_WAIT_S)


@contextlib.contextmanager
def promotion_lock(name: str, client=None, timeout_s: float | None = None,
                   stale_s: float | None = None) -> Iterator[dict]:
    """Serialise every alias move of one registered model (register, promote, rollback, repair).

    A SQLite store is a local file, so an OS file lock beside it serialises every process on the
    machine and is released by the kernel even when its holder dies. Any other store is shared by
    machines, so the lock lives in the store (`registry_ledger.server_lock`: owner tokens, epochs
    taken and ended by compare-and-set, heartbeats stamped by the server, bounded retries).
    Yields {waited_s, epoch, token, check}: `check()` raises when the lock was lost (a fence before writes).
    """
    client = client or connect()
    timeout_s = lock_wait_s() if timeout_s is None else timeout_s
    db = _sqlite_path(client.tracking_uri)
    if db is not None:
        with _file_lock(db.with_name(f".{db.name}.promotion.lock"), name, timeout_s) as held:
            yield held
    else:
        with server_lock(client, name, timeout_s, lock_stale_s() if stale_s is None else stale_s,
                         on_wait=lambda where: _waiting(name, where)) as held:
            yield held


@contextlib.contextmanager
def _file_lock(path: Path, name: str, timeout_s: float) -> Iterator[dict]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(path, "a+") as handle:
        deadline = started + timeout_s
        told = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    _waiting(name, str(path))
                    told = True
                if time.monotonic() > deadline:
                    raise CxrcfError(f"{path}: promotion lock still held after {timeout_s:.0f} s") from None
                time.sleep(0.05)
        try:
            # The kernel never takes a flock from a live holder: nothing to fence.
            yield {"waited_s": time.monotonic() - started, "epoch": None, "token": f"flock:{os.getpid()}",
                   "check": lambda: None}
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
