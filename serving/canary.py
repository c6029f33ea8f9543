"""The canary (serve.canary): a second model slot following the `candidate` alias beside the
champion's, the arm each request goes to, shadow copies, and online effectiveness per arm.

The arm is a pure function of X-Request-ID, so replicas agree without talking to each other, a
client's retry lands in the same arm, and raising the weight only adds requests to the candidate.
Nothing here may fail a request: no candidate is a normal state (the champion answers everything),
and a shadow is only scored, bounded, and dropped first under load. Why both models live in one
replica is in serving/app.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from cxrcf.config import CanaryConfig, ServeConfig
from serving.engine import Item, ItemResult
from serving.policy import one_line
from serving.schemas import ArmStats, CanaryInfo, probabilities

if TYPE_CHECKING:
    from serving.app import ModelSlot, ModelSource

log = logging.getLogger("ray.serve")

ARMS = ("champion", "candidate", "shadow")
Record = Callable[[str, float, dict[str, str] | None], None]
Batched = Callable[[tuple[str, Item]], Awaitable[tuple[ItemResult, dict]]]


def share(request_id: str, salt: str) -> float:
    """Where `request_id` falls in [0, 1): the same id always lands in the same place (replicas agree,
    a client can retry into the same arm, and tests can pick ids), and `salt` decorrelates the draws."""
    digest = hashlib.sha256(f"{salt}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def route(request_id: str, canary: CanaryConfig) -> tuple[str, bool]:
    """(the arm that answers, whether a copy goes to the candidate as a shadow)."""
    if share(request_id, "weight") < canary.weight:
        return "candidate", False
    return "champion", share(request_id, "shadow") < canary.shadow


class CanaryTally:
    """Online effectiveness per arm: the evaluation predictor's probability of each intervened value
    on the counterfactual (age: absolute error in years), as running means and as metrics."""

    def __init__(self, record: Record):
        self._record = record
        self.requests = dict.fromkeys(ARMS, 0)
        self.versions: dict[str, str | None] = dict.fromkeys(ARMS)
        self.sums: dict[str, dict[str, float]] = {arm: {} for arm in ARMS}
        self.counts: dict[str, dict[str, int]] = {arm: {} for arm in ARMS}
        self.shadow_skipped = 0
        self.shadow_failed = 0

    def observe(self, arm: str, version: str, interventions: list[dict], result: ItemResult) -> None:
        self.requests[arm] += 1
        self.versions[arm] = version
        self._record("arm_requests", 1, {"arm": arm, "version": version})
        for do, cf in zip(interventions, result.counterfactuals):
            p = probabilities(cf["probabilities"])
            for attr, value in do.items():
                if attr == "age":
                    key, score = "age_error_years", abs(p.age - float(value))
                    self._record("online_age_error", score, {"arm": arm, "version": version})
                else:
                    key, score = attr, getattr(p, attr)[value]
                    self._record("online_effectiveness", score, {"arm": arm, "version": version, "attribute": attr})
                self.sums[arm][key] = self.sums[arm].get(key, 0.0) + score
                self.counts[arm][key] = self.counts[arm].get(key, 0) + 1

    def arms(self) -> dict[str, ArmStats]:
        return {arm: ArmStats(requests=self.requests[arm], version=self.versions[arm],
                              effectiveness={k: self.sums[arm][k] / n for k, n in self.counts[arm].items()})
                for arm in ARMS}


class Canary:
    """One replica's canary: the candidate's slot, the shadow copies in flight and the tally.

    `open_slot` builds a slot (serving.app.ModelSlot) and `settings` returns the replica's current
    ServeConfig: both are passed in because serving.app builds this object and owns them.
    """

    def __init__(self, champion: ModelSource, open_slot: Callable[[ModelSource, ServeConfig], ModelSlot],
                 settings: Callable[[], ServeConfig], record: Record):
        self._champion = champion
        self._open_slot = open_slot
        self._settings = settings
        self._record = record
        self.slot: ModelSlot | None = None
        self.error: str | None = None
        self.tally = CanaryTally(record)
        self._lock = threading.Lock()
        self._shadows: set[asyncio.Task] = set()
        self._stop = threading.Event()

    def start(self) -> None:
        """Load the candidate now when configured (so the first request can go to it), and retry it
        from a thread while it is missing."""
        self.sync()
        threading.Thread(target=self._retry, name="cxrcf-candidate", daemon=True).start()

    def stop(self) -> None:
        if self.slot is not None:
            self.slot.stop()
        self._stop.set()

    def sync(self) -> None:
        """Load, keep or drop the candidate's slot as serve.canary now says (never raises)."""
        cfg = self._settings()
        with self._lock:
            held = self.slot
            if held is not None and (not cfg.canary.on or held.source.alias != cfg.canary.alias):
                held.stop()
                self.slot = held = None
            if not cfg.canary.on:
                self.error = None
                return
            if held is not None:
                held.follow(cfg)
                return
            source = self._champion.model_copy(update={"alias": cfg.canary.alias, "version": None})
            try:
                slot = self._open_slot(source, cfg)
            except Exception as err:  # noqa: BLE001 -- no candidate is a normal state: all traffic to the champion
                self.error = one_line(err)
                log.info("cxrcf: canary: no candidate from %s (%s); the champion answers everything",
                         source.uri(), self.error)
                return
            slot.follow(cfg)
            self.slot, self.error = slot, None

    def _retry(self) -> None:
        while not self._stop.wait(self._settings().reload_poll_s):
            if self.slot is None and self._settings().canary.on:
                self.sync()

    def live(self) -> ModelSlot | None:
        slot = self.slot
        return slot if slot is not None and not slot.withdrawn else None

    def shadow(self, batched: Batched, item: Item, max_pending: int) -> None:
        # bounded: under load the shadow is what gives way, not the answers
        if len(self._shadows) >= max_pending:
            self.tally.shadow_skipped += 1
            self._record("shadow_skipped", 1, None)
            return
        task = asyncio.get_running_loop().create_task(self._mirror(batched, item))
        self._shadows.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._shadows.discard)

    async def _mirror(self, batched: Batched, item: Item) -> None:
        """The shadow: the candidate's answer to a copy of a request, scored and dropped."""
        try:
            result, ref = await batched(("candidate", item))
        except Exception as err:  # noqa: BLE001 -- a failing shadow must never touch the champion's answers
            self.tally.shadow_failed += 1
            self._record("shadow_failures", 1, None)
            log.warning("cxrcf: canary: a shadow request failed (%s)", one_line(err))
            return
        if ref["arm"] != "candidate":
            return  # the candidate left between routing and batching: the champion's answer says nothing of it
        self.tally.observe("shadow", ref["version"], item.interventions, result)

    def info(self) -> CanaryInfo | None:
        """The `canary` block of GET /v1/model; None while the canary is off and has never answered."""
        canary = self._settings().canary
        if not canary.on and not any(self.tally.requests.values()):
            return None
        slot = self.slot
        return CanaryInfo(alias=canary.alias, weight=canary.weight, shadow=canary.shadow,
                          candidate_version=slot.state.version if slot else None,
                          candidate_state=slot.alias_state() if slot else None,
                          candidate_error=self.error, shadow_pending=len(self._shadows),
                          shadow_skipped=self.tally.shadow_skipped, shadow_failed=self.tally.shadow_failed,
                          arms=self.tally.arms())
