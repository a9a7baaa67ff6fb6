"""Pipeline-parallel schedules as per-rank op lists, and an event simulator that times them.

Each schedule here is the real order of operations every rank runs (1F1B; ZB-V as in
torch.distributed.pipelining's ScheduleZBVZeroBubble; DualPipeV as in deepseek-ai/DualPipe's
`dualpipev.py`). `simulate` then runs those lists: an op starts when its rank is free and the ops
it needs have ended. The bubble comes out of the simulation, not out of a formula, so it can be set
beside DeepSeek-V3's Table 2 to show where the formula holds and where it does not.

Units and conventions:
- F, B, W are the times of one micro-batch on one *stage*: forward, backward for the inputs (B) and
  backward for the weights (W). A backward that is not split takes B + W ("BW" below). Table 2 writes
  B for that full backward, so its formulas are evaluated here with B_table = B + W.
- "FB" is DualPipe's overlapped pair: the forward of one micro-batch and the full backward of
  another, run as one op that takes F&B (default F + B + W, i.e. no overlap gain).
- Activation memory counts (micro-batch x stage) units, held from a forward's start to the end of its
  last backward piece (W, or the full backward): W still needs the layer inputs.
- Communication is free, as in Table 2.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass

SCHEDULES = ("1f1b", "zbv", "dualpipev")


@dataclass(frozen=True)
class Op:
    """One op on a rank: kind F, B, W, BW (full backward) or FB (F of stage/mb with BW of stage2/mb2)."""
    kind: str
    stage: int
    mb: int
    stage2: int = -1
    mb2: int = -1

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"F{self.mb}@s{self.stage}&B{self.mb2}@s{self.stage2}"
        return f"{self.kind}{self.mb}@s{self.stage}"


@dataclass(frozen=True)
class Durations:
    f: float = 1.0
    b: float = 1.0
    w: float = 1.0
    fb: float | None = None  # the overlapped F&B op; None = f + b + w

    @property
    def f_and_b(self) -> float:
        return self.f + self.b + self.w if self.fb is None else self.fb

    def of(self, op: Op) -> float:
        return {"F": self.f, "B": self.b, "W": self.w, "BW": self.b + self.w, "FB": self.f_and_b}[op.kind]


# ---------------------------------------------------------------- schedules (op order per rank)

def schedule_1f1b(pp: int, chunks: int) -> list[list[Op]]:
    """Rank r = stage r. Warm up with the forwards the later stages need before the first backward can
    come back (pp-1-r), then alternate one forward and one full backward, then drain the backwards.
    This keeps at most pp-r micro-batches alive on rank r, which is where Table 2's "PP" comes from."""
    ranks = []
    for r in range(pp):
        warm = min(pp - 1 - r, chunks)
        ops = [Op("F", r, m) for m in range(warm)]
        for i in range(chunks - warm):
            ops += [Op("F", r, warm + i), Op("BW", r, i)]
        ops += [Op("BW", r, m) for m in range(chunks - warm, chunks)]
        ranks.append(ops)
    return ranks


class _Builder:
    """Appends ops for one rank, numbering micro-batches per stage in order (as both repos do)."""

    def __init__(self):
        self.ops: list[Op] = []
        self.nf: dict[int, int] = {}
        self.nb: dict[int, int] = {}
        self.nw: dict[int, int] = {}
        self.deferred: deque[tuple[int, int]] = deque()  # backwards whose W is still to run, oldest first

    def _next(self, counter: dict[int, int], stage: int) -> int:
        counter[stage] = counter.get(stage, 0) + 1
        return counter[stage] - 1

    def f(self, s: int) -> None:
        self.ops.append(Op("F", s, self._next(self.nf, s)))

    def b(self, s: int, split: bool) -> None:
        """Backward; with split, only the input-grad now and its W queued for later (zero bubble)."""
        m = self._next(self.nb, s)
        self.ops.append(Op("B" if split else "BW", s, m))
        if split:
            self.deferred.append((s, m))

    def w_oldest(self) -> None:  # DualPipe's WeightGradStore.pop(): first in, first out
        s, m = self.deferred.popleft()
        self.ops.append(Op("W", s, m))

    def w(self, s: int) -> None:  # ZB-V names the stage of each W
        self.ops.append(Op("W", s, self._next(self.nw, s)))

    def fb(self, sf: int, sb: int) -> None:
        self.ops.append(Op("FB", sf, self._next(self.nf, sf), sb, self._next(self.nb, sb)))


def v_stages(rank: int, pp: int) -> tuple[int, int]:
    """The V layout: rank r holds stage r (going down) and stage 2*pp-1-r (coming back), so rank 0 holds
    the first and the last stage and a micro-batch's loss is computed where its input entered."""
    return rank, 2 * pp - 1 - rank


def schedule_zbv(pp: int, chunks: int) -> list[list[Op]]:
    """ZB-V (Qi et al.): the V layout with B and W split. Warm-up fills the down leg, then each rank
    alternates F, B, W on both of its stages; W right after its B keeps memory at 1F1B's level while
    W-free B's travel back sooner. Order as torch's ScheduleZBVZeroBubble: it plans at least 2*pp-1
    micro-batches (enough to fill the V) and drops the ops of those that do not exist."""
    n = max(2 * pp - 1, chunks)
    ranks = []
    for r in range(pp):
        s0, s1 = v_stages(r, pp)
        x = _Builder()
        for _ in range(2 * (pp - r) - 1):
            x.f(s0)
        for _ in range(r):
            x.f(s1), x.f(s0)
        for _ in range(pp - r):
            x.f(s1), x.b(s1, True), x.w(s1)
        while x.nf.get(s1, 0) < x.nf[s0] or x.nf[s0] < n:  # steady state: 1 F, 1 B, 1 W per stage
            if x.nf[s0] < n:
                x.f(s0)
            x.b(s0, True), x.w(s0), x.f(s1), x.b(s1, True), x.w(s1)
        for _ in range(r):  # cool-down: input-grads first (they unblock the ranks before), W later
            x.b(s0, True), x.b(s1, True)
        for _ in range(pp - r):
            x.b(s0, True), x.w(s0)
        while x.nw[s1] < x.nb[s1]:
            x.w(s1)
        while x.nw[s0] < x.nb[s0]:
            x.w(s0)
        ranks.append([op for op in x.ops if op.mb < chunks])
    return ranks


def schedule_dualpipev(pp: int, chunks: int) -> list[list[Op]]:
    """DualPipeV, the eight phases of deepseek-ai/DualPipe `dualpipev.py` (rank r, s0 = r, s1 = 2pp-1-r)."""
    ranks = []
    for r in range(pp):
        s0, s1 = v_stages(r, pp)
        x = _Builder()
        for _ in range(2 * (pp - r - 1)):  # 1: forwards down the V until the later ranks have work
            x.f(s0)
        for _ in range(r + 1):  # 2: the V's turn: both legs forward
            x.f(s0), x.f(s1)
        for _ in range(pp - r - 1):  # 3: first backwards come back; B/W split so W fills the wait
            x.b(s1, True), x.w_oldest(), x.f(s1)
        for i in range(chunks - 2 * pp + r + 1):  # 4: steady state, overlapped F&B pairs on both legs
            if i == 0 and r == pp - 1:
                x.f(s0), x.b(s1, False)  # the repo leaves this pair apart: the F is sent on sooner
            else:
                x.fb(s0, s1)
            x.fb(s1, s0)
        for _ in range(pp - r - 1):  # 5: down leg has no forwards left
            x.b(s1, False), x.fb(s1, s0)
        for i in range(r + 1):  # 6: backwards only; the second half defers W to fill the cool-down
            half = (r + 1) // 2  # the switch falls before B1 on odd ranks, between B1 and B0 on even ones
            x.b(s1, i > half or (i == half and r % 2 == 1)), x.b(s0, i >= half)
        for _ in range(pp - r - 1):  # 7: W's fill the time the up-leg backwards need to arrive
            x.w_oldest(), x.b(s0, True)
        for _ in range(r + 1):  # 8: the remaining W's
            x.w_oldest()
        assert not x.deferred
        ranks.append(x.ops)
    return ranks


BUILDERS = {"1f1b": schedule_1f1b, "zbv": schedule_zbv, "dualpipev": schedule_dualpipev}


def n_stages(schedule: str, pp: int) -> int:
    return pp if schedule == "1f1b" else 2 * pp


def min_chunks(schedule: str, pp: int) -> int:
    """DualPipeV asserts num_chunks >= 2*num_ranks (its steady-state count chunks-2pp+r+1 must not go
    negative). 1F1B and torch's ZB-V run any count (ZB-V pads its plan and drops the extra ops)."""
    return 2 * pp if schedule == "dualpipev" else 1


# ---------------------------------------------------------------- the simulator

def needs(op: Op, stages: int) -> list[tuple[str, int, int]]:
    """What must have ended before op starts: ("f", s, m) a forward, ("g", s, m) an input-grad."""
    def fwd(s, m):
        return [("f", s - 1, m)] if s > 0 else []

    def bwd(s, m):  # the last stage's backward starts from its own loss, the others from the next stage
        return [("f", s, m)] + ([("g", s + 1, m)] if s < stages - 1 else [])

    if op.kind == "F":
        return fwd(op.stage, op.mb)
    if op.kind in ("B", "BW"):
        return bwd(op.stage, op.mb)
    if op.kind == "W":
        return [("g", op.stage, op.mb)]
    return fwd(op.stage, op.mb) + bwd(op.stage2, op.mb2)


def makes(op: Op) -> list[tuple[str, int, int]]:
    """What op produces when it ends: a forward output ("f"), an input-grad ("g") or a weight-grad ("w")."""
    if op.kind == "FB":
        return [("f", op.stage, op.mb), ("g", op.stage2, op.mb2)]
    return [({"F": "f", "B": "g", "BW": "g", "W": "w"}[op.kind], op.stage, op.mb)]


@dataclass
class Result:
    schedule: str
    pp: int
    chunks: int
    durations: Durations
    ops: list[list[Op]]
    times: list[list[tuple[float, float]]]  # (start, end) of each op, per rank
    makespan: float
    busy: list[float]
    bubble: list[float]  # idle time per rank = makespan - busy
    peak_activations: list[int]
    stages_per_rank: list[tuple[int, ...]]


def peak_activations(ops: list[Op]) -> int:
    """Ops on one rank run one after another, so program order is time order: +1 at a forward,
    -1 when its last backward piece ends. An FB op holds its new forward and its old one at once."""
    live = peak = 0
    for op in ops:
        if op.kind in ("F", "FB"):
            live += 1
            peak = max(peak, live)
        if op.kind in ("W", "BW", "FB"):
            live -= 1
    return peak


def simulate(ops: list[list[Op]], stages: int, d: Durations, schedule: str = "", chunks: int = 0) -> Result:
    ready: dict[tuple[str, int, int], float] = {}  # what has ended, and when
    pos, free = [0] * len(ops), [0.0] * len(ops)
    times: list[list[tuple[float, float]]] = [[] for _ in ops]
    moved = True
    while moved:  # sweep the ranks, running each as far as its next op's inputs exist
        moved = False
        for r, rank_ops in enumerate(ops):
            while pos[r] < len(rank_ops):
                op = rank_ops[pos[r]]
                deps = needs(op, stages)
                if any(k not in ready for k in deps):
                    break
                start = max([free[r]] + [ready[k] for k in deps])
                free[r] = start + d.of(op)
                times[r].append((start, free[r]))
                ready.update((k, free[r]) for k in makes(op))
                pos[r] += 1
                moved = True
    stuck = [f"rank {r} at {ops[r][pos[r]]}" for r in range(len(ops)) if pos[r] < len(ops[r])]
    if stuck:
        raise RuntimeError(f"schedule {schedule} deadlocks: " + ", ".join(stuck))
    makespan = max(free)
    busy = [sum(d.of(op) for op in rank_ops) for rank_ops in ops]
    return Result(schedule, len(ops), chunks, d, ops, times, makespan, busy, [makespan - b for b in busy],
                  [peak_activations(o) for o in ops], [tuple(sorted({op.stage for op in o})) for o in ops])


# ---------------------------------------------------------------- checks, Table 2, output

def check(schedule: str, pp: int, chunks: int, d: Durations) -> None:
    """Clear errors before any simulation, each naming the field and the fix."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown --schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if pp < 2:
        raise ValueError(f"--pp {pp}: a pipeline needs at least 2 ranks; use --pp 2 or more")
    need = min_chunks(schedule, pp)
    if chunks < need:
        why = " (DualPipeV needs chunks >= 2*pp)" if schedule == "dualpipev" else ""
        raise ValueError(f"--chunks {chunks} is too few for {schedule} at --pp {pp}{why}; use --chunks {need} or more"
                         " or another --schedule")
    for name, value in (("--f", d.f), ("--b", d.b)):
        if not value > 0:
            raise ValueError(f"{name} {value:g}: a duration must be > 0")
    if not d.w >= 0:
        raise ValueError(f"--w {d.w:g}: the weight-grad time must be >= 0 (0 = no separate weight-grad work)")
    if d.fb is not None and not max(d.f, d.b + d.w) <= d.fb <= d.f + d.b + d.w:
        raise ValueError(f"--fb {d.fb:g}: an overlapped F&B takes at least its longer half and at most both in a "
                         f"row; use a value in [{max(d.f, d.b + d.w):g}, {d.f + d.b + d.w:g}]")


def run(schedule: str, pp: int, chunks: int, d: Durations = Durations()) -> Result:
    check(schedule, pp, chunks, d)
    return simulate(BUILDERS[schedule](pp, chunks), n_stages(schedule, pp), d, schedule, chunks)


def table2(schedule: str, pp: int, d: Durations) -> dict | None:
    """DeepSeek-V3 Table 2 (and the DualPipe README) for this schedule, with PP = number of stages and
    its B = our B + W (a full backward). ZB-V has no row there."""
    full = d.b + d.w
    if schedule == "1f1b":
        return {"bubble": (pp - 1) * (d.f + full), "bubble_formula": "(PP-1)(F+B)", "PP": pp,
                "activations": pp, "activations_formula": "PP", "parameters": "1x"}
    if schedule == "dualpipev":
        stages = 2 * pp
        return {"bubble": (stages / 2 - 1) * (d.f_and_b + full - 3 * d.w), "bubble_formula": "(PP/2-1)(F&B+B-3W)",
                "PP": stages, "activations": stages + 1, "activations_formula": "PP+1",
                "parameters": "2x per device (2 of PP stages), 1 model copy over PP/2 devices"}
    return None


def note(res: Result) -> str:
    """Why the simulated bubble does or does not equal Table 2's. The DualPipeV cases were found by
    simulating a grid of F, B, W, F&B, pp and chunks (tests/test_schedule.py keeps them)."""
    d, p, sim = res.durations, res.pp, max(res.bubble)
    if res.schedule == "zbv":
        return (f"no Table 2 row; {_num(sim - (p - 1) * d.f)} above the floor (P-1)F = {_num((p - 1) * d.f)} that "
                "no schedule beats (the last rank waits for P-1 forwards); ZB-V reaches it when F = B = W")
    t2 = table2(res.schedule, p, d)["bubble"]
    if res.schedule == "1f1b":  # holds for any chunks: the first and last micro-batch bound the makespan
        act = "" if res.chunks >= p else f"; activations are {res.chunks} (= chunks), not PP, since chunks < PP"
        return ("agrees for any chunks (uniform op times, free communication)" if abs(sim - t2) < 1e-9
                else f"differs by {_num(sim - t2)}") + act
    why = []
    if d.f > d.b:
        why.append(f"F > B: the V's fill and drain cost (P-1)(F-B) = {_num((p - 1) * (d.f - d.b))} more")
    if d.w > d.b:
        why.append(f"W > B: a W no longer fits in the wait of one B, (P-1)(W-B) = {_num((p - 1) * (d.w - d.b))} more")
    if d.b > d.f:
        why.append("B > F: the repo runs the last rank's first F and B apart, not as F&B, 'to further reduce bubble "
                   "size'; Table 2 does not count that gain")
    spread = "" if min(res.bubble) == max(res.bubble) else \
        "; ranks differ because they run different numbers of F&B pairs, and Table 2 gives the largest"
    if abs(sim - t2) < 1e-9 and not why:
        return "agrees: F = B >= W, the balanced case Table 2 is drawn for" + spread
    return f"differs by {_num(sim - t2)}: " + "; ".join(why) + spread


def summary(res: Result) -> dict:
    stages = n_stages(res.schedule, res.pp)
    return {"schedule": res.schedule, "pp": res.pp, "stages": stages, "chunks": res.chunks,
            "F": res.durations.f, "B": res.durations.b, "W": res.durations.w, "F&B": res.durations.f_and_b,
            "makespan": res.makespan, "busy": res.busy, "bubble": res.bubble,
            "bubble_ratio": max(res.bubble) / res.makespan, "peak_activations": res.peak_activations,
            "stages_per_rank": res.stages_per_rank,
            "model_copies": sum(len(s) for s in res.stages_per_rank) / stages,
            "table2": table2(res.schedule, res.pp, res.durations), "note": note(res)}


def _num(x: float) -> str:
    return f"{x:.4g}"


def _spread(values: list[float]) -> str:
    return _num(values[0]) if min(values) == max(values) else f"{_num(min(values))}-{_num(max(values))}"


def format_table(results: list[Result]) -> str:
    """One row per schedule with the Table 2 figures beside the simulated ones, then notes and per-rank lines."""
    d = results[0].durations
    head = ("schedule", "stages", "makespan", "busy/rank", "bubble/rank", "Table 2", "formula (PP = stages)",
            "bubble %", "act rank 0", "Table 2 act", "params/rank")
    rows = [head]
    for res in results:
        t2, stages = table2(res.schedule, res.pp, d), n_stages(res.schedule, res.pp)
        rows.append((res.schedule, str(stages), _num(res.makespan), _spread(res.busy), _spread(res.bubble),
                     _num(t2["bubble"]) if t2 else "-", f"{t2['bubble_formula']}, PP={t2['PP']}" if t2 else "no row",
                     f"{100 * max(res.bubble) / res.makespan:.1f}", str(res.peak_activations[0]),
                     f"{t2['activations']} ({t2['activations_formula']})" if t2 else "-",
                     f"{len(res.stages_per_rank[0])} of {stages} stages"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"pp={results[0].pp} ranks, chunks={results[0].chunks}, F={_num(d.f)} B={_num(d.b)} W={_num(d.w)} "
             f"F&B={_num(d.f_and_b)}  (B = input-grad; Table 2's B is the full backward B+W = {_num(d.b + d.w)}; "
             "activations in micro-batch x stage units)"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"{res.schedule}: {note(res)}" for res in results]
    if any(res.schedule == "dualpipev" for res in results):
        lines.append("dualpipev: Table 2's '2x parameters' is 2 stages per device; the model is not duplicated "
                     "(1 copy on PP/2 devices), unlike DualPipe's 2 copies")
    for res in results:
        lines.append(f"{res.schedule} per rank (stages: busy/bubble/peak act): " + ", ".join(
            f"r{r} {'+'.join(map(str, st))}: {_num(b)}/{_num(i)}/{a}" for r, (st, b, i, a) in
            enumerate(zip(res.stages_per_rank, res.busy, res.bubble, res.peak_activations))))
    return "\n".join(lines)


def chrome_trace(results: list[Result], path: str, us_per_unit: float = 1000.0) -> None:
    """chrome://tracing (or ui.perfetto.dev) JSON: one pid per (schedule, rank); 1 time unit = 1 ms."""
    events = []
    for k, res in enumerate(results):
        for r, (rank_ops, rank_times) in enumerate(zip(res.ops, res.times)):
            pid = 100 * k + r
            events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"{res.schedule} rank {r}"}})
            events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": pid}})
            for op, (t0, t1) in zip(rank_ops, rank_times):
                events.append({"name": str(op), "cat": op.kind, "ph": "X", "pid": pid, "tid": 0,
                               "ts": t0 * us_per_unit, "dur": (t1 - t0) * us_per_unit,
                               "args": {"stage": op.stage, "microbatch": op.mb}})
    with open(path, "w") as fh:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, fh)
