"""The static list scheduler: hand-checked DAGs, lower bounds and a cycle-stepped reference on
random DAGs, verify() on corrupted schedules, traces, and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapeout.compiler.schedule import (Problem, Resource, Schedule, ScheduleError, list_schedule,
                                       schedule_from_start_times)

POOLS = [Resource("dma"), Resource("array"), Resource("vector", 2)]


def chain(durations, resources=("dma", "array", "vector")) -> Problem:
    p = Problem(POOLS)
    prev: tuple[int, ...] = ()
    for i, d in enumerate(durations):
        prev = (p.add(f"t{i}", resources[i % len(resources)], d, prev),)
    return p


def independent(durations, pool: Resource) -> Problem:
    p = Problem([pool])
    for i, d in enumerate(durations):
        p.add(f"t{i}", pool.name, d)
    return p


# --- hand-checked DAGs -----------------------------------------------------------------------
def test_chain_makespan_is_the_sum():
    s = list_schedule(chain([2, 3, 4, 0, 5]))
    assert s.start.tolist() == [0, 2, 5, 9, 9] and s.end.tolist() == [2, 5, 9, 9, 14]
    assert s.makespan == s.critical_path == 14 and s.ratio == 1.0
    s.verify()


def test_independent_tasks_on_one_unit_take_the_sum():
    s = list_schedule(independent([3, 1, 4, 1, 5], Resource("array")))
    assert s.makespan == s.resource_bound == 14 and s.critical_path == 5
    assert (s.unit == 0).all()
    # longest first (priority = own duration), equal durations by id:
    # t4 0-5, t2 5-9, t0 9-12, t1 12-13, t3 13-14
    assert s.start.tolist() == [9, 12, 5, 13, 0]


def test_independent_tasks_on_k_units():
    s = list_schedule(independent([4, 4, 4, 4, 2, 2], Resource("vector", 2)))
    assert s.resource_bound == 10 and s.makespan == 10 and s.ratio == 1.0
    assert s.start.tolist() == [0, 0, 4, 4, 8, 8] and s.unit.tolist() == [0, 1, 0, 1, 0, 1]
    s = list_schedule(independent([5, 5, 5], Resource("vector", 2)))
    # ceil(15 / 2) = 8 is a bound no schedule of whole 5-cycle tasks reaches: 10 is optimal
    assert (s.critical_path, s.resource_bound, s.makespan, s.ratio) == (5, 8, 10, 1.25)
    assert s.per_resource() == {"vector": {"count": 2, "busy": 15, "utilisation": 0.75}}


def test_critical_path_priority_beats_fifo_on_a_diamond():
    p = Problem([Resource("array"), Resource("vector")])
    src = p.add("src", "array", 1)
    a = p.add("a", "array", 1, [src])          # short branch, lower id: FIFO would run it first
    b = p.add("b", "array", 2, [src])
    c = p.add("c", "vector", 4, [b])           # long tail after b, on another resource
    sink = p.add("sink", "array", 1, [a, c])
    # levels to the sink: sink 1, c 4+1=5, b 2+5=7, a 1+1=2, src 1+7=8
    # by priority: src 0-1, b 1-3 (7 > 2), a 3-4 and c 3-7 in parallel, sink 7-8 -> makespan 8
    # FIFO by id:  src 0-1, a 1-2, b 2-4, c 4-8, sink 8-9 -> makespan 9
    s = list_schedule(p)
    assert s.start.tolist() == [0, 3, 1, 3, 7]
    assert s.makespan == s.critical_path == 8 and s.lower_bound == 8
    assert s.start[b] < s.start[a] and s.end[sink] == 8 and c == 3


def test_empty_and_zero_duration_problems():
    s = list_schedule(Problem(POOLS))
    assert (s.makespan, s.lower_bound, s.ratio, len(s)) == (0, 0, 1.0, 0)
    s.verify()
    s = list_schedule(chain([0, 0, 0]))
    assert s.makespan == 0 and s.ratio == 1.0 and s.end.tolist() == [0, 0, 0]
    s.verify()


# --- random DAGs -----------------------------------------------------------------------------
@st.composite
def dags(draw, min_duration: int = 0) -> Problem:
    p = Problem(POOLS)
    for i in range(draw(st.integers(0, 60))):
        deps = draw(st.lists(st.integers(0, i - 1), max_size=3)) if i else []
        p.add(f"t{i}", draw(st.sampled_from(["dma", "array", "vector"])),
              draw(st.integers(min_duration, 10)), deps, kind="k")
    return p


def bottom_levels(p: Problem) -> list[int]:
    succ: list[list[int]] = [[] for _ in range(len(p))]
    for i in range(len(p)):
        for d in p.deps(i):
            succ[d].append(i)
    level = [0] * len(p)
    for i in reversed(range(len(p))):
        level[i] = int(p._tasks().dur[i]) + max((level[s] for s in succ[i]), default=0)
    return level


def reference_schedule(p: Problem) -> tuple[list[int], list[int]]:
    """Cycle-stepped list scheduling (durations >= 1): at each cycle, fill free units with the
    ready tasks of highest (level, -id)."""
    t, level = p._tasks(), bottom_levels(p)
    start, unit, end = [None] * len(p), [None] * len(p), [None] * len(p)
    cycle = 0
    while None in start:
        for r, pool in enumerate(p.resources):
            used = {unit[i] for i in range(len(p)) if start[i] is not None and start[i] <= cycle < end[i]
                    and t.res[i] == r}
            free = [u for u in range(pool.count) if u not in used]
            ready = [i for i in range(len(p)) if start[i] is None and t.res[i] == r
                     and all(end[d] is not None and end[d] <= cycle for d in p.deps(i))]
            for i, u in zip(sorted(ready, key=lambda i: (-level[i], i)), free):
                start[i], unit[i], end[i] = cycle, u, cycle + int(t.dur[i])
        cycle += 1
    return start, unit


@settings(max_examples=100, deadline=None)
@given(dags())
def test_lower_bounds_hold_and_every_list_schedule_verifies(p):
    s = list_schedule(p)
    s.verify()
    assert s.makespan >= s.critical_path and s.makespan >= s.resource_bound
    assert s.critical_path == max(bottom_levels(p), default=0)
    t = p._tasks()
    dma, array, vector = (int(t.dur[t.res == r].sum()) for r in range(3))
    assert s.resource_bound == max(dma, array, -(-vector // 2))
    assert s.ratio >= 1.0


@settings(max_examples=100, deadline=None)
@given(dags())
def test_no_unit_idles_while_a_ready_task_waits(p):
    s, t = list_schedule(p), p._tasks()
    for i in range(len(p)):
        ready = max((int(s.end[d]) for d in p.deps(i)), default=0)
        assert s.start[i] >= ready
        same = (t.res == t.res[i]) & (t.dur > 0)
        checkpoints = {ready} | {int(e) for e in s.end[same] if ready < e < s.start[i]}
        for c in checkpoints:
            if c < s.start[i]:
                running = same & (s.start <= c) & (c < s.end)
                assert running.sum() == p.resources[t.res[i]].count, (i, c)


@settings(max_examples=100, deadline=None)
@given(dags(min_duration=1))
def test_event_simulation_matches_a_cycle_stepped_reference(p):
    s = list_schedule(p)
    start, unit = reference_schedule(p)
    assert s.start.tolist() == start and s.unit.tolist() == unit


def test_deterministic():
    def build() -> Problem:
        rng = np.random.default_rng(7)
        p = Problem(POOLS)
        for i in range(500):
            deps = rng.integers(0, i, 2).tolist() if i else []
            p.add(f"t{i}", ["dma", "array", "vector"][i % 3], int(rng.integers(0, 20)), deps)
        return p
    a, b = list_schedule(build()), list_schedule(build())
    assert np.array_equal(a.start, b.start) and np.array_equal(a.unit, b.unit)
    assert a.to_json() == b.to_json()


# --- verify() on corrupted schedules ---------------------------------------------------------
def test_verify_catches_overlap_on_a_unit():
    p = independent([3, 3], Resource("array"))
    p.add("late", "array", 1)
    with pytest.raises(ScheduleError, match=r"^unit 0 of resource 'array' runs task 't0' \(id 0\) "
                                            r"and task 't1' \(id 1\) at once at cycle 1$"):
        schedule_from_start_times(p, [0, 1, 10]).verify()
    s = list_schedule(p)
    with pytest.raises(ScheduleError, match=r"task 'late' \(id 2\) at once at cycle 4"):
        Schedule(p, [0, 3, 4], [3, 6, 5], [0, 0, 0]).verify()
    s.verify()


def test_verify_catches_a_dependency_violation():
    p = chain([2, 3], resources=("dma", "array"))
    with pytest.raises(ScheduleError, match=r"^task 't1' \(id 1\) on resource 'array' unit 0 starts at cycle 1, "
                                            r"before its dependency task 't0' \(id 0\) ends at cycle 2$"):
        schedule_from_start_times(p, [0, 1]).verify()
    schedule_from_start_times(p, [0, 2]).verify()


def test_verify_catches_bad_ends_units_and_negative_starts():
    p = independent([2, 2], Resource("vector", 2))
    with pytest.raises(ScheduleError, match=r"task 't1' \(id 1\) on resource 'vector' unit 0.*duration"):
        Schedule(p, [0, 0], [2, 3], [1, 0]).verify()
    with pytest.raises(ScheduleError, match=r"task 't0' \(id 0\) on resource 'vector' unit 2.*does not have"):
        Schedule(p, [0, 0], [2, 2], [2, 0]).verify()
    with pytest.raises(ScheduleError, match=r"task 't1' .* negative cycle"):
        schedule_from_start_times(p, [0, -1]).verify()
    schedule_from_start_times(p, [0, 0]).verify()     # two units: no overlap
    with pytest.raises(ValueError, match=r"one entry per task \(2\)"):
        schedule_from_start_times(p, [0])


def test_schedule_arrays_are_read_only():
    s = list_schedule(chain([1, 2]))
    with pytest.raises(ValueError):
        s.start[0] = 5


# --- reports ---------------------------------------------------------------------------------
def test_json_report():
    p = Problem(POOLS)
    a = p.add("load", "dma", 4, layer="fc1", kind="load")
    p.add("mm", "array", 6, [a])
    doc = json.loads(json.dumps(list_schedule(p).to_json()))
    assert doc["makespan"] == doc["critical_path"] == doc["lower_bound"] == 10 and doc["ratio"] == 1.0
    assert doc["resource_bound"] == 6
    assert doc["tasks"][0] == {"id": 0, "name": "load", "resource": "dma", "unit": 0, "start": 0, "end": 4,
                               "meta": {"layer": "fc1", "kind": "load"}}
    assert doc["tasks"][1]["meta"] == {} and doc["resources"]["vector"]["busy"] == 0


def test_chrome_trace_structure():
    p = Problem(POOLS)
    for i in range(12):
        p.add(f"t{i}", ["dma", "array", "vector"][i % 3], i % 4 + 1, [i - 3] if i >= 3 else [], layer=f"L{i // 3}")
    s = list_schedule(p)
    trace = json.loads(json.dumps(s.to_chrome_trace()))
    assert trace["displayTimeUnit"] == "ns" and "1 us = 1 cycle" in trace["otherData"]["time_unit"]
    x = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert sorted(e["args"]["id"] for e in x) == list(range(12))
    for e in x:
        i = e["args"]["id"]
        assert (e["name"], e["ts"], e["dur"]) == (f"t{i}", s.start[i], s.end[i] - s.start[i])
        assert (e["pid"], e["tid"]) == (int(p._tasks().res[i]) + 1, int(s.unit[i]) + 1)
        assert e["args"]["layer"] == f"L{i // 3}"
    meta = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    processes = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert processes == {1: "dma x1", 2: "array x1", 3: "vector x2"}
    assert threads == {(1, 1): "dma[0]", (2, 1): "array[0]", (3, 1): "vector[0]", (3, 2): "vector[1]"}
    assert "note" not in trace["otherData"]


def test_chrome_trace_truncates_to_the_earliest_tasks():
    s = list_schedule(chain([1] * 10))
    trace = s.to_chrome_trace(max_events=4)
    x = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [e["ts"] for e in x] == [0, 1, 2, 3]
    assert "4 earliest-starting of 10 tasks" in trace["otherData"]["note"]
    assert len([e for e in s.to_chrome_trace(max_events=None)["traceEvents"] if e["ph"] == "X"]) == 10


# --- bad input -------------------------------------------------------------------------------
def test_bad_tasks_name_the_task():
    p = Problem(POOLS)
    p.add("a", "dma", 1)
    for args, message in [
            (("b", "tpu", 1), r"^task 'b': unknown resource 'tpu'; the resources are 'dma', 'array', 'vector'$"),
            (("b", "dma", -1), r"^task 'b': duration must be >= 0 cycles, not -1$"),
            (("b", "dma", 1.5), r"^task 'b': duration must be an integer number of cycles, not 1.5$"),
            (("b", "dma", 1, [1]), r"^task 'b': dependency 1 is not the id of an earlier task \(ids so far: 0..0\)$"),
            (("b", "dma", 1, [-1]), r"^task 'b': dependency -1 is not"),
            (("b", "dma", 1, ["a"]), r"^task 'b': dependency must be a task id, not 'a'$")]:
        with pytest.raises(ValueError, match=message):
            p.add(*args)
    assert len(p) == 1 and p.n_deps == 0                 # a rejected task leaves no trace
    assert p.add("b", "dma", np.int64(2), iter([np.int64(0)])) == 1 and p.deps(1) == [0]


def test_bad_resources():
    with pytest.raises(ValueError, match=r"^Resource 'vector': count must be a positive integer, not 0$"):
        Resource("vector", 0)
    with pytest.raises(ValueError, match=r"^duplicate resource name 'dma'$"):
        Problem([Resource("dma"), Resource("dma", 2)])
