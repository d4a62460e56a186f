"""Job file parsing and the qemu task config → VMSpec mapping."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vmdriver.errors import JobFileError, SpecError
from vmdriver.jobfile.model import load_job
from vmdriver.jobfile.plan import TaskPlan, plan_job
from vmdriver.jobfile.qemu import DriveInterface, QemuTaskConfig
from vmdriver.spec import Accelerator, Bus, FileMedium, PortForward, UserNic


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.hcl"
    path.write_text(body)
    return path


def job(config: str, extra: str = "", group_extra: str = "") -> str:
    return f"""
job "j" {{
  group "g" {{
    {group_extra}
    task "t" {{
      driver = "qemu"
      config {{
        {config}
      }}
      {extra}
    }}
  }}
}}
"""


def plan(tmp_path: Path, body: str) -> list[TaskPlan]:
    return plan_job(load_job(write(tmp_path, body)), tmp_path / "state", host_memory_mb=8192)


def forwards(p: TaskPlan) -> tuple[PortForward, ...]:
    """The port forwards of the task's one user-mode NIC."""
    (nic,) = p.spec.nics
    assert isinstance(nic, UserNic), nic
    return nic.forwards


def test_defaults_follow_nomad(tmp_path: Path) -> None:
    (p,) = plan(tmp_path, job('image_path = "local/a.img"'))
    spec = p.spec
    assert spec.emulator == "x86_64" and spec.machine_type == "pc"
    assert spec.accelerator is Accelerator.TCG
    assert QemuTaskConfig().drive_interface is DriveInterface.IDE
    assert spec.drives[0].bus is Bus.IDE
    assert spec.resources.memory_mib == 300
    assert spec.shutdown.timeout_s == 5.0 and spec.shutdown.signal == "SIGINT"
    assert not spec.shutdown.graceful and spec.nics == ()


def test_group_network_ports_are_forwarded(tmp_path: Path) -> None:
    # Nomad #10033: group-level ports were ignored by port_map.
    body = job('image_path = "x.img"\nport_map { http = 80 }',
               group_extra='network { port "http" { static = 18080 } }')
    (p,) = plan(tmp_path, body)
    (fwd,) = forwards(p)
    assert (fwd.host_port, fwd.guest_port, fwd.label) == (18080, 80, "http")
    assert p.env["NOMAD_HOST_PORT_http"] == "18080"


def test_dynamic_port_gets_a_free_host_port(tmp_path: Path) -> None:
    body = job('image_path = "x.img"\nport_map { web = 8080 }',
               group_extra='network { port "web" {} }')
    (p,) = plan(tmp_path, body)
    assert 20000 <= forwards(p)[0].host_port < 32000


def test_port_map_label_must_be_declared(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="port_map label 'db' is not a declared port"):
        plan(tmp_path, job('image_path = "x.img"\nport_map { db = 5432 }'))


def test_unknown_config_key_names_field_and_allowed(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as exc:
        plan(tmp_path, job('image_path = "x.img"\nimage_pth = "y"'))
    assert "config.image_pth" in str(exc.value) and "image_path" in str(exc.value)


@pytest.mark.parametrize(("config", "needle"), [
    ('image_path = "x.img"\ndrive_interface = "virtio-foo"', "drive_interface"),
    ('image_path = "x.img"\naccelerator = "hvf"', "accelerator"),
    ('image_path = "x.img"\ngraceful_shutdown = "yes"', "graceful_shutdown"),
    ('image_path = 3', "image_path"),
    ('emulator = "x86_64"', "image_path must be set"),
])
def test_bad_values_are_spec_errors(tmp_path: Path, config: str, needle: str) -> None:
    with pytest.raises(SpecError, match=needle):
        plan(tmp_path, job(config))


def test_memory_bounds(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="memory out of bounds"):
        plan(tmp_path, job('image_path = "x.img"', "resources { memory = 64 }"))
    with pytest.raises(SpecError, match="memory out of bounds"):  # not silently the default
        plan(tmp_path, job('image_path = "x.img"', "resources { memory = 0 }"))
    with pytest.raises(SpecError, match="memory out of bounds"):
        plan(tmp_path, job('image_path = "x.img"', "resources { memory = 100000 }"))


def test_interpolation_of_task_dir_in_args(tmp_path: Path) -> None:
    (p,) = plan(tmp_path, job('image_path = "x.img"\nargs = ["-drive", "file=${NOMAD_TASK_DIR}/d.img"]'))
    assert p.spec.args[1] == f"file={p.task_dir.local}/d.img"


def test_legacy_keys_warn_and_map(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    body = job('image_source = "http://h/x.img"\nchecksum = "abc"\nhost_port = 18081\nguest_port = 81')
    with caplog.at_level(logging.WARNING):
        (p,) = plan(tmp_path, body)
    assert "deprecated" in caplog.text
    assert p.artifacts[0].source == "http://h/x.img"
    assert dict(p.artifacts[0].options)["checksum"] == "md5:abc"
    medium = p.spec.drives[0].medium
    assert isinstance(medium, FileMedium) and medium.path == "local/x.img"
    assert forwards(p)[0].guest_port == 81


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'job "j" {\n  group "g" {\n    task = = 3\n')
    with pytest.raises(JobFileError, match=r"job\.hcl:3"):
        load_job(path)


def test_no_qemu_task_is_an_error(tmp_path: Path) -> None:
    body = 'job "j" { group "g" { task "t" { driver = "docker" } } }'
    with pytest.raises(JobFileError, match="no task with a driver vmdriver runs") as exc:
        plan(tmp_path, body)
    assert 'driver = "qemu"' in str(exc.value)


def test_group_count_runs_instances(tmp_path: Path) -> None:
    plans = plan(tmp_path, job('image_path = "x.img"', group_extra="count = 3"))
    assert len(plans) == 3 and len({p.alloc_id for p in plans}) == 3


def test_artifact_blocks_are_interpolated(tmp_path: Path) -> None:
    extra = '''
      env { IMAGE = "disk.qcow2" }
      artifact {
        source      = "http://images.example/${IMAGE}"
        destination = "local/${NOMAD_TASK_NAME}/"
        options { checksum = "sha256:${IMAGE}" }
      }'''
    (p,) = plan(tmp_path, job('image_path = "local/t/disk.qcow2"', extra))
    (art,) = p.artifacts
    assert art.source == "http://images.example/disk.qcow2"
    assert art.destination == "local/t/"
    assert dict(art.options)["checksum"] == "sha256:disk.qcow2"


def test_static_port_in_use_is_refused_before_launch(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        body = job('image_path = "x.img"\nport_map { http = 80 }',
                   group_extra=f'network {{ port "http" {{ static = {port} }} }}')
        with pytest.raises(SpecError, match=f"static port {port} is already in use"):
            plan(tmp_path, body)
        # `vmdriver argv` shows the argv of a job that may be running: no check there.
        (p,) = plan_job(load_job(write(tmp_path, body)), tmp_path / "s", check_ports=False)
        assert p.ports[0].host_port == port


def test_tasks_of_a_group_share_its_ports(tmp_path: Path) -> None:
    body = '''
job "j" {
  group "g" {
    network {
      port "http" {}
    }
    task "a" {
      driver = "qemu"
      config {
        image_path = "a.img"
        port_map { http = 80 }
      }
    }
    task "b" {
      driver = "qemu"
      config {
        image_path = "b.img"
      }
      resources {
        network {
          port "admin" {}
        }
      }
    }
  }
}
'''
    a, b = plan(tmp_path, body)
    assert a.alloc_id == b.alloc_id
    assert [p.label for p in a.ports] == ["http"]
    assert [p.label for p in b.ports] == ["http", "admin"]
    assert a.ports[0].host_port == b.ports[0].host_port != b.ports[1].host_port
    assert b.env["NOMAD_HOST_PORT_http"] == str(a.ports[0].host_port)
