"""Names that become paths are checked like Nomad's, in every face, before any path is made."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmdriver.errors import InputError
from vmdriver.jobfile.dialects import DIALECTS
from vmdriver.jobfile.model import load_job
from vmdriver.nomad.proto import driver_pb2 as pb
from vmdriver.nomad.taskconfig import plan_start
from vmdriver.units import check_name

BAD_NAMES = ["../x", "..", ".", "a/b", "/abs", "a\x00b", "a\nb", "a\x1bb", "x" * 129, "",
             " lead", "a\\b", "\x7f"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InputError, match="name") as info:
        check_name(name, where="w", what="task name")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["web", "a b", "x..y", "é-1", "x" * 128, "..a"])
def test_names_nomad_accepts_pass(name: str) -> None:
    assert check_name(name) == name


def _job(tmp_path: Path, job: str = "j", group: str = "g", task: str = "t") -> Path:
    def q(s: str) -> str:
        return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    path = tmp_path / "job.hcl"
    path.write_text(f'job "{q(job)}" {{ group "{q(group)}" {{ task "{q(task)}" {{\n'
                    'driver = "qemu"\nconfig { image_path = "x.img" }\n} } }\n')
    return path


@pytest.mark.parametrize("where", ["job", "group", "task"])
@pytest.mark.parametrize("name", ["../../../../tmp/victim", "..", "a/b", "a\nb"])
def test_job_file_names_refused_before_any_dir_exists(tmp_path: Path, where: str,
                                                      name: str) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    path = _job(tmp_path, **{where: name})
    with pytest.raises(InputError, match=f"{where} name is not a valid name"):
        load_job(path)
    assert (victim / "keep").read_text() == "x"


@pytest.mark.parametrize("field,value", [("name", "../victim"), ("name", ".."),
                                         ("alloc_id", "../../x"), ("alloc_id", "a/b"),
                                         ("name", "t\x00")])
def test_plugin_start_task_names_refused(tmp_path: Path, field: str, value: str) -> None:
    task = pb.TaskConfig(id="a/t/1", name="t", alloc_id="0f2c6a1e-1111-2222-3333-444455556666",
                         alloc_dir=str(tmp_path))
    setattr(task, field, value)
    with pytest.raises(InputError, match="not a valid name"):
        plan_start(task, DIALECTS["qemu"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "x\x00", ".hidden", "-x", "x" * 64])
def test_runner_vm_name_refused(name: str) -> None:
    from vmdriver.runner.config import parse_config

    with pytest.raises(InputError, match="not a VM name"):
        parse_config({"/Runner": {"vm": {"name": name}}}, "c.yaml")
