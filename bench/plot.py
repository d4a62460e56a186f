"""The PNG: one panel per benchmark, every sample shown, medians marked."""

from __future__ import annotations

from pathlib import Path

from bench.results import ARM_ORDER, Results

COLORS = {"vmdriver": "tab:blue", "vmdriver (default jail)": "tab:purple",
          "vmdriver, jail off": "tab:blue", "vmdriver run": "tab:cyan", "bare": "tab:gray",
          "libvirt": "tab:red", "cp --reflink=auto": "tab:gray", "cold boot": "tab:gray",
          "from snapshot": "tab:blue", "ceph rbd": "tab:orange", "directory pool": "tab:blue"}
#: Extra arms of the stats panel, after ARM_ORDER's.
EXTRA_ARMS = ["psutil (cpu_times+memory_info)"]

#: One dot column: (metric, arm, tick label).
Column = tuple[str, str, str]


def _arms(res: Results, bench: str, metric: str) -> list[Column]:
    """Every arm of one metric that has samples, in the table's order."""
    names = [*ARM_ORDER, *EXTRA_ARMS]
    arms = sorted({a for b, m, a in res.rows if (b, m) == (bench, metric)},
                  key=lambda a: names.index(a) if a in names else 99)
    return [(metric, a, a) for a in arms if res.get(bench, metric, a)]


def _strip(ax: object, res: Results, bench: str, columns: list[Column], title: str,
           log: bool = False) -> None:
    """Samples per column as dots, the median as a bar."""
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    columns = [c for c in columns if res.get(bench, c[0], c[1])]
    unit = ""
    for i, (metric, arm, _) in enumerate(columns):
        row = res.get(bench, metric, arm)
        assert row is not None
        unit = row.unit
        xs = [i + (j % 7 - 3) * 0.04 for j in range(len(row.values))]
        ax.scatter(xs, row.values, s=8, alpha=0.6, color=COLORS.get(arm, "tab:green"))
        ax.hlines(row.median, i - 0.3, i + 0.3, color="black", linewidth=2)
        ax.annotate(f"{row.median:.3g}", (i + 0.32, row.median), fontsize=7, va="center")
    ax.set_xticks(range(len(columns)), [c[2].replace(" (", "\n(").replace(", ", ",\n")
                                         for c in columns], fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(unit, fontsize=8)
    if log and columns:
        ax.set_yscale("log")
    ax.set_xlim(-0.6, max(len(columns), 1) - 0.2)


def _find(res: Results, bench: str, test: str) -> str:
    """The first metric of ``bench`` containing ``test`` (labels carry sizes)."""
    return next((m for b, m in res.metrics() if b == bench and test in m), "")


def _curves(ax: object, res: Results, prefix: str, title: str, ylabel: str) -> None:
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    for name, (xs, ys) in sorted(res.curves.items()):
        if not name.startswith(prefix):
            continue
        arm = name.split("/")[1]
        ax.plot(xs, ys, marker="." if len(xs) < 20 else None, color=COLORS.get(arm, "k"),
                alpha=0.8, label=arm)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("VMs running", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)


def _panels(res: Results) -> list[tuple[str, str | list[Column], str, bool]]:
    """The strip panels: (bench, metric or columns, title, log scale)."""
    burst, jail_burst = _find(res, "burst", "all running"), _find(res, "jail", "all running")
    stats = _find(res, "stats", "sampling")
    chain = [(m, "vmdriver", m.split(" image")[0].removeprefix("chained disk on a ")) for m in
             (_find(res, "storage", "1 GiB image, base"), _find(res, "storage", "10 GiB image, base"))]
    clone = _find(res, "storage", "full clone of")
    seeds = [(m, "vmdriver", m.rsplit(" ", 1)[1].strip("()")) for b, m in res.metrics() if b == "seed"]
    return [
        ("start", "request → running", "start: request → running", True),
        ("jail", "request → running", "jail: request → running", False),
        ("jail", jail_burst, f"jail: {jail_burst}", False),
        ("boot", "request → guest ready line", "boot (TCG): request → guest ready", False),
        ("burst", burst, f"burst: {burst}", True),
        ("burst", "supervisor PSS per VM", "burst: supervisor PSS per VM", False),
        ("stop", "forced (SIGKILL / virsh destroy) → exit reported", "stop: forced", True),
        ("stop", "graceful: guest power-off (SHUTDOWN) → exit reported",
         "stop: guest power-off → exit reported", False),
        ("stats", stats, f"stats: {stats}", True),
        ("network", [(m, "vmdriver", m.split(",")[-1].strip()) for m in
                     ("start, user-mode NIC", "start, tap on a managed bridge")],
         "network: start with one NIC", False),
        ("storage", chain, "storage: chained disk, base exists", False),
        ("storage", clone, f"storage: {clone}", False),
        ("seed", seeds, "seed: build a NoCloud seed", False),
        ("snapshots", "request → guest serves HTTP", "snapshots: request → HTTP", True),
        ("rbd", "chained disk, base exists", "rbd: chained disk, base exists", False),
        ("rbd", "vmdriver run → guest ready line", "rbd: vmdriver run → guest ready", False),
    ]


def plot(res: Results, path: Path) -> None:
    """Write the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(res)
    fig, axes = plt.subplots(4, 5, figsize=(25, 16))
    a = list(axes.flatten())
    for ax, (bench, metric, title, log) in zip(a, panels, strict=False):
        columns = metric if isinstance(metric, list) else _arms(res, bench, metric)
        _strip(ax, res, bench, columns, title, log)
    _curves(a[len(panels)], res, "scale start ms/", "scale: time to start the k-th VM", "ms")
    _curves(a[len(panels) + 1], res, "scale pss MiB/", "scale: supervisor PSS", "MiB")
    for ax in a[len(panels) + 2:]:
        ax.set_visible(False)
    host = res.host
    fig.suptitle(f"vmdriver vs bare QEMU vs libvirt — QEMU {host.get('qemu', '?')}, "
                 f"{str(host.get('accelerator', '?')).split(' ')[0]}, {host.get('cores', '?')} cores, "
                 f"{host.get('cpu', '')}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
