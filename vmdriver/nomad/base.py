"""Shared plugin state and the BasePlugin service (identity, config schema, SetConfig)."""

from __future__ import annotations

import logging
import threading

import grpc

from vmdriver import __version__
from vmdriver.host.config import HostConfig, host_config_from_mapping
from vmdriver.jobfile.dialects import dialect_for_plugin
from vmdriver.jobfile.hostcheck import check_host
from vmdriver.nomad import hclspec
from vmdriver.nomad.codec import decode_config
from vmdriver.nomad.loop import LoopThread
from vmdriver.nomad.proto import base_pb2, base_pb2_grpc
from vmdriver.nomad.status import rpc
from vmdriver.nomad.tasks import EventHub, TaskTable
from vmdriver.runtime.supervisor import Supervisor

log = logging.getLogger(__name__)

#: The only driver API version Nomad speaks.
API_VERSION = "v0.1.0"


class PluginState:
    """What every service of one plugin process shares."""

    def __init__(self, name: str) -> None:
        #: The driver name jobs use in ``driver = "..."`` (the executable's file name).
        self.name = name
        #: The task dialect jobs for this driver name are written in.
        self.dialect = dialect_for_plugin(name)
        self.host = HostConfig()
        self.configured = False
        self.loop = LoopThread()
        self.events = EventHub()
        self.tasks = TaskTable(Supervisor(self.host), self.events)
        #: Set when the host asks the plugin to exit (GRPCController.Shutdown, SIGTERM).
        self.shutdown = threading.Event()

    def set_host(self, host: HostConfig) -> None:
        """Use ``host`` from now on (running VMs keep the settings they started with)."""
        self.host = host
        self.tasks.supervisor.host = host
        self.configured = True


class BasePluginService(base_pb2_grpc.BasePluginServicer):
    """``hashicorp.nomad.plugins.base.proto.BasePlugin``."""

    def __init__(self, state: PluginState) -> None:
        self.state = state

    @rpc
    def PluginInfo(self, request: base_pb2.PluginInfoRequest,
                   context: grpc.ServicerContext) -> base_pb2.PluginInfoResponse:
        """Type DRIVER, API v0.1.0, our version, and the driver name."""
        return base_pb2.PluginInfoResponse(
            type=base_pb2.DRIVER, plugin_api_versions=[API_VERSION],
            plugin_version=__version__, name=self.state.name,
        )

    @rpc
    def ConfigSchema(self, request: base_pb2.ConfigSchemaRequest,
                     context: grpc.ServicerContext) -> base_pb2.ConfigSchemaResponse:
        """The host configuration's fields as an hclspec object."""
        return base_pb2.ConfigSchemaResponse(spec=hclspec.host_config_spec())

    @rpc
    def SetConfig(self, request: base_pb2.SetConfigRequest,
                  context: grpc.ServicerContext) -> base_pb2.SetConfigResponse:
        """Decode and validate the agent's ``plugin { config {} }``; refuse bad ones readably."""
        where = f'plugin "{self.state.name}" config'
        # Nested blocks (storage_pools, network) carry nil for every attribute left unset.
        data = hclspec.without_nulls(decode_config(request.msgpack_config, where=where))
        host = host_config_from_mapping(data, where)
        check_host(host, where)
        self.state.set_host(host)
        # Field names only: storage_pools may hold a Ceph key, provider a password.
        log.info("configured: %s", sorted(host.model_dump(exclude_defaults=True)))
        return base_pb2.SetConfigResponse()
