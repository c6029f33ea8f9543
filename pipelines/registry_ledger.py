"""The registry's own state in MLflow: an append-only alias ledger, the alias moves written through
it, and the server-side promotion lock.

MLflow keeps only the current aliases (mlflow/mlflow issue 2169: no alias history), so cxrcf keeps
its history in the store itself, where every client sees it and it outlives the client: one MLflow
run per registered model (experiment `cxrcf-registry-state`), published as the tag
`cxrcf.state_run_id` of a registered model `<NAME>.cxrcf-registry`.

Both the ledger and the lock are built on one property of MLflow's stores: a run parameter can be
written once and never changed (the SQL stores back it with a primary key on (run, key), so of two
concurrent writers of one key with different values exactly one succeeds). That makes a parameter
a compare-and-set cell that the server arbitrates:

- ledger entry N is the parameter `ledger.<N>` (JSON): nobody can rewrite or reorder it, and two
  writers that race for the same N cannot both win;
- lock epoch N is taken by writing `lock.hold.<N>` = owner token and ended by writing
  `lock.free.<N>` = the owner's token (a release) or `broken-by <token>` (a stale holder broken by a
  waiter); a release only succeeds for the owner of an epoch nobody broke.

Staleness uses no client clock against the server's: the holder heartbeats by updating the
description of `<NAME>.cxrcf-registry` (the server stamps it), and a waiter declares the holder dead
only when that server-stamped heartbeat has not moved for `stale_s` of the waiter's own monotonic
time. Clocks on different machines are never compared.

Every alias move is a transaction over the ledger (`transact`): an intent naming the exact aliases
and tags it sets, the moves, then a completion. MLflow cannot move two aliases atomically, so a
crash between them leaves an intent without its completion, which `repair` rolls forward under the
lock; `history` and rollback's `champion_stack` read the same entries.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime

from cxrcf.errors import CxrcfError
from store.models import alias_map, connect, error_code, registered_model

STATE_SUFFIX = ".cxrcf-registry"
STATE_EXPERIMENT = "cxrcf-registry-state"
STATE_TAG = "cxrcf.state_run_id"
LEDGER_PREFIX = "ledger."
HOLD, FREE = "lock.hold.", "lock.free."
PARAM_LIMIT = 6000  # MLflow's longest parameter value
MAX_ERRORS = 6  # consecutive MLflow errors before a lock wait gives up (backoff 0.2 s .. 6.4 s)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def _exists_error(err) -> bool:
    return "RESOURCE_ALREADY_EXISTS" in error_code(err) or "already exists" in str(err).lower()


def _missing_error(err) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in error_code(err) or "not found" in str(err).lower()


def _backoff(attempt: int, base: float = 0.2, cap: float = 6.4) -> float:
    return min(cap, base * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)


class RegistryState:
    """The state run of one registered model: its ledger and its lock cells."""

    def __init__(self, client, name: str):
        self.client = client
        self.name = name
        self.holder_model = f"{name}{STATE_SUFFIX}"
        self._run_id: str | None = None

    # ------------------------------------------------------------------------------- the state run
    @property
    def run_id(self) -> str:
        if self._run_id is None:
            self._run_id = self._find_or_create()
        return self._run_id

    def _find_or_create(self) -> str:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(self.holder_model).tags[STATE_TAG]
        except MlflowException as err:
            if not _missing_error(err):
                raise
        exp_id = self._experiment()
        run = self.client.create_run(exp_id, run_name=f"registry-state:{self.name}",
                                     tags={"cxrcf.registry_state": self.name})
        try:
            # Creating a registered model is atomic (unique name): of two first users, one publishes
            # its run and the other adopts it, so there is never more than one ledger per model.
            self.client.create_registered_model(
                self.holder_model, tags={STATE_TAG: run.info.run_id},
                description=f"cxrcf registry state of {self.name!r} (alias ledger and promotion lock)")
            return run.info.run_id
        except MlflowException as err:
            if not _exists_error(err):
                raise
            with contextlib.suppress(MlflowException):
                self.client.delete_run(run.info.run_id)
            return self.client.get_registered_model(self.holder_model).tags[STATE_TAG]

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(STATE_EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(STATE_EXPERIMENT)
        except MlflowException as err:
            if not _exists_error(err):
                raise
            return self.client.get_experiment_by_name(STATE_EXPERIMENT).experiment_id

    def params(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.params)

    def put_once(self, key: str, value: str) -> bool:
        """Write parameter `key` unless it exists: True when `value` is what the store now holds."""
        from mlflow.exceptions import MlflowException

        if len(value) > PARAM_LIMIT:
            raise CxrcfError(f"registry state {key}: entry of {len(value)} characters exceeds MLflow's "
                             f"{PARAM_LIMIT}-character parameter limit")
        try:
            self.client.log_param(self.run_id, key, value)
            return True
        except MlflowException:
            # A refused change and a lost reply look alike; what the store holds decides.
            held = self.params().get(key)
            if held is None:
                raise
            return held == value

    # -------------------------------------------------------------------------------------- ledger
    def entries(self, params: dict[str, str] | None = None) -> list[dict]:
        params = self.params() if params is None else params
        out = []
        for key, value in params.items():
            if key.startswith(LEDGER_PREFIX):
                try:
                    entry = json.loads(value)
                except json.JSONDecodeError:
                    raise CxrcfError(f"registry ledger of {self.name!r}: entry {key} is not JSON") from None
                out.append(entry)
        return sorted(out, key=lambda e: e["seq"])

    def append(self, entry: dict) -> dict:
        """Append one entry (seq, at, by and id added); returns it as stored."""
        for _ in range(50):
            seqs = [int(k[len(LEDGER_PREFIX):]) for k in self.params() if k.startswith(LEDGER_PREFIX)]
            seq = max(seqs, default=0) + 1
            stored = {"seq": seq, "at": now(), "by": who(), "id": uuid.uuid4().hex[:12], **entry}
            if self.put_once(f"{LEDGER_PREFIX}{seq:06d}", json.dumps(stored, separators=(",", ":"))):
                return stored
        raise CxrcfError(f"registry ledger of {self.name!r}: could not append after 50 contended attempts")

    # ---------------------------------------------------------------------------------------- lock
    @staticmethod
    def lock_state(params: dict[str, str]) -> tuple[int, str | None, bool]:
        """(latest epoch, its owner token, whether it has ended)."""
        holds = {int(k[len(HOLD):]): v for k, v in params.items() if k.startswith(HOLD)}
        frees = {int(k[len(FREE):]) for k in params if k.startswith(FREE)}
        epoch = max(holds, default=0)
        return epoch, holds.get(epoch), epoch == 0 or epoch in frees

    def heartbeat_mark(self) -> tuple[str, int]:
        rm = self.client.get_registered_model(self.holder_model)
        return rm.description or "", int(rm.last_updated_timestamp or 0)

    def beat(self, epoch: int, token: str, count: int) -> None:
        self.client.update_registered_model(
            self.holder_model, description=f"promotion lock epoch {epoch} held by {token} (heartbeat {count})")


@contextlib.contextmanager
def server_lock(client, name: str, timeout_s: float, stale_s: float,
                on_wait=None) -> Iterator[dict]:
    """Hold lock epoch N of `name` for the block; yields {epoch, token, waited_s}.

    Bounded: waiting ends after `timeout_s`, and `MAX_ERRORS` consecutive MLflow errors (each retried
    after an exponential backoff with jitter) end it too, with one message naming the store.
    """
    from mlflow.exceptions import MlflowException

    state = RegistryState(client, name)
    token = f"{who()}:{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    deadline = started + timeout_s
    errors, polls = 0, 0
    seen: tuple | None = None  # (epoch, heartbeat mark, monotonic time it was first seen)
    epoch = 0
    while True:
        try:
            params = state.params()
            current, owner, ended = state.lock_state(params)
            if ended:
                if state.put_once(f"{HOLD}{current + 1:06d}", token):
                    epoch = current + 1
                    state.beat(epoch, token, 0)
                    break
                continue  # another waiter took epoch current+1: judge the new holder
            mark = state.heartbeat_mark()
            if seen is None or seen[:2] != (current, mark):
                seen = (current, mark, time.monotonic())
            elif time.monotonic() - seen[2] > stale_s:
                # Ending the epoch is itself a compare-and-set: of several waiters that judged the
                # holder dead, and the holder releasing late, exactly one write wins.
                if state.put_once(f"{FREE}{current:06d}", f"broken-by {token}"):
                    print(f"registry: broke the promotion lock of {name!r} (epoch {current}, holder {owner}: "
                          f"no heartbeat for {stale_s:.1f} s)", file=sys.stderr, flush=True)
                seen = None
                continue
            errors = 0
        except MlflowException as err:
            errors += 1
            if errors >= MAX_ERRORS:
                raise CxrcfError(f"{client.tracking_uri}: promotion lock of {name!r} failed {errors} times in a "
                                 f"row ({error_code(err) or type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:200]})") from None
            time.sleep(_backoff(errors))
            continue
        if polls == 0 and on_wait is not None:
            on_wait(f"{client.tracking_uri} run {state.run_id}, epoch {current} held by {owner}")
        polls += 1
        if time.monotonic() > deadline:
            raise CxrcfError(f"model {name!r}: promotion lock epoch {current} still held by {owner} after "
                             f"{timeout_s:.0f} s (it is broken once its heartbeat stops for {stale_s:.0f} s)")
        time.sleep(min(1.0, _backoff(polls, base=0.05, cap=1.0)))

    waited = time.monotonic() - started
    stop = threading.Event()

    def heartbeat() -> None:
        count = 0
        while not stop.wait(max(0.05, stale_s / 4)):
            count += 1
            with contextlib.suppress(MlflowException, OSError):
                state.beat(epoch, token, count)

    def still_held() -> None:
        # A fence before each write: a holder whose heartbeats stalled past `stale_s` may have been
        # broken by a waiter, and must stop rather than interleave with the new holder.
        ended_by = state.params().get(f"{FREE}{epoch:06d}")
        if ended_by is not None:
            raise CxrcfError(f"model {name!r}: this process lost promotion lock epoch {epoch} ({ended_by}: no "
                             f"heartbeat reached {client.tracking_uri} for {stale_s:.1f} s); the next command "
                             f"completes what it started")

    beater = threading.Thread(target=heartbeat, name=f"cxrcf-lock-heartbeat-{name}", daemon=True)
    beater.start()
    try:
        yield {"epoch": epoch, "token": token, "waited_s": waited, "check": still_held}
    finally:
        stop.set()
        beater.join()
        released = False
        for attempt in range(1, MAX_ERRORS + 1):
            try:
                released = state.put_once(f"{FREE}{epoch:06d}", token)
                break
            except MlflowException:
                time.sleep(_backoff(attempt))
        if not released:
            ended_by = state.params().get(f"{FREE}{epoch:06d}", "nobody (the release never reached the store)")
            print(f"registry: promotion lock epoch {epoch} of {name!r} was ended by {ended_by} while this "
                  f"process held it", file=sys.stderr, flush=True)


# ----------------------------------------------------------------- alias moves as transactions
def ledger(name: str, client=None) -> RegistryState:
    return RegistryState(client or connect(), name)


def _set_aliases(client, name: str, moves: Mapping[str, str | None]) -> None:
    from mlflow.exceptions import MlflowException

    for alias, version in moves.items():
        if version:
            client.set_registered_model_alias(name, alias, str(version))
        else:
            try:
                client.delete_registered_model_alias(name, alias)
            except MlflowException as err:
                if not _missing_error(err):
                    raise


def _finish(client, name: str, intent: dict, check) -> None:
    """Apply an intent's alias moves and version tags (idempotent: a repair runs it again)."""
    check()
    _set_aliases(client, name, intent["moves"])
    after = alias_map(client, name)
    wrong = {a: after.get(a) for a, v in intent["moves"].items() if after.get(a) != (str(v) if v else None)}
    if wrong:
        raise CxrcfError(f"model {name!r}: aliases {wrong} differ from what intent #{intent['seq']} just set; "
                         f"another writer bypassed the promotion lock")
    check()
    for version, tags in intent.get("tags", {}).items():
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)


def transact(client, state: RegistryState, entry: dict, check) -> dict:
    """Intent -> alias moves -> version tags -> completion; a crash leaves an intent for `repair`."""
    check()
    intent = state.append({"type": "intent", **entry})
    _finish(client, state.name, intent, check)
    check()
    state.append({"type": "complete", "op": intent["seq"], "action": intent["action"]})
    return intent


def pending(entries: list[dict]) -> list[dict]:
    done = {e["op"] for e in entries if e["type"] in ("complete", "abort")}
    return [e for e in entries if e["type"] == "intent" and e["seq"] not in done]


def repair(client, state: RegistryState, check) -> list[dict]:
    """Complete every intent that a crashed command left without a completion (call under the lock).

    Rolling forward is always right here: an intent is written only after its gates passed and
    records the exact aliases and tags it sets, so finishing it is what the crashed command would
    have done.
    """
    done = []
    for intent in pending(state.entries()):
        print(f"registry: completing the interrupted {intent['action']} of {state.name!r} "
              f"(ledger #{intent['seq']} by {intent['by']} at {intent['at']})", file=sys.stderr, flush=True)
        _finish(client, state.name, intent, check)
        check()
        state.append({"type": "complete", "op": intent["seq"], "action": intent["action"], "repaired": True})
        done.append(intent)
    return done


def champion_stack(entries: list[dict]) -> list[str]:
    """The champions that rollback walks back through, oldest first, as the ledger says.

    A promotion pushes its version; a rollback to version V pops back to V's most recent place, so
    repeated rollbacks walk back one promotion each and a rollback is never rolled back into.
    """
    done = {e["op"] for e in entries if e["type"] == "complete"}
    stack: list[str] = []
    for e in entries:
        if e["type"] != "intent" or e["seq"] not in done:
            continue
        if e["action"] == "promote":
            stack.append(e["version"])
        elif e["action"] == "rollback":
            target = e["version"]
            if target in stack:
                del stack[len(stack) - stack[::-1].index(target):]
            else:
                stack = [target]
    return stack


def _gate_cell(gate: dict) -> str:
    value = "missing" if gate["value"] is None else f"{gate['value']:.4g}"
    return f"{gate['name']}={value}{'' if gate['passed'] else ' FAIL'}"


def history(name: str, client=None) -> list[dict]:
    """One row per alias move or refusal, oldest first, from the ledger (status: done/PENDING/aborted)."""
    client = client or connect()
    registered_model(client, name)
    entries = ledger(name, client).entries()
    closing = {e["op"]: e for e in entries if e["type"] in ("complete", "abort")}
    rows = []
    for e in entries:
        if e["type"] not in ("intent", "refused"):
            continue
        end = closing.get(e["seq"])
        status = "refused" if e["type"] == "refused" else (
            "PENDING" if end is None else "aborted" if end["type"] == "abort"
            else "repaired" if end.get("repaired") else "done")
        moves = ", ".join(f"{a}: {e.get('from', {}).get(a) or '-'} -> {v or '-'}" for a, v in e.get("moves", {}).items())
        gates = "; ".join(_gate_cell(g) for g in e.get("gates", []))
        rows.append({"seq": e["seq"], "at": e["at"], "by": e["by"], "action": e["action"],
                     "version": e.get("version"), "moves": moves or "-", "decision": e.get("decision", ""),
                     "status": status, "gates": gates, "reason": e.get("reason", "")})
    return rows
