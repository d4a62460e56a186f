"""The Driver service: Nomad's task lifecycle calls, translated for the shared core.

Handlers run on grpcio's thread pool; the work runs on the plugin's event loop
(:class:`~vmdriver.nomad.loop.LoopThread`). Streams (Fingerprint, TaskEvents,
TaskStats) stay open until Nomad cancels them, as Nomad re-opens a closed
stream at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import psutil
from google.protobuf import timestamp_pb2

from vmdriver.errors import InputError
from vmdriver.host.config import HostConfig
from vmdriver.host.fingerprint import Fingerprint, fingerprint
from vmdriver.jobfile.hostcheck import check_host
from vmdriver.nomad import execstream, hclspec
from vmdriver.nomad.attributes import Value, to_proto, virt_attributes
from vmdriver.nomad.base import PluginState
from vmdriver.nomad.netoverride import driver_network, follow_changes
from vmdriver.nomad.proto import driver_pb2 as pb
from vmdriver.nomad.proto import driver_pb2_grpc
from vmdriver.nomad.status import rpc, stream
from vmdriver.nomad.taskconfig import plan_start
from vmdriver.runtime.guest_stats import GuestMemory, GuestStatsSampler, spec_of
from vmdriver.runtime.netconfig import address_wait
from vmdriver.runtime.state import ExitResult
from vmdriver.runtime.stats import ProcessSample, ProcessSampler

log = logging.getLogger(__name__)

FINGERPRINT_PERIOD_S = 30.0
DEFAULT_STATS_INTERVAL_S = 1.0
HANDLE_VERSION = 1


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _ended(context: grpc.ServicerContext) -> threading.Event:
    """An event set when the RPC ends (Nomad cancelled the stream)."""
    done = threading.Event()
    context.add_callback(done.set)
    return done


def exit_result(result: ExitResult, oom: bool = False) -> pb.ExitResult:
    """vmdriver's ExitResult in Nomad's terms."""
    return pb.ExitResult(exit_code=result.exit_code, signal=result.signal, oom_killed=oom)


def usage(sample: ProcessSample) -> pb.TaskResourceUsage:
    """A psutil sample as Nomad's TaskResourceUsage (every field it reads is set)."""
    cpu_fields = [pb.CPUUsage.SYSTEM_MODE, pb.CPUUsage.USER_MODE, pb.CPUUsage.TOTAL_TICKS,
                  pb.CPUUsage.PERCENT]
    mem_fields = [pb.MemoryUsage.RSS, pb.MemoryUsage.SWAP]
    return pb.TaskResourceUsage(
        cpu=pb.CPUUsage(system_mode=sample.system_percent, user_mode=sample.user_percent,
                        total_ticks=sample.total_ticks, percent=sample.cpu_percent,
                        measured_fields=cpu_fields),
        memory=pb.MemoryUsage(rss=sample.rss, swap=sample.swap, measured_fields=mem_fields),
    )


def guest_usage(mem: GuestMemory) -> pb.TaskResourceUsage:
    """The guest's own memory view (balloon statistics, bytes), as a pseudo-process "guest".

    rss: used by the guest (neither free nor cache), cache: its page cache and
    buffers, usage: total minus free. Nomad has no fields for block or network I/O:
    those are in the Prometheus metrics (docs/metrics.md).
    """
    fields = [pb.MemoryUsage.RSS, pb.MemoryUsage.CACHE, pb.MemoryUsage.USAGE]
    return pb.TaskResourceUsage(
        cpu=pb.CPUUsage(measured_fields=[]),
        memory=pb.MemoryUsage(rss=mem.used, cache=mem.caches, usage=mem.total - mem.free,
                              measured_fields=fields),
    )


class DriverService(driver_pb2_grpc.DriverServicer):
    """``hashicorp.nomad.plugins.drivers.proto.Driver``."""

    def __init__(self, state: PluginState) -> None:
        self.state = state

    # Section: schema, capabilities, fingerprint

    @rpc
    def Init(self, request: pb.InitRequest, context: grpc.ServicerContext) -> pb.InitResponse:
        """The plugin is ready once SetConfig ran; the metrics endpoint starts here if asked for."""
        self.state.loop.call(self._start_metrics())
        return pb.InitResponse()

    async def _start_metrics(self) -> None:
        self.state.tasks.ensure_metrics()

    @rpc
    def TaskConfigSchema(self, request: pb.TaskConfigSchemaRequest,
                         context: grpc.ServicerContext) -> pb.TaskConfigSchemaResponse:
        """The qemu task config as an hclspec object."""
        return pb.TaskConfigSchemaResponse(spec=hclspec.task_config_spec(self.state.dialect))

    @rpc
    def Capabilities(self, request: pb.CapabilitiesRequest,
                     context: grpc.ServicerContext) -> pb.CapabilitiesResponse:
        """Signals and exec go through the guest agent (tasks without one get a clear error)."""
        caps = pb.DriverCapabilities(
            send_signals=True, exec=True, fs_isolation=pb.DriverCapabilities.NONE,
            network_isolation_modes=[pb.NetworkIsolationSpec.HOST],
            mount_configs=pb.DriverCapabilities.NO_MOUNTS,
        )
        return pb.CapabilitiesResponse(capabilities=caps)

    def _fingerprint(self) -> pb.FingerprintResponse:
        host = self.state.host
        try:
            fp = fingerprint(host.state_dir, host.emulators_allowlist)
            attrs = to_proto(self._attributes(fp, host))
        except Exception as exc:
            log.exception("fingerprint failed")
            return pb.FingerprintResponse(
                health=pb.FingerprintResponse.UNHEALTHY, health_description=f"fingerprint failed: {exc}"
            )
        if fp.healthy:
            health = pb.FingerprintResponse.HEALTHY
        elif not fp.emulators:
            health = pb.FingerprintResponse.UNDETECTED
        else:
            health = pb.FingerprintResponse.UNHEALTHY
        return pb.FingerprintResponse(attributes=attrs, health=health,
                                      health_description=fp.description)

    def _attributes(self, fp: Fingerprint, host: HostConfig) -> dict[str, Value]:
        """The qemu driver's attributes, or, installed as ``virt``, nomad-driver-virt's."""
        if self.state.dialect.name != "virt":
            return dict(fp.attributes)
        running, exited = self.state.loop.call(self.state.tasks.counts(), timeout=5.0)
        return virt_attributes(fp, check_host(host), running, exited)

    @stream
    def Fingerprint(self, request: pb.FingerprintRequest,
                    context: grpc.ServicerContext) -> Iterator[pb.FingerprintResponse]:
        """First answer at once, then one whenever it changed and at least every 30 s."""
        ended = _ended(context)
        last = None
        next_periodic = 0.0
        while not ended.is_set():
            current = self._fingerprint()
            now = time.monotonic()
            if current != last or now >= next_periodic:
                yield current
                last, next_periodic = current, now + FINGERPRINT_PERIOD_S
            ended.wait(FINGERPRINT_PERIOD_S / 3)

    # Section: task lifecycle

    @rpc
    def StartTask(self, request: pb.StartTaskRequest,
                  context: grpc.ServicerContext) -> pb.StartTaskResponse:
        """Decode, check, launch (confined), and hand back a handle with everything re-attaching needs."""
        tasks = self.state.tasks
        if tasks.find(request.task.id) is not None:
            # Checked before provisioning: the failure path below must not touch its volumes.
            raise InputError("task is already started", where=request.task.id)
        plan = plan_start(request.task, self.state.dialect, self.state.host)
        try:
            task = self.state.loop.call(tasks.start(plan))
        except BaseException:
            # A failed start leaves nothing behind (the virt dialect's volumes).
            self.state.dialect.release(self.state.host, plan.alloc_id, plan.name)
            raise
        log.info("task %s started: pid %s", task.id, tasks.info(task.id).pid)
        # The handle's copy of the task config goes without the driver config: Nomad keeps
        # the handle in its client state, and a virt task's config holds a plain password.
        # Re-attaching needs only driver_state (the VM record).
        config = pb.TaskConfig()
        config.CopyFrom(request.task)
        config.ClearField("msgpack_driver_config")
        handle = pb.TaskHandle(version=HANDLE_VERSION, config=config, state=pb.RUNNING,
                               driver_state=tasks.driver_state(task))
        try:
            # A VM on a tap/macvtap NIC: its own address for Nomad (bounded wait).
            network = self.state.loop.call(driver_network(
                tasks.supervisor, self.state.events, task, address_wait(self.state.host)))
        except Exception:
            log.exception("task %s: no DriverNetwork (the VM runs)", task.id)
            network = None
        return pb.StartTaskResponse(result=pb.StartTaskResponse.SUCCESS, handle=handle,
                                    network_override=network)

    @rpc
    def RecoverTask(self, request: pb.RecoverTaskRequest,
                    context: grpc.ServicerContext) -> pb.RecoverTaskResponse:
        """Re-attach to a VM an earlier plugin process started (Nomad sends only the handle)."""
        task_id = request.handle.config.id or request.task_id
        task = self.state.loop.call(self.state.tasks.recover(task_id, request.handle.driver_state))
        info = self.state.tasks.info(task.id)
        log.info("task %s recovered: pid %s", task.id, info.pid)
        follow_changes(self.state.tasks.supervisor, self.state.events, task, info.addresses)
        return pb.RecoverTaskResponse()

    @rpc
    def WaitTask(self, request: pb.WaitTaskRequest,
                 context: grpc.ServicerContext) -> pb.WaitTaskResponse:
        """Block until the VM ends; cancelled with the RPC."""
        tasks = self.state.tasks
        result = self.state.loop.call(tasks.wait(request.task_id), context)
        task = tasks.find(request.task_id)
        oom = bool(task and task.oom_killed)
        return pb.WaitTaskResponse(
            result=exit_result(result, oom), err="" if result.successful else result.describe()
        )

    @rpc
    def StopTask(self, request: pb.StopTaskRequest,
                 context: grpc.ServicerContext) -> pb.StopTaskResponse:
        """Power button (if the job asked for graceful shutdown), signal, wait, kill."""
        timeout = None
        if request.HasField("timeout"):
            timeout = request.timeout.ToTimedelta().total_seconds()
        self.state.loop.call(self.state.tasks.stop(request.task_id, timeout, request.signal))
        return pb.StopTaskResponse()

    @rpc
    def DestroyTask(self, request: pb.DestroyTaskRequest,
                    context: grpc.ServicerContext) -> pb.DestroyTaskResponse:
        """Forget the task; with force, kill the VM first; then its volumes go."""
        task = self.state.tasks.find(request.task_id)
        self.state.loop.call(self.state.tasks.destroy(request.task_id, request.force))
        # Nomad's task id is <alloc id>/<task name>/<nonce>: unknown after a lost handle.
        alloc_id, _, rest = request.task_id.partition("/")
        alloc_id, name = (task.alloc_id, task.name) if task else (alloc_id, rest.split("/")[0])
        if alloc_id and name:
            self.state.dialect.release(self.state.host, alloc_id, name)
        return pb.DestroyTaskResponse()

    @rpc
    def InspectTask(self, request: pb.InspectTaskRequest,
                    context: grpc.ServicerContext) -> pb.InspectTaskResponse:
        """State, times and result (always set: Nomad dereferences them)."""
        task = self.state.tasks.get(request.task_id)
        vm = self.state.tasks.info(task.id)
        result = vm.result
        status = pb.TaskStatus(
            id=task.id, name=task.name, state=pb.EXITED if result else pb.RUNNING,
            started_at=_ts(vm.started_at), completed_at=_ts(task.completed_at or 0.0),
            result=exit_result(result, task.oom_killed) if result else pb.ExitResult(),
        )
        attrs = {"pid": str(vm.pid or ""), "state": vm.state.value,
                 "qmp_socket": str(vm.qmp_socket)}
        return pb.InspectTaskResponse(task=status, driver=pb.TaskDriverStatus(attributes=attrs))

    @stream
    def TaskStats(self, request: pb.TaskStatsRequest,
                  context: grpc.ServicerContext) -> Iterator[pb.TaskStatsResponse]:
        """QEMU's CPU and memory every ``collection_interval``, until the VM ends.

        ``agg_resource_usage`` is QEMU as the host accounts it (what the task's memory
        limit counts); with a balloon, ``resource_usage_by_pid["guest"]`` is the
        guest's own memory view.
        """
        task = self.state.tasks.get(request.task_id)
        interval = request.collection_interval.ToTimedelta().total_seconds()
        interval = interval if interval > 0 else DEFAULT_STATS_INTERVAL_S
        pid = self.state.tasks.info(task.id).pid
        if pid is None:
            return
        ended = _ended(context)
        guest = self._guest_sampler(task.id)
        try:
            sampler = ProcessSampler(pid)
            while not ended.is_set() and self.state.tasks.info(task.id).result is None:
                sample = sampler.sample()
                by_pid = {str(pid): usage(sample)}
                mem = self._guest_memory(guest, interval)
                if mem is not None:
                    by_pid["guest"] = guest_usage(mem)
                stats = pb.TaskStats(
                    id=task.id,
                    timestamp=_ts(sample.timestamp),
                    agg_resource_usage=usage(sample),
                    resource_usage_by_pid=by_pid,
                )
                yield pb.TaskStatsResponse(stats=stats)
                ended.wait(interval)
        except psutil.NoSuchProcess:
            return

    def _guest_sampler(self, task_id: str) -> GuestStatsSampler | None:
        sup = self.state.tasks.supervisor
        try:
            spec = spec_of(sup, task_id)
        except Exception:  # a VM without a record (gone): QEMU's numbers only
            return None
        if not spec.balloon:
            return None
        return GuestStatsSampler(task_id, spec, lambda c, a: sup.qmp(task_id, c, a))

    def _guest_memory(self, sampler: GuestStatsSampler | None,
                      interval: float) -> GuestMemory | None:
        if sampler is None:
            return None
        try:
            return self.state.loop.call(sampler.sample(), timeout=max(interval, 2.0)).memory
        except Exception as exc:  # guest numbers are a bonus: never end the stream for them
            log.debug("guest stats of %s: %s", sampler.vm_id, exc)
            return None

    @stream
    def TaskEvents(self, request: pb.TaskEventsRequest,
                   context: grpc.ServicerContext) -> Iterator[pb.DriverTaskEvent]:
        """Task events (VM started, re-attached, exited, cgroup warnings) until cancelled."""
        events = self.state.events
        sub = events.subscribe()
        ended = _ended(context)
        try:
            while not ended.is_set():
                try:
                    ev = sub.get(timeout=1.0)
                except queue.Empty:
                    continue
                yield pb.DriverTaskEvent(
                    task_id=ev.task_id,
                    alloc_id=ev.alloc_id,
                    task_name=ev.name,
                    timestamp=_ts(ev.timestamp),
                    message=ev.message,
                    annotations=ev.annotations,
                )
        finally:
            events.unsubscribe(sub)

    # Section: into the guest, through its agent

    @rpc
    def SignalTask(self, request: pb.SignalTaskRequest,
                   context: grpc.ServicerContext) -> pb.SignalTaskResponse:
        """SIGTERM/SIGINT: guest shutdown; others: to the guest's processes (guestsignal)."""
        self.state.loop.call(self.state.tasks.signal(request.task_id, request.signal), context)
        return pb.SignalTaskResponse()

    @rpc
    def ExecTask(self, request: pb.ExecTaskRequest,
                 context: grpc.ServicerContext) -> pb.ExecTaskResponse:
        """Run a command in the guest (script checks): all output and the exit code at the end."""
        return execstream.exec_unary(self.state, request, context)

    @stream
    def ExecTaskStreaming(self, request_iterator: Iterator[pb.ExecTaskStreamingRequest],
                          context: grpc.ServicerContext,
                          ) -> Iterator[pb.ExecTaskStreamingResponse]:
        """`nomad alloc exec`: stdin in, stdout/stderr out as they come, then the exit code."""
        yield from execstream.exec_streaming(self.state, request_iterator, context)

    # Section: not used (Capabilities says so)

    @rpc
    def CreateNetwork(self, request: pb.CreateNetworkRequest,
                      context: grpc.ServicerContext) -> pb.CreateNetworkResponse:
        """Not used: Capabilities.must_create_network is false."""
        raise NotImplementedError("the vmdriver plugin does not create networks")

    @rpc
    def DestroyNetwork(self, request: pb.DestroyNetworkRequest,
                       context: grpc.ServicerContext) -> pb.DestroyNetworkResponse:
        """Not used: Capabilities.must_create_network is false."""
        raise NotImplementedError("the vmdriver plugin does not create networks")

    @rpc
    def Shutdown(self, request: pb.ShutdownRequest,
                 context: grpc.ServicerContext) -> pb.ShutdownResponse:
        """Nomad's client is going away: let go of the VMs, leave them running."""
        self.state.loop.call(self.state.tasks.detach_all(), timeout=2.0)
        return pb.ShutdownResponse()
