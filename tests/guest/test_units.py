"""Pure logic of the guest features: parsers of QMP/agent replies, addresses, signals, metrics."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vmdriver.cli.guest import agent_of
from vmdriver.errors import InputError, StateError
from vmdriver.runtime.guest_stats import (
    GuestStats,
    IOCounters,
    parse_agent_net,
    parse_balloon,
    parse_blockstats,
    read_link_counters,
)
from vmdriver.runtime.guestexec import GuestProcess, _with_path
from vmdriver.runtime.guestsignal import parse_signal
from vmdriver.runtime.guestwatch import agent_addresses
from vmdriver.runtime.metrics import VmMetrics, VmSnapshot, parse_address
from vmdriver.runtime.record import VMRecord
from vmdriver.runtime.state import ExitKind, VMState
from vmdriver.spec import VMSpec


def test_balloon_stats_in_bytes_and_unknown_until_reported() -> None:
    reply = {"stats": {"stat-total-memory": 215801856, "stat-free-memory": 159289344,
                       "stat-available-memory": 163520512, "stat-disk-caches": 19816448,
                       "stat-swap-in": 0}, "last-update": 1796133748}
    mem = parse_balloon(reply)
    assert mem is not None and mem.total == 215801856 and mem.caches == 19816448
    assert mem.used == 215801856 - 159289344 - 19816448
    assert parse_balloon({"stats": {"stat-total-memory": -1}, "last-update": 0}) is None
    partial = parse_balloon({"stats": {"stat-total-memory": 100, "stat-free-memory": 40,
                                       "stat-available-memory": -1}, "last-update": 5})
    assert partial is not None and partial.available == 40 and partial.caches == 0


def test_blockstats_sum_top_nodes_only() -> None:
    dev = {"device": "", "qdev": "/machine/peripheral/d0/virtio-backend",
           "stats": {"rd_bytes": 4096, "wr_bytes": 512, "rd_operations": 1, "wr_operations": 1},
           "parent": {"stats": {"rd_bytes": 10**9}}, "backing": {"stats": {"rd_bytes": 10**9}}}
    assert parse_blockstats([dev, dev]) == IOCounters(8192, 1024, 2, 2)


def test_agent_net_leaves_loopback_out() -> None:
    ifaces = [{"name": "lo", "statistics": {"rx-bytes": 99, "tx-bytes": 99}},
              {"name": "eth0", "statistics": {"rx-bytes": 1290, "tx-bytes": 1286,
                                              "rx-packets": 3, "tx-packets": 9}}]
    assert parse_agent_net(ifaces) == IOCounters(1290, 1286, 3, 9)
    assert parse_agent_net(ifaces[:1]) is None


def test_tap_counters_are_turned_to_the_guests_view(tmp_path: Path) -> None:
    stats = tmp_path / "vmdabc" / "statistics"
    stats.mkdir(parents=True)
    for name, value in (("rx_bytes", 100), ("tx_bytes", 7000), ("rx_packets", 2),
                        ("tx_packets", 9)):
        (stats / name).write_text(f"{value}\n")
    # The host receives what the guest transmits.
    assert read_link_counters(["vmdabc", "gone"], tmp_path) == IOCounters(7000, 100, 9, 2)
    assert read_link_counters(["gone"], tmp_path) is None


def test_agent_addresses() -> None:
    ifaces = [{"name": "lo", "ip-addresses": [{"ip-address": "127.0.0.1"}]},
              {"name": "eth0", "ip-addresses": [{"ip-address": "10.0.2.15"},
                                                {"ip-address": "fe80::1"},
                                                {"ip-address": "2001:db8::5"},
                                                {"ip-address": "junk"}]}]
    assert agent_addresses(ifaces) == ("10.0.2.15",)  # 2001:db8:: is documentation, not global


@pytest.mark.parametrize(("text", "sig"), [("SIGHUP", signal.SIGHUP), ("hup", signal.SIGHUP),
                                           ("15", signal.SIGTERM), (" usr1 ", signal.SIGUSR1)])
def test_parse_signal(text: str, sig: signal.Signals) -> None:
    assert parse_signal(text) is sig


def test_parse_signal_refuses_unknown() -> None:
    with pytest.raises(InputError, match="unknown signal"):
        parse_signal("SIGNOPE")


@pytest.mark.parametrize(("addr", "want"), [("127.0.0.1:9100", ("127.0.0.1", 9100)),
                                            (":9100", ("127.0.0.1", 9100)),
                                            ("9100", ("127.0.0.1", 9100)),
                                            ("[::1]:0", ("::1", 0)),
                                            ("0.0.0.0:80", ("0.0.0.0", 80))])
def test_parse_address(addr: str, want: tuple[str, int]) -> None:
    assert parse_address(addr) == want


@pytest.mark.parametrize("addr", ["", "host:", "x:70000", "a:b"])
def test_parse_address_refuses(addr: str) -> None:
    with pytest.raises(InputError):
        parse_address(addr)


def test_exec_env_keeps_a_path_and_needs_a_command() -> None:
    assert _with_path(None) is None
    env = _with_path({"A": "1"})
    assert env is not None and env["A"] == "1" and "/bin" in env["PATH"]
    assert _with_path({"PATH": "/x"}) == {"PATH": "/x"}
    with pytest.raises(InputError, match="no command"):
        GuestProcess(None, [])  # type: ignore[arg-type]


def test_agentless_record_is_refused() -> None:
    spec = VMSpec(name="vm")
    rec = VMRecord(id="a/vm", task="vm", alloc_dir="/a", runtime_dir="/r", data_dir="/d", pid=1,
                   pid_start_time=0, qmp_socket="/r/q", qga_socket="/r/g", argv=[],
                   spec=spec.model_dump(mode="json"), started_at=0, stdout="", stderr="")
    with pytest.raises(StateError, match="without a guest agent"):
        agent_of(rec)


def test_metrics_families_and_bounded_labels() -> None:
    m = VmMetrics()
    m.started("a/vm/1", "vm", 0.5)
    m.booted("a/vm/1", 7.0)
    m.booted("a/vm/1", 9.0)  # the first boot time stays
    m.stopped(ExitKind.KILLED)
    with m._lock:  # what a poll would have written
        snap = m._vms["a/vm/1"]
        snap.rss, snap.cpu_user_s = 123 << 20, 4.5
        snap.guest = GuestStats(0.0, None, IOCounters(10, 20), IOCounters(30, 40), "agent")
    text = generate_latest(m.registry).decode()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(text) for s in fam.samples}
    vm = (("task", "vm"), ("vm", "a/vm/1"))
    assert got[("vmdriver_vm_state", vm)] == list(VMState).index(VMState.RUNNING)
    assert got[("vmdriver_vm_boot_seconds", vm)] == 7.0
    assert got[("vmdriver_vm_rss_bytes", vm)] == 123 << 20
    assert got[("vmdriver_guest_block_bytes_total", (("direction", "write"), *vm))] == 20
    assert got[("vmdriver_guest_network_bytes_total", (("direction", "transmit"), *vm))] == 40
    assert got[("vmdriver_vm_stops_total", (("outcome", "killed"),))] == 1
    assert not any(n == "vmdriver_guest_memory_bytes" for n, _ in got)  # no balloon: no series
    assert isinstance(snap, VmSnapshot)


def test_metrics_forget_vms_the_supervisor_forgot() -> None:
    class Sup:
        def ids(self) -> list[str]:
            return []

    m = VmMetrics()
    m.started("a/vm/1", "vm", 0.5)
    asyncio.run(m.poll_once(Sup(), str))  # type: ignore[arg-type]
    assert "a/vm/1" not in generate_latest(m.registry).decode()


def test_dashboard_queries_only_series_we_export() -> None:
    import json
    import re

    dash = json.loads((Path(__file__).parents[2] / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"vmdriver_[a-z_]+", e)}
    m = VmMetrics()
    m.started("a/vm/1", "vm", 0.5)
    m.booted("a/vm/1", 1.0)
    from vmdriver.runtime.guest_stats import GuestMemory

    with m._lock:
        m._vms["a/vm/1"].guest = GuestStats(0.0, GuestMemory(4, 1, 2, 1, 1.0), IOCounters(),
                                            IOCounters(), "agent")
    text = generate_latest(m.registry).decode()
    exported = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert used and used <= exported, used - exported


def test_qemu_task_options_for_agent_shutdown_and_balloon(tmp_path: Path) -> None:
    from vmdriver.jobfile.model import load_job
    from vmdriver.jobfile.plan import plan_job

    def spec(config: str) -> VMSpec:
        job = tmp_path / "j.hcl"
        job.write_text('job "j" { group "g" { task "vm" { driver = "qemu"\n'
                       f'config {{ image_path = "local/d.qcow2"\n{config} }} }} }} }}\n')
        return plan_job(load_job(job), tmp_path, check_ports=False)[0].spec

    on = spec("graceful_shutdown = true\nguest_agent = true\nguest_agent_shutdown = true\n"
              "balloon = true")
    assert on.shutdown.graceful and on.shutdown.via_agent and on.balloon
    # Without an agent, the ACPI button it is.
    assert not spec("guest_agent_shutdown = true").shutdown.via_agent
    assert not spec("").balloon
