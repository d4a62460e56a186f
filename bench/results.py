"""Collected samples, the targets they are judged against, and the markdown table."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLOOR = "bare"
PEER = "libvirt"
#: The jail case's vmdriver arms: the host config's default jail, and ``jail = "off"``.
JAILED = "vmdriver (default jail)"
JAIL_OFF = "vmdriver, jail off"
JAIL_START = "request → running"
JAIL_COST = "jail cost per start (default jail minus jail off, same round)"
#: Arms in the order the table lists them.
ARM_ORDER = ["vmdriver", "vmdriver (default jail)", "vmdriver, jail off", "vmdriver run", "bare",
             "libvirt"]


@dataclass
class Row:
    """All samples of one metric of one arm."""

    bench: str
    metric: str
    arm: str
    unit: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median, NaN if there are no samples."""
        return statistics.median(self.values) if self.values else math.nan


@dataclass(frozen=True)
class Target:
    """A goal from an issue, checked on one arm's medians (the vmdriver arm unless named)."""

    text: str
    check: Callable[[Row, Row | None, Row | None], bool | None]
    arm: str = "vmdriver"


def _ratio(row: Row, other: Row | None) -> float:
    if other is None or not other.values or other.median == 0:
        return math.nan
    return row.median / other.median


def _faster_than_peer(row: Row, floor: Row | None, peer: Row | None) -> bool | None:
    p = _ratio(row, peer)
    return None if math.isnan(p) else p <= 0.1


def at_most(limit: float) -> Callable[[Row, Row | None, Row | None], bool | None]:
    """The check "median ≤ limit" (in the row's own unit)."""
    return lambda r, f, _: r.median <= limit


def at_least(limit: float) -> Callable[[Row, Row | None, Row | None], bool | None]:
    """The check "median ≥ limit" (in the row's own unit)."""
    return lambda r, f, _: r.median >= limit


def x_floor(limit: float) -> Callable[[Row, Row | None, Row | None], bool | None]:
    """The check "median ≤ limit times the floor's median" (n/a without a floor)."""
    return lambda r, f, _: None if f is None else _ratio(r, f) <= limit


#: Every case's goals (from its issue), by (benchmark, metric); a metric may have several,
#: each on its own arm. Cases in other modules add theirs with :func:`add_target`.
TARGETS: dict[tuple[str, str], list[Target]] = {
    ("start", "request → running"): [
        Target("≤ 1.25x bare", x_floor(1.25)),
        Target("≥ 10x faster than libvirt", _faster_than_peer),
    ],
    ("boot", "request → guest ready line"): [Target("≤ 1.05x bare", x_floor(1.05))],
    ("burst", "supervisor PSS per VM"): [Target("≤ 3 MiB per VM", at_most(3.0))],
    ("stop", "graceful: guest power-off (SHUTDOWN) → exit reported"): [
        Target("≤ 50 ms", at_most(50.0))
    ],
    # The core's start target holds for jail off: the floor launches the same argv, unjailed.
    # The default (jailed) ratio is checked against the same number and reported, not hidden.
    ("jail", JAIL_START): [
        Target("≤ 1.25x bare (the core's start target)", x_floor(1.25), JAIL_OFF),
        Target("≤ 1.25x bare (reported: the floor runs unjailed)", x_floor(1.25), JAILED),
    ],
}


def add_target(bench: str, metric: str, target: Target) -> None:
    """Register one more goal for a metric."""
    TARGETS.setdefault((bench, metric), []).append(target)


def targets_for(bench: str, metric: str) -> list[Target]:
    """Every target of a metric; burst wall time and stats labels carry their sizes."""
    out = list(TARGETS.get((bench, metric), []))
    if bench == "burst" and metric.endswith("→ all running"):
        out.append(Target("≤ 1.3x bare", x_floor(1.3)))
    if bench == "jail" and metric.endswith("→ all running"):
        out += [Target("≤ 1.3x bare (the burst target)", x_floor(1.3), JAIL_OFF),
                Target("≤ 1.3x bare (reported: the floor runs unjailed)", x_floor(1.3), JAILED)]
    if bench == "stats" and metric.startswith("sampling"):
        out.append(Target("≤ 2 % of one core", at_most(2.0)))
    return out


class Results:
    """Everything one run produced."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], Row] = {}
        self.curves: dict[str, tuple[list[float], list[float]]] = {}
        self.notes: list[str] = []
        self.skips: list[str] = []
        self.host: dict[str, Any] = {}
        self.argv: list[str] = []

    def add(self, bench: str, metric: str, arm: str, value: float, unit: str) -> None:
        """One sample."""
        key = (bench, metric, arm)
        if key not in self.rows:
            self.rows[key] = Row(bench, metric, arm, unit)
        self.rows[key].values.append(float(value))

    def series(self, name: str, xs: list[float], ys: list[float]) -> None:
        """A curve for the plot (scale)."""
        self.curves[name] = (list(xs), list(ys))

    def note(self, text: str) -> None:
        """A remark for the report."""
        self.notes.append(text)

    def skip(self, what: str, why: str) -> None:
        """A part that did not run, with its one-line reason (also printed at once)."""
        line = f"{what}: skipped: {why}"
        self.skips.append(line)
        print(f"bench: {line}", flush=True)

    def get(self, bench: str, metric: str, arm: str) -> Row | None:
        """A row if it has samples."""
        row = self.rows.get((bench, metric, arm))
        return row if row and row.values else None

    def metrics(self) -> list[tuple[str, str]]:
        """(bench, metric) pairs in first-seen order."""
        seen: dict[tuple[str, str], None] = {}
        for bench, metric, _ in self.rows:
            seen[(bench, metric)] = None
        return list(seen)

    def verdicts(self) -> list[tuple[str, str, str, bool | None]]:
        """(bench, metric, "arm: target", met) for every measured metric with a target."""
        out = []
        for bench, metric in self.metrics():
            for target in targets_for(bench, metric):
                row = self.get(bench, metric, target.arm)
                if row is None:
                    continue
                ok = target.check(row, self.get(bench, metric, FLOOR), self.get(bench, metric, PEER))
                out.append((bench, metric, f"{target.arm}: {target.text}", ok))
        return out

    def to_json(self) -> dict[str, Any]:
        """Raw samples and context, for later analysis."""
        return {
            "host": self.host, "argv": self.argv, "notes": self.notes, "skips": self.skips,
            "rows": [{"bench": r.bench, "metric": r.metric, "arm": r.arm, "unit": r.unit,
                      "values": r.values} for r in self.rows.values()],
            "curves": {k: {"x": v[0], "y": v[1]} for k, v in self.curves.items()},
        }

    def merge_from(self, path: Path, replaced: set[str]) -> None:
        """Keep an earlier run's samples of every metric this run did not measure."""
        old = json.loads(path.read_text())
        measured = {(b, m) for b, m, _ in self.rows}
        mine = dict(self.rows)
        self.rows = {}
        for r in old["rows"]:
            if (r["bench"], r["metric"]) not in measured:
                values = [math.nan if v is None else float(v) for v in r["values"]]
                key = (r["bench"], r["metric"], r["arm"])
                self.rows[key] = Row(r["bench"], r["metric"], r["arm"], r["unit"], values)
        self.rows.update(mine)
        for name, c in old["curves"].items():
            if name.split(" ", 1)[0] not in replaced:
                self.curves.setdefault(name, (c["x"], c["y"]))
        stale = tuple(f"{b} benchmark failed" for b in replaced)
        kept = [n.removeprefix("(earlier run) ") for n in old["notes"]]
        self.notes = [f"(earlier run) {n}" for n in kept if not n.startswith(stale)] + self.notes
        if not self.argv:
            self.argv = old.get("argv", [])

    def write_json(self, path: Path) -> None:
        """Dump :meth:`to_json` (NaN becomes null)."""
        text = json.dumps(self.to_json(), indent=1, default=str)
        path.write_text(text.replace("NaN", "null"))


LEGEND = (
    "Arms: vmdriver = Supervisor.start() through the API with jail = \"off\", so that it launches "
    "the same argv as bare (the jail case adds the default jail); vmdriver run = the CLI as a "
    "subprocess (default jail); bare = the same argv under a minimal harness (the floor); libvirt = "
    "virsh against a throwaway libvirtd. For stats, vmdriver = runtime.stats.ProcessSampler per VM, "
    "psutil = oneshot() cpu_times + memory_info, bare = raw reads of /proc/PID/stat and statm. "
    "PSS per VM near 0 means below the resolution of one PSS reading (ratios of such values mean "
    "nothing). Cases with arms of their own (network, storage, seed, rbd, snapshots) name them; "
    "their ratio rows are computed per round."
)


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "-"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _fmt_ratio(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}x"


def markdown(res: Results, title: str) -> str:
    """The results table with host facts, verdicts, skips and notes."""
    lines = [f"# {title}", ""]
    lines += ["Host: " + ", ".join(f"{k} {v}" for k, v in res.host.items()), ""]
    lines += ["| Benchmark | Metric | Arm | n | median | min | max | unit | x bare | x libvirt |",
              "|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for bench, metric in res.metrics():
        floor, peer = res.get(bench, metric, FLOOR), res.get(bench, metric, PEER)
        arms = sorted((a for b, m, a in res.rows if (b, m) == (bench, metric)),
                      key=lambda a: ARM_ORDER.index(a) if a in ARM_ORDER else 99)
        for arm in arms:
            row = res.get(bench, metric, arm)
            if row is None:
                continue
            lines.append(
                f"| {bench} | {metric} | {arm} | {len(row.values)} | {_fmt(row.median)} | "
                f"{_fmt(min(row.values))} | {_fmt(max(row.values))} | {row.unit} | "
                f"{_fmt_ratio(_ratio(row, floor)) if arm != FLOOR else '1.00x'} | "
                f"{_fmt_ratio(_ratio(row, peer)) if peer else '-'} |"
            )
    lines += ["", LEGEND]
    lines += ["", "## Targets (medians, each on the arm it names)", "",
              "| Benchmark | Metric | Arm: target | Met |",
              "|---|---|---|---|"]
    for bench, metric, text, ok in res.verdicts():
        mark = "n/a" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| {bench} | {metric} | {text} | {mark} |")
    if res.skips:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in res.skips]
    if res.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res.notes]
    if res.argv:
        lines += ["", "## QEMU argv of the start/burst/scale VMs (both arms)", "", "```",
                  " ".join(res.argv), "```"]
    return "\n".join(lines) + "\n"
