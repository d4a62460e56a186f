"""A throwaway single-node Ceph cluster for tests and benchmarks.

One monitor, one manager and one BlueStore OSD on a sparse file, all under one
directory with its own ``ceph.conf`` and keyring (never ``/etc/ceph``), bound to
127.0.0.1 only, msgr2 only, pool size 1, cephx on, memory kept small.

Standalone::

    python tests/ceph/cluster.py up DIR     # prints the cluster facts as JSON
    python tests/ceph/cluster.py down DIR   # kills the daemons, removes DIR

``up`` leaves the daemons running in their own session; their pids, the monitor
address, the test pool and the unprivileged client user's key are in
``DIR/cluster.json`` (read back with :func:`load`).

Only Debian's ceph 16 binaries are used: ``ceph-mon --mkfs``, ``ceph-osd --mkfs``,
``ceph-mgr``; every cluster command goes through the ``rados`` bindings'
``mon_command`` (the ``ceph`` CLI costs ~1 s of Python start-up per call).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import dataclasses
import importlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

#: The pool tests put their volumes in, and the client user limited to it.
POOL = "vmd"
CLIENT = "vmd"
#: Size of the OSD's sparse block file: big enough that a test never fills it.
BLOCK_SIZE = 6 * 1024**3
#: osd_memory_target has a floor of 896 MiB in ceph 16.
OSD_MEMORY_TARGET = 896 * 1024**2
DAEMONS = ("mon.a", "mgr.x", "osd.0")
#: Every python module of ceph-mgr 16, the always-on ones included: the manager's C++
#: core (PG stats, which pool quotas need) is all the tests use, and the modules
#: cost ~250 MB and a busy core while they start.
_MGR_MODULES = (
    "alerts balancer crash devicehealth influx insights iostat localpool mirroring nfs "
    "orchestrator osd_perf_query osd_support pg_autoscaler progress prometheus rbd_support "
    "restful selftest snap_schedule stats status telegraf telemetry test_orchestrator "
    "volumes zabbix diskprediction_local"
)
#: Every wait is bounded; this is the longest any single step may take.
STEP_TIMEOUT = 60.0


#: Daemons this process started: kept so they are reaped (and not garbage-collected
#: while running, which warns).
_CHILDREN: dict[int, tuple[str, Path, subprocess.Popen[bytes]]] = {}


class ClusterError(RuntimeError):
    """The cluster could not be brought up; the message says which step failed."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What a client needs to reach the cluster, and what ``down`` needs to end it."""

    dir: Path
    fsid: str
    mon_host: str  # "127.0.0.1:PORT" (msgr2)
    admin_key: str
    pool: str
    client: str  # user id without the "client." prefix
    client_key: str
    pids: dict[str, int]

    @property
    def conf(self) -> Path:
        return self.dir / "ceph.conf"

    def admin(self) -> Any:
        """A connected admin ``rados.Rados`` from this cluster's own conf and keyring."""
        return _admin(self.dir)


def gen_key() -> str:
    """A cephx secret, as ``ceph-authtool --gen-print-key`` makes it.

    The encoding is CryptoKey's: type 1 (AES), creation time, then 16 key bytes
    with a 16-bit length.
    """
    raw = struct.pack("<HIIH", 1, int(time.time()), 0, 16) + os.urandom(16)
    return base64.b64encode(raw).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _conf_text(d: Path, fsid: str, port: int) -> str:
    # Small caches and few threads: the machine has 2 cores shared by many.
    return f"""[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{port}
public_network = 127.0.0.1/32
ms_bind_msgr1 = false
ms_bind_msgr2 = true
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = {d}/keyring
run_dir = {d}/run
admin_socket = {d}/run/$name.asok
log_file = {d}/log/$name.log
crash_dir = {d}/crash
ms_async_op_threads = 1
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
mgr_stats_period = 1
[mon]
mon_data = {d}/mon
mgr_initial_modules =
mon_memory_autotune = false
mon_memory_target = 268435456
rocksdb_cache_size = 33554432
mon_tick_interval = 1
[mgr]
mgr_data = {d}/mgr
mgr_disabled_modules = {_MGR_MODULES}
[osd]
osd_data = {d}/osd
osd_objectstore = bluestore
bluestore_block_path = {d}/osd.block
bluestore_block_create = true
bluestore_block_size = {BLOCK_SIZE}
bluestore_block_db_create = false
bluestore_block_wal_create = false
bluestore_fsck_on_mkfs = false
osd_memory_target = {OSD_MEMORY_TARGET}
bluestore_cache_autotune = false
bluestore_cache_size = 67108864
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2
osd_scrub_min_interval = 1000000
osd_scrub_max_interval = 10000000
osd_deep_scrub_interval = 10000000
"""


def _keyring_text(keys: dict[str, str]) -> str:
    caps = {
        "mon.": {"mon": "allow *"},
        "client.admin": {"mon": "allow *", "osd": "allow *", "mgr": "allow *", "mds": "allow *"},
        "mgr.x": {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"},
        "osd.0": {"mon": "allow profile osd", "mgr": "allow profile osd", "osd": "allow *"},
    }
    out = []
    for name, key in keys.items():
        out.append(f"[{name}]\n\tkey = {key}\n")
        out += [f'\tcaps {svc} = "{cap}"\n' for svc, cap in caps[name].items()]
    return "".join(out)


def _env() -> dict[str, str]:
    # CEPH_KEYRING, CEPH_CONF, CEPH_ARGS in the caller's environment would override
    # the cluster's own files, even for the daemons.
    return {k: v for k, v in os.environ.items() if not k.startswith("CEPH_")}


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=STEP_TIMEOUT,
                          check=False)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ClusterError(f"{Path(argv[0]).name} failed ({proc.returncode}): {' | '.join(tail)}")


def _die_with_parent() -> None:
    # Runs in the child before exec: SIGKILL it when the process that started it dies,
    # so a test run that is itself killed leaves no daemon behind.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _spawn(d: Path, name: str, *, tied: bool) -> int:
    kind, ident = name.split(".")
    log = open(d / "log" / f"{name}.stderr", "ab")  # noqa: SIM115 (handed to the child)
    with log:
        proc = subprocess.Popen(
            [f"ceph-{kind}", "-f", "-c", str(d / "ceph.conf"), "-i", ident],
            env=_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True,  # never gets the terminal's Ctrl-C
            preexec_fn=_die_with_parent if tied else None,  # noqa: PLW1509 (prctl only)
        )
    (d / "run" / f"{name}.pid").write_text(str(proc.pid))
    _CHILDREN[proc.pid] = (name, d, proc)
    return proc.pid


def _bindings() -> Any:
    try:
        return importlib.import_module("rados")
    except ImportError as e:
        raise ClusterError(f"python rados bindings missing ({e})") from e


def _admin(d: Path, timeout: float = 10.0) -> Any:
    rados = _bindings()
    conf = {"client_mount_timeout": str(int(timeout)), "rados_mon_op_timeout": str(int(timeout)),
            "rados_osd_op_timeout": "60"}
    client = rados.Rados(conffile=str(d / "ceph.conf"), rados_id="admin", conf=conf)
    client.connect()
    return client


def mon_command(client: Any, prefix: str, inbuf: bytes = b"", **args: Any) -> Any:
    """One monitor command; the parsed JSON answer (or None when it has none)."""
    cmd = json.dumps({"prefix": prefix, "format": "json", **args})
    ret, out, err = client.mon_command(cmd, inbuf)
    if ret:
        raise ClusterError(f"'{prefix}' failed ({ret}): {err}")
    return json.loads(out) if out.strip() else None


def _wait(what: str, check: Any, d: Path, timeout: float = STEP_TIMEOUT) -> Any:
    """Poll ``check`` until it is true; fail at once when a daemon we started died."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        _check_daemons(d)
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # remember why, keep polling
            last = e
        time.sleep(0.3)
    raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}"
                       + (f" (last error: {last})" if last else ""))


def _check_daemons(d: Path) -> None:
    for name, cwd, proc in list(_CHILDREN.values()):
        if cwd == d and proc.poll() is not None:
            lines = [line for log in (d / "log" / f"{name}.stderr", d / "log" / f"{name}.log")
                     if log.exists() for line in log.read_text(errors="replace").splitlines()
                     if line.strip()]
            raise ClusterError(f"{name} exited ({proc.returncode})"
                               + (f": {lines[-1][-200:]}" if lines else ""))


def _osd_up(client: Any) -> bool:
    osds = mon_command(client, "osd dump")["osds"]
    return any(o["osd"] == 0 and o["up"] and o["in"] for o in osds)


def _mgr_up(client: Any) -> bool:
    return bool(mon_command(client, "mgr dump")["available"])


def _make_pool(client: Any, pool: str, user: str) -> str:
    mon_command(client, "osd pool create", pool=pool, pg_num=8, pgp_num=8)
    mon_command(client, "osd pool application enable", pool=pool, app="rbd")
    caps = ["mon", "profile rbd", "osd", f"profile rbd pool={pool}", "mgr", f"profile rbd pool={pool}"]
    mon_command(client, "auth get-or-create", entity=f"client.{user}", caps=caps)
    key = mon_command(client, "auth get-key", entity=f"client.{user}")["key"]
    # A write returns once the pool's PGs are active: the cluster is ready for clients.
    with client.open_ioctx(pool) as ioctx:
        ioctx.write_full("vmd-ready-probe", b"x")
        ioctx.remove_object("vmd-ready-probe")
    return str(key)


def up(d: Path, *, tied: bool = False) -> Cluster:
    """Create and start a cluster in ``d`` (empty or absent); ClusterError says why it could not.

    ``tied``: the daemons are killed when this process dies (test fixtures); without
    it they outlive it (``cluster.py up``) until :func:`down`.
    """
    d = d.resolve()
    d.mkdir(parents=True, exist_ok=True)
    if any(d.iterdir()):
        raise ClusterError(f"{d} is not empty")
    try:
        return _up(d, tied)
    except BaseException:
        down(d, remove=False)
        raise


def _up(d: Path, tied: bool) -> Cluster:
    for sub in ("mon", "mgr", "osd", "run", "log", "crash"):
        (d / sub).mkdir()
    for tool in ("ceph-mon", "ceph-mgr", "ceph-osd", "monmaptool"):
        if not shutil.which(tool):
            raise ClusterError(f"{tool} not found (Debian package ceph)")
    fsid, port = str(uuid.uuid4()), free_port()
    keys = {name: gen_key() for name in ("mon.", "client.admin", "mgr.x", "osd.0")}
    (d / "ceph.conf").write_text(_conf_text(d, fsid, port))
    (d / "keyring").write_text(_keyring_text(keys))
    os.chmod(d / "keyring", 0o600)
    conf = ["-c", str(d / "ceph.conf")]
    _run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a",
          f"[v2:127.0.0.1:{port}]", str(d / "monmap")])
    _run(["ceph-mon", *conf, "--mkfs", "-i", "a", "--monmap", str(d / "monmap"),
          "--keyring", str(d / "keyring")])
    pids = {"mon.a": _spawn(d, "mon.a", tied=tied)}
    client = _wait("the monitor", lambda: _admin(d, timeout=5), d)
    try:
        osd_uuid = str(uuid.uuid4())
        mon_command(client, "osd new", uuid=osd_uuid, id=0)
        _run(["ceph-osd", *conf, "--mkfs", "-i", "0", "--osd-uuid", osd_uuid])
        pids["mgr.x"] = _spawn(d, "mgr.x", tied=tied)
        pids["osd.0"] = _spawn(d, "osd.0", tied=tied)
        _wait("osd.0 up", lambda: _osd_up(client), d)
        client_key = _make_pool(client, POOL, CLIENT)
        _wait("the manager", lambda: _mgr_up(client), d)
        # The always-on manager modules are disabled on purpose (see _MGR_MODULES).
        mon_command(client, "health mute", code="MGR_MODULE_ERROR", sticky=True)
    finally:
        client.shutdown()
    cluster = Cluster(dir=d, fsid=fsid, mon_host=f"127.0.0.1:{port}", admin_key=keys["client.admin"],
                      pool=POOL, client=CLIENT, client_key=client_key, pids=pids)
    facts = dataclasses.asdict(cluster) | {"dir": str(d)}
    (d / "cluster.json").write_text(json.dumps(facts, indent=2))
    os.chmod(d / "cluster.json", 0o600)
    return cluster


def load(d: Path) -> Cluster:
    """The facts ``up`` wrote for the cluster in ``d``."""
    facts = json.loads((d / "cluster.json").read_text())
    facts["dir"] = Path(facts["dir"])
    return Cluster(**facts)


def _pid_is_ours(pid: int, d: Path) -> bool:
    # A recycled pid must not be killed: only a process whose argv names our conf.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(d / "ceph.conf").encode() in cmdline


def down(d: Path, *, remove: bool = True, grace: float = 5.0) -> None:
    """Stop the daemons started in ``d`` (TERM, then KILL after ``grace``), then remove ``d``."""
    d = d.resolve()
    # The OSD first: on TERM it tells the monitor it is going down and waits for an
    # answer (osd_mon_shutdown_timeout, 5 s) that a dead monitor never sends.
    for names in (("osd.0",), ("mgr.x", "mon.a")):
        pids = []
        for name in names:
            with contextlib.suppress(OSError, ValueError):
                pid = int((d / "run" / f"{name}.pid").read_text())
                if _pid_is_ours(pid, d):
                    pids.append(pid)
        _stop(pids, grace)
    if remove:
        shutil.rmtree(d, ignore_errors=True)


def _stop(pids: list[int], grace: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    # Our own children are zombies until reaped: reap them, then look.
    if pid in _CHILDREN:
        if _CHILDREN[pid][2].poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: cluster.py up|down DIR", file=sys.stderr)
        return 2
    d = Path(argv[1])
    if argv[0] == "down":
        down(d)
        return 0
    try:
        cluster = up(d)
    except ClusterError as e:
        print(f"ceph cluster did not start: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"dir": str(cluster.dir), "mon_host": cluster.mon_host, "pool": cluster.pool,
                      "client": cluster.client, "pids": cluster.pids}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
