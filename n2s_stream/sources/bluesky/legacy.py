"""The bookkeeping older ophyd area detectors need.

Their frames are announced in three steps: a ``resource`` names the file, one ``datum``
per point names the resource and the point number, and each ``event`` names, for the
detector's data key (``external: FILESTORE:`` in its descriptor), the datum. This class
keeps the resources and datums until their event comes and turns each event into
`LegacyPoint` s: which resource, which point, which event. Reading the file is the
source's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from n2s_stream.sources.bluesky.documents import datums

DATUMS_KEPT = 100_000
"""Datums waiting for their event; beyond, the oldest are forgotten."""


@dataclass(frozen=True)
class LegacyPoint:
    """One image key's frames in one event of an older area detector."""

    run_start: str
    data_key: str
    descriptor: str
    resource: str  # the resource's uid
    point: int  # the point number: frames point * frame_per_point onwards
    seq_num: int  # the event's


class LegacyDocuments:
    """Resources, datums and descriptors of older area detectors, until their events."""

    def __init__(self, data_key: str | None) -> None:
        self._wanted = data_key  # only this key's frames, if set
        self._runs: dict[str, str] = {}  # descriptor uid: its run
        self._keys: dict[str, set[str]] = {}  # run: its keys held in files
        self._resources: dict[str, dict[str, Any]] = {}  # resources not yet followed
        self._datums: dict[str, tuple[str, int]] = {}  # datum id: (resource, point number)

    def add(self, name: str, document: dict[str, Any]) -> None:
        """Keep what a ``descriptor``, ``resource``, ``datum`` or ``datum_page`` says."""
        if name == "descriptor":
            self._runs[str(document["uid"])] = str(document["run_start"])
            keys = self._keys.setdefault(str(document["run_start"]), set())
            for key, data_key in document["data_keys"].items():
                if isinstance(data_key, dict) and str(data_key.get("external", "")).startswith(
                    "FILESTORE"
                ):
                    keys.add(key)
        elif name == "resource":
            self._resources[str(document["uid"])] = document
        elif name in ("datum", "datum_page"):
            for datum_id, point in datums(document, name):
                self._datums[datum_id] = (str(document["resource"]), point)
            if len(self._datums) > DATUMS_KEPT:  # datums of events we will never see
                for datum_id in list(self._datums)[: DATUMS_KEPT // 10]:
                    del self._datums[datum_id]

    def restore(self, descriptors: list[str], run_start: str, data_key: str) -> None:
        """A stream followed before a restart: its descriptors' events find it again."""
        for descriptor in descriptors:
            self._runs[descriptor] = run_start
        self._keys.setdefault(run_start, set()).add(data_key)

    def points(self, event: dict[str, Any]) -> list[LegacyPoint]:
        """The image frames ``event`` names, one per data key held in files (their datums
        are used up; a run or datum from before we listened yields none)."""
        descriptor = str(event["descriptor"])
        run_start = self._runs.get(descriptor)
        if run_start is None:  # a run we joined late: its datums go too
            for value in event["data"].values():
                if isinstance(value, str):
                    self._datums.pop(value, None)
            return []
        found = []
        for key in sorted(self._keys.get(run_start, set()) & set(event["data"])):
            located = self._datums.pop(str(event["data"][key]), None)
            if located is None or (self._wanted is not None and key != self._wanted):
                continue
            found.append(
                LegacyPoint(
                    run_start, key, descriptor, located[0], located[1], int(event["seq_num"])
                )
            )
        return found

    def take_resource(self, uid: str) -> dict[str, Any] | None:
        """The resource ``uid``, handed over once (None: not seen, or already taken)."""
        return self._resources.pop(uid, None)

    def forget_run(self, run_start: str, ended: set[str]) -> None:
        """Drop what was kept of a stopped run (``ended``: its followed resources)."""
        self._keys.pop(run_start, None)
        for uid in [u for u, run in self._runs.items() if run == run_start]:
            del self._runs[uid]
        ended = ended | {u for u, r in self._resources.items() if r.get("run_start") == run_start}
        for uid in ended:
            self._resources.pop(uid, None)
        for datum_id in [d for d, (resource, _) in self._datums.items() if resource in ended]:
            del self._datums[datum_id]
