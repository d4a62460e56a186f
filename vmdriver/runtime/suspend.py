"""Suspend on stop: a task with ``suspend = true`` saves its state when stopped.

Split off :mod:`vmdriver.runtime.snapshots` to keep that module readable; the
save itself (:func:`~vmdriver.runtime.snapshots.save_vm`) and the resume on the
next start (:func:`~vmdriver.runtime.snapshots.plan_start`) stay there. A VM's
stop ladder tries :func:`suspend` first.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from vmdriver.errors import MonitorError, SpecError
from vmdriver.qemu.monitor import Monitor
from vmdriver.runtime.snapshots import save_vm
from vmdriver.runtime.snapstore import SnapshotDir
from vmdriver.runtime.taskdir import VMDirs
from vmdriver.spec import VMSpec

log = logging.getLogger(__name__)


async def suspend(monitor: Monitor, spec: VMSpec, dirs: VMDirs) -> bool:
    """Save the VM's state into its suspend dir instead of powering it off.

    Returns True when everything is saved (the caller then ends QEMU); False
    when the save failed: the VM runs on, its disks where they now are, and
    the caller goes on with a normal graceful stop.
    """
    assert spec.suspend_to is not None
    snap = SnapshotDir(Path(spec.suspend_to), f"suspended task {spec.name!r}")
    try:
        snap.disks_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        meta = await save_vm(monitor, spec, dirs, snap, name=spec.name, source=spec.name,
                             overlays=False, resume=False)
    except (MonitorError, SpecError, OSError) as exc:
        log.warning("%s: saving the state failed (%s); stopping it normally", snap.what, exc)
        with contextlib.suppress(MonitorError):
            if (await monitor.execute("query-status"))["status"] != "running":
                await monitor.execute("cont")
        return False
    log.info("%s: saved %d MiB in %.2fs", snap.what, (meta.state_size or 0) >> 20,
             meta.save_seconds)
    return True
