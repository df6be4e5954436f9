"""Static scheduling of a task DAG onto pools of identical units (shared by the systolic and
dataflow backends).

* A :class:`Problem` is built one task at a time with :meth:`Problem.add`. Task ids are
  consecutive ints and a task may only depend on earlier ids, so id order is a topological
  order and the graph is a DAG by construction. Tasks live in flat arrays (CSR for the deps):
  a million tasks cost a few tens of MB, mostly their names.
* :func:`list_schedule` is non-preemptive list scheduling with critical-path priority, run as an
  event-driven simulation: O(E + V log V), deterministic.
* A :class:`Schedule` holds ``start``/``end``/``unit`` arrays, the two lower bounds (critical path,
  busiest resource) and checks itself with :meth:`Schedule.verify`.
  :func:`schedule_from_start_times` wraps start times computed elsewhere so a backend can check
  its own static schedule against the same rules and bounds.
"""
from __future__ import annotations

import heapq
import operator
from array import array
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np


class ScheduleError(ValueError):
    """A schedule breaks a dependency or runs two tasks at once on one unit."""


@dataclass(frozen=True)
class Resource:
    """A pool of ``count`` identical units, e.g. ``Resource("vector", 2)``."""

    name: str
    count: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Resource name must be a non-empty string, not {self.name!r}")
        if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 1:
            raise ValueError(f"Resource {self.name!r}: count must be a positive integer, not {self.count!r}")


class _Tasks:
    """A numpy snapshot of the first ``n`` tasks of a Problem (what a Schedule refers to)."""

    def __init__(self, p: Problem) -> None:
        self.n = len(p)
        self.resources = p.resources
        self.names, self.metas = p._names, p._meta        # append-only: ids < n never change
        self.res = np.array(p._res, dtype=np.int32)
        self.dur = np.array(p._dur, dtype=np.int64)
        self.dep_ptr = np.array(p._dep_ptr, dtype=np.int64)
        self.dep_idx = np.array(p._dep_idx, dtype=np.int64)
        self.count = np.array([r.count for r in self.resources], dtype=np.int64)
        self._bottom: np.ndarray | None = None

    @property
    def bottom(self) -> np.ndarray:
        """Longest path from each task to any sink, including the task's own duration."""
        if self._bottom is None:
            self._bottom = np.frombuffer(_bottom_levels(self), dtype=np.int64).copy()
        return self._bottom

    def busy(self) -> np.ndarray:
        """Total duration per resource."""
        total = np.zeros(len(self.resources), dtype=np.int64)
        np.add.at(total, self.res, self.dur)
        return total

    def label(self, i: int) -> str:
        return f"task {self.names[i]!r} (id {i})"


def _bottom_levels(t: _Tasks) -> array:
    # ids are a topological order: walk them backwards, pushing each level onto its deps
    # array.array, not lists: a list of a million big ints costs ~40 MB, an array 8 MB
    dur, ptr, idx = array("q", t.dur.tobytes()), array("q", t.dep_ptr.tobytes()), array("q", t.dep_idx.tobytes())
    tail = array("q", bytes(8 * t.n))
    for i in range(t.n - 1, -1, -1):
        b = dur[i] + tail[i]
        dur[i] = b
        for d in idx[ptr[i]:ptr[i + 1]]:
            if tail[d] < b:
                tail[d] = b
    return dur


class Problem:
    """Tasks on resources with dependencies, built incrementally.

    >>> p = Problem([Resource("dma"), Resource("array")])
    >>> load = p.add("load w0", "dma", 64, layer="fc1")
    >>> mm = p.add("matmul", "array", 128, deps=[load], layer="fc1")
    """

    def __init__(self, resources: Iterable[Resource]) -> None:
        self.resources: tuple[Resource, ...] = tuple(resources)
        self._res_index: dict[str, int] = {}
        for i, r in enumerate(self.resources):
            if not isinstance(r, Resource):
                raise ValueError(f"resources must be Resource records, not {r!r}")
            if r.name in self._res_index:
                raise ValueError(f"duplicate resource name {r.name!r}")
            self._res_index[r.name] = i
        self._names: list[str] = []
        self._res = array("i")
        self._dur = array("q")
        self._dep_ptr = array("q", [0])
        self._dep_idx = array("q")
        self._meta: dict[int, dict[str, Any]] = {}    # only tasks that were given meta
        self._snapshot: _Tasks | None = None

    def add(self, name: str, resource: str, duration: int, deps: Iterable[int] = (), **meta: Any) -> int:
        """Append a task and return its id. ``deps`` are ids of earlier tasks; ``duration`` is in
        cycles; ``meta`` (e.g. ``layer=``, ``kind=``) is carried into reports and traces."""
        tid = len(self._names)
        r = self._res_index.get(resource)
        if r is None:
            raise ValueError(f"task {name!r}: unknown resource {resource!r}; "
                             f"the resources are {', '.join(map(repr, self._res_index))}")
        if type(duration) is not int:
            duration = _integer(duration, f"task {name!r}: duration must be an integer number of cycles")
        if duration < 0:
            raise ValueError(f"task {name!r}: duration must be >= 0 cycles, not {duration}")
        if not isinstance(deps, (list, tuple)):
            deps = list(deps)
        for d in deps:
            if type(d) is not int:
                d = _integer(d, f"task {name!r}: dependency must be a task id")
            if not 0 <= d < tid:
                raise ValueError(f"task {name!r}: dependency {d} is not the id of an earlier task "
                                 f"(ids so far: 0..{tid - 1})")
        self._dep_idx.extend(deps)
        self._dep_ptr.append(len(self._dep_idx))
        self._names.append(name)
        self._res.append(r)
        self._dur.append(duration)
        if meta:
            self._meta[tid] = meta
        return tid

    def __len__(self) -> int:
        return len(self._names)

    @property
    def n_deps(self) -> int:
        """Number of dependency edges."""
        return len(self._dep_idx)

    def name(self, tid: int) -> str:
        return self._names[tid]

    def meta(self, tid: int) -> dict[str, Any]:
        return self._meta.get(tid, {})

    def deps(self, tid: int) -> list[int]:
        return self._dep_idx[self._dep_ptr[tid]:self._dep_ptr[tid + 1]].tolist()

    def _tasks(self) -> _Tasks:
        if self._snapshot is None or self._snapshot.n != len(self):
            self._snapshot = _Tasks(self)
        return self._snapshot


def _integer(value: Any, message: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{message}, not {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{message}, not {value!r}") from None


class Schedule:
    """Start/end cycle and unit of every task of a Problem.

    ``start``, ``end`` (int64) and ``unit`` (int32, which unit of the task's resource) are
    read-only arrays indexed by task id. A task occupies its unit over ``[start, end)``.
    """

    def __init__(self, problem: Problem, start: Sequence[int], end: Sequence[int], unit: Sequence[int]) -> None:
        self.problem = problem
        self._t = problem._tasks()
        self.start = _frozen(start, np.int64, self._t.n, "start")
        self.end = _frozen(end, np.int64, self._t.n, "end")
        self.unit = _frozen(unit, np.int32, self._t.n, "unit")

    def __len__(self) -> int:
        return self._t.n

    # --- bounds ---------------------------------------------------------------------------
    @property
    def makespan(self) -> int:
        return int(self.end.max()) if self._t.n else 0

    @property
    def critical_path(self) -> int:
        """Longest dependency path (sum of durations): lower bound 1 on any makespan."""
        return int(self._t.bottom.max()) if self._t.n else 0

    @property
    def resource_bound(self) -> int:
        """Max over resources of ceil(total duration / units): lower bound 2 on any makespan."""
        if not self._t.resources:
            return 0
        return int((-(-self._t.busy() // self._t.count)).max())

    @property
    def lower_bound(self) -> int:
        return max(self.critical_path, self.resource_bound)

    @property
    def ratio(self) -> float:
        """makespan / lower_bound (1.0 is optimal; 1.0 also for an empty or all-zero problem)."""
        lb = self.lower_bound
        return self.makespan / lb if lb else 1.0

    def per_resource(self) -> dict[str, dict[str, Any]]:
        """``{resource: {"count", "busy" (cycles), "utilisation" = busy / (count * makespan)}}``."""
        busy, span = self._t.busy(), self.makespan
        return {r.name: {"count": r.count, "busy": int(b), "utilisation": float(b) / (r.count * span) if span else 0.0}
                for r, b in zip(self._t.resources, busy)}

    # --- checking -------------------------------------------------------------------------
    def verify(self) -> None:
        """Raise :class:`ScheduleError` at the first broken rule: a negative start, ``end != start
        + duration``, a unit the resource does not have, a task starting before one of its deps
        ends, or two tasks of positive duration overlapping on one unit. Zero-duration tasks
        occupy no cycle, so they never overlap anything."""
        t, start, end, unit = self._t, self.start, self.end, self.unit
        if not t.n:
            return
        for bad, why in ((start < 0, "starts at a negative cycle"),
                         (end != start + t.dur, "has end - start != its duration"),
                         ((unit < 0) | (unit >= t.count[t.res]), "runs on a unit its resource does not have")):
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ScheduleError(f"{self._where(i)}, cycle {start[i]}..{end[i]}: {why} "
                                    f"(duration {t.dur[i]}, {t.count[t.res[i]]} unit(s))")
        users = np.repeat(np.arange(t.n), np.diff(t.dep_ptr))
        early = np.flatnonzero(start[users] < end[t.dep_idx])
        if early.size:
            e = int(early[0])
            i, d = int(users[e]), int(t.dep_idx[e])
            raise ScheduleError(f"{self._where(i)} starts at cycle {start[i]}, before its dependency "
                                f"{t.label(d)} ends at cycle {end[d]}")
        busy = np.flatnonzero(t.dur > 0)
        busy = busy[np.lexsort((busy, start[busy], unit[busy], t.res[busy]))]
        a, b = busy[:-1], busy[1:]
        clash = np.flatnonzero((t.res[a] == t.res[b]) & (unit[a] == unit[b]) & (start[b] < end[a]))
        if clash.size:
            c = clash[np.argmin(start[b[clash]])]
            i, j = int(a[c]), int(b[c])
            raise ScheduleError(f"unit {unit[i]} of resource {t.resources[t.res[i]].name!r} runs {t.label(i)} "
                                f"and {t.label(j)} at once at cycle {start[j]}")

    def _where(self, i: int) -> str:
        return f"{self._t.label(i)} on resource {self._t.resources[self._t.res[i]].name!r} unit {self.unit[i]}"

    # --- reports --------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary::

            {"makespan": int, "critical_path": int, "resource_bound": int, "lower_bound": int,
             "ratio": float,
             "resources": {name: {"count": int, "busy": int, "utilisation": float}},
             "tasks": [{"id": int, "name": str, "resource": str, "unit": int,
                        "start": int, "end": int, "meta": dict}, ...]}   # in id order

        Cycles are integers; a task occupies its unit over ``[start, end)``.
        """
        t = self._t
        rname = [r.name for r in t.resources]
        tasks = [{"id": i, "name": t.names[i], "resource": rname[r], "unit": u, "start": s, "end": e,
                  "meta": dict(t.metas.get(i, {}))}
                 for i, (r, u, s, e) in enumerate(zip(t.res.tolist(), self.unit.tolist(),
                                                      self.start.tolist(), self.end.tolist()))]
        return {"makespan": self.makespan, "critical_path": self.critical_path,
                "resource_bound": self.resource_bound, "lower_bound": self.lower_bound,
                "ratio": self.ratio, "resources": self.per_resource(), "tasks": tasks}

    def to_chrome_trace(self, max_events: int | None = 200_000) -> dict[str, Any]:
        """The schedule in Chrome trace-event format, loadable by ui.perfetto.dev and chrome://tracing.

        One process per resource (``pid`` = resource index + 1, in declaration order), one thread
        per unit (``tid`` = unit + 1), named by ``"M"`` metadata events; one complete event
        (``"ph": "X"``) per task with ``ts``/``dur`` in cycles, shown as microseconds
        (1 us = 1 cycle), and ``args`` = ``{"id": task id, **meta}``. Big traces make the viewer
        crawl, so only the ``max_events`` earliest-starting tasks are kept (``None`` keeps all);
        ``otherData`` then says how many were left out.
        """
        t = self._t
        n = t.n
        keep = np.arange(n) if max_events is None or n <= max_events else \
            np.lexsort((np.arange(n), self.start))[:max_events]
        events: list[dict[str, Any]] = []
        for r, res in enumerate(t.resources):
            pid = r + 1
            events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"{res.name} x{res.count}"}})
            events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": r}})
            events.extend({"name": "thread_name", "ph": "M", "pid": pid, "tid": u + 1,
                           "args": {"name": f"{res.name}[{u}]"}} for u in range(res.count))
        rname = [r.name for r in t.resources]
        for i, r, u, s, d in zip(keep.tolist(), t.res[keep].tolist(), self.unit[keep].tolist(),
                                 self.start[keep].tolist(), t.dur[keep].tolist()):
            events.append({"name": t.names[i], "cat": rname[r], "ph": "X", "ts": s, "dur": d,
                           "pid": r + 1, "tid": u + 1, "args": {"id": i, **t.metas.get(i, {})}})
        other: dict[str, Any] = {"time_unit": "1 us = 1 cycle", "makespan": self.makespan,
                                 "lower_bound": self.lower_bound, "tasks": n}
        if keep.size < n:
            other["note"] = (f"truncated: the {keep.size} earliest-starting of {n} tasks are shown "
                             f"(max_events={max_events})")
        return {"traceEvents": events, "displayTimeUnit": "ns", "otherData": other}


def _frozen(values: Sequence[int], dtype: type, n: int, what: str) -> np.ndarray:
    a = np.array(values, dtype=dtype)
    if a.shape != (n,):
        raise ValueError(f"Schedule {what} must have one entry per task ({n}), not shape {a.shape}")
    a.flags.writeable = False
    return a


def list_schedule(p: Problem) -> Schedule:
    """Non-preemptive list scheduling with critical-path priority.

    A task is ready once every dep has ended; it starts at the first cycle it is ready and a
    unit of its resource is free (the lowest-numbered free unit). Ready tasks competing for a
    resource go by the longest path to a sink (including their own duration), then lower id.
    All completions at a cycle are processed before dispatching, so a unit freed at cycle c is
    reused at c. Deterministic; O(E + V log V).
    """
    t = p._tasks()
    n = t.n
    if not n:
        return Schedule(p, [], [], [])
    order = np.argsort(-t.bottom, kind="stable")      # stable: equal priority -> lower id first
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    succ = np.argsort(t.dep_idx, kind="stable")       # CSR of successors, from the deps
    users = np.repeat(np.arange(n), np.diff(t.dep_ptr))[succ]
    succ_ptr = np.concatenate(([0], np.cumsum(np.bincount(t.dep_idx, minlength=n))))
    start, end, unit = _simulate(t, _q(order), _q(rank), _q(succ_ptr), _q(users))
    return Schedule(p, np.frombuffer(start, np.int64), np.frombuffer(end, np.int64), np.frombuffer(unit, np.int64))


def _q(a: np.ndarray) -> array:
    # the simulation indexes flat int64 arrays one item at a time: array.array is as quick as a
    # list for that and 5x smaller (no int object per entry)
    return array("q", a.astype(np.int64).tobytes())


def _simulate(t: _Tasks, order: array, rank: array, succ_ptr: array, succ: array) -> tuple[array, array, array]:
    n, res, dur = t.n, _q(t.res), _q(t.dur)
    waiting = _q(np.diff(t.dep_ptr))                  # deps not yet ended
    start, end, unit = _q(np.zeros(n)), _q(np.zeros(n)), _q(np.zeros(n))
    ready: list[list[int]] = [[] for _ in t.resources]  # heaps of rank: best priority on top
    idle = [list(range(r.count)) for r in t.resources]  # heaps of free unit numbers
    for i in np.flatnonzero(np.diff(t.dep_ptr) == 0).tolist():
        ready[res[i]].append(rank[i])
    for h in ready:
        heapq.heapify(h)
    events: list[int] = []                            # heap of end * n + id
    heappush, heappop = heapq.heappush, heapq.heappop
    now, dirty = 0, set(range(len(ready)))
    while True:
        for r in dirty:
            h, free = ready[r], idle[r]
            while h and free:
                i = order[heappop(h)]
                e = now + dur[i]
                start[i], end[i], unit[i] = now, e, heappop(free)
                heappush(events, e * n + i)
        dirty = set()
        if not events:
            return start, end, unit
        now = events[0] // n
        limit = (now + 1) * n
        while events and events[0] < limit:
            i = heappop(events) % n
            heappush(idle[res[i]], unit[i])
            dirty.add(res[i])
            for s in succ[succ_ptr[i]:succ_ptr[i + 1]]:
                waiting[s] -= 1
                if not waiting[s]:
                    heappush(ready[res[s]], rank[s])
                    dirty.add(res[s])


def schedule_from_start_times(p: Problem, start: Sequence[int], unit: Sequence[int] | None = None) -> Schedule:
    """A Schedule from start cycles computed elsewhere (``end = start + duration``).

    Without ``unit``, each resource's tasks are placed on units in start order, on the
    lowest-numbered idle unit; when every unit is still busy the task goes on the one that frees
    first, so :meth:`Schedule.verify` reports the overlap.
    """
    t = p._tasks()
    start = np.array(start, dtype=np.int64)
    if start.shape != (t.n,):
        raise ValueError(f"start must have one entry per task ({t.n}), not shape {start.shape}")
    end = start + t.dur
    if unit is None:
        unit = _assign_units(t, start, end)
    return Schedule(p, start, end, unit)


def _assign_units(t: _Tasks, start: np.ndarray, end: np.ndarray) -> list[int]:
    unit = [0] * t.n
    idle = [list(range(r.count)) for r in t.resources]
    running: list[list[tuple[int, int]]] = [[] for _ in t.resources]  # heaps of (end, unit)
    s_, e_, res = start.tolist(), end.tolist(), t.res.tolist()
    for i in np.lexsort((np.arange(t.n), start)).tolist():
        r, s = res[i], s_[i]
        run, free = running[r], idle[r]
        while run and run[0][0] <= s:
            heapq.heappush(free, heapq.heappop(run)[1])
        unit[i] = heapq.heappop(free) if free else heapq.heappop(run)[1]
        heapq.heappush(run, (e_[i], unit[i]))
    return unit
