"""Names used as paths, and bounds on what a job asks of the host: no effect on the host."""

from __future__ import annotations

import json

import pytest

from tests.security.conftest import Canary, Cli, qemu_job, refused_cleanly

#: Each would land a task dir (later removed with rmtree) on the victim dir.
NAME_ATTACKS = [
    ("task", "../../../../{victim}"), ("task", ".."), ("group", "../x"), ("job", "a/b"),
    ("task", "x\\u0000y"), ("task", "t\\n"), ("group", "."), ("task", "x" * 200),
]


@pytest.mark.parametrize("where,name", NAME_ATTACKS, ids=[f"{w}:{n[:20]}" for w, n in NAME_ATTACKS])
def test_names_never_become_paths(where: str, name: str, cli: Cli, canary: Canary) -> None:
    rel = str(canary.path.parent).lstrip("/")
    job = qemu_job(**{where: name.replace("{victim}", rel)})
    status, err = cli.run(job)
    refused_cleanly(status, err, "not a valid name")
    assert canary.untouched() and canary.path.parent.is_dir()
    assert not (cli.root / "state" / "allocs").exists() or \
        not any((cli.root / "state" / "allocs").iterdir())


BOUNDS = [
    ["-m", "1T"], ["-m", "size=1G,maxmem=64T"], ["-smp", "100000"], ["-smp", "cpus=1,maxcpus=9999"],
    ["-object", "memory-backend-ram,id=m,size=1T"], ["-overcommit", "mem-lock=on"],
    ["-smp", "sockets=64,cores=64"],
]


@pytest.mark.parametrize("args", BOUNDS, ids=[" ".join(a) for a in BOUNDS])
@pytest.mark.parametrize("allow", ["", 'args_allowlist = ["-m", "-smp", "-object", "-overcommit"]'])
def test_resource_bounds_hold(args: list[str], allow: str, cli: Cli) -> None:
    status, err = cli.run(qemu_job(f"args = {json.dumps(args)}"), host=allow)
    refused_cleanly(status, err)
    assert cli.qemus() == []


def test_thousands_of_port_labels_refused_before_any_port_is_taken(cli: Cli) -> None:
    ports = "\n".join(f'port "p{i}" {{}}' for i in range(5000))
    status, err = cli.run(qemu_job(extra=f"resources {{ network {{ {ports} }} }}"))
    refused_cleanly(status, err, "too many ports")


@pytest.mark.parametrize("memory", ["resources { memory = 99999999 }"])
def test_resources_memory_bounded(memory: str, cli: Cli) -> None:
    status, err = cli.run(qemu_job(extra=memory))
    assert status == 2 and "memory" in err and "Traceback" not in err
