"""The PNG: one panel per benchmark, every sample shown, medians marked."""

from __future__ import annotations

from pathlib import Path

from bench.results import ARM_ORDER, Results

COLORS = {"vmdriver": "tab:blue", "vmdriver run": "tab:cyan", "bare": "tab:gray",
          "libvirt": "tab:red"}


def _strip(ax: object, res: Results, bench: str, metric: str, title: str, log: bool = False) -> None:
    """Samples per arm as dots, the median as a bar."""
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    arms = [a for a in [*ARM_ORDER, "psutil (cpu_times+memory_info)"] if res.get(bench, metric, a)]
    unit = ""
    for i, arm in enumerate(arms):
        row = res.get(bench, metric, arm)
        assert row is not None
        unit = row.unit
        xs = [i + (j % 7 - 3) * 0.04 for j in range(len(row.values))]
        color = COLORS.get(arm, "tab:green")
        ax.scatter(xs, row.values, s=8, alpha=0.6, color=color)
        ax.hlines(row.median, i - 0.3, i + 0.3, color="black", linewidth=2)
        ax.annotate(f"{row.median:.3g}", (i + 0.32, row.median), fontsize=7, va="center")
    ax.set_xticks(range(len(arms)), [a.replace(" (", "\n(") for a in arms], fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(unit, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_xlim(-0.6, len(arms) - 0.2)


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


def plot(res: Results, path: Path) -> None:
    """Write the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(15, 12))
    a = axes.flatten()
    _strip(a[0], res, "start", "request → running", "start: request → running", log=True)
    _strip(a[1], res, "boot", "request → guest ready line", "boot (TCG): request → guest ready")
    burst = next((m for b, m in res.metrics() if b == "burst" and m.endswith("all running")), "")
    _strip(a[2], res, "burst", burst, f"burst: {burst}", log=True)
    _strip(a[3], res, "burst", "supervisor PSS per VM", "burst: supervisor PSS per VM")
    _strip(a[4], res, "stop", "forced (SIGKILL / virsh destroy) → exit reported", "stop: forced", log=True)
    _strip(a[5], res, "stop", "graceful: guest power-off (SHUTDOWN) → exit reported",
           "stop: guest power-off → exit reported")
    stats = next((m for b, m in res.metrics() if b == "stats" and m.startswith("sampling")), "")
    _strip(a[6], res, "stats", stats, f"stats: {stats}", log=True)
    _curves(a[7], res, "scale start ms/", "scale: time to start the k-th VM", "ms")
    _curves(a[8], res, "scale pss MiB/", "scale: supervisor PSS", "MiB")
    host = res.host
    fig.suptitle(f"vmdriver vs bare QEMU vs libvirt — QEMU {host.get('qemu', '?')}, "
                 f"{str(host.get('accelerator', '?')).split(' ')[0]}, {host.get('cores', '?')} cores, "
                 f"{host.get('cpu', '')}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
