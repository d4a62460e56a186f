"""Hostile values in env, cmds and hostname stay data: parsed by real shells, nothing runs."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cloudinit.factory import base_request
from vmdriver.cloudinit import Share, ShareFs
from vmdriver.cloudinit.userdata import (
    ENV_FILE,
    cloud_config_text,
    env_file,
    mount_command,
    profile_script,
    run_command,
)
from vmdriver.errors import SpecError

SHELLS = [s for s in ("bash", "dash") if shutil.which(s)]


def hostile_values(canary: Path) -> dict[str, str]:
    """Values that would run ``touch canary`` if a shell ever evaluated them."""
    c = str(canary)
    return {
        "SUBST": f"$(touch {c})",
        "BACKTICK": f"`touch {c}`",
        "SEMI": f"x; touch {c}",
        "SQUOTE": f"it's '; touch {c}; '",
        "DQUOTE": f'say "hi" "$(touch {c})"',
        "NEWLINE": f"line1\ntouch {c}\nline3",
        "TRAILING_NL": "value\n\n",
        "DOLLAR": "$HOME ${PATH} $0 $@ \\$x",
        "GLOB": "* ? [a-z] ~",
        "EMPTY": "",
        "UNICODE": "grüße 🚀 \u202e",
        "YAML": "- a: b\n# not a comment\n---\n...",
        "BACKSLASH": "a\\\nb\\",
        "CR": "a\rb",
        "TAB": "a\tb",
    }


@pytest.mark.parametrize("shell", SHELLS)
def test_profile_script_round_trips_every_value_literally(shell: str, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    env = hostile_values(canary)
    profile = tmp_path / "nomad.sh"
    profile.write_text(profile_script(env))
    subprocess.run((shell, "-n", str(profile)), check=True, timeout=30)
    for name, value in env.items():
        out = subprocess.run(("env", "-i", shell, "-c", f'. {profile}; printf %s "${name}"'),
                             capture_output=True, timeout=30, check=True)
        assert out.stdout.decode() == value, name
    assert not canary.exists(), "a value was executed"


@pytest.mark.parametrize("shell", SHELLS)
def test_env_file_round_trips_with_set_a(shell: str, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    env = hostile_values(canary)
    path = tmp_path / "env"
    path.write_text(env_file(env))
    script = f'set -a; . {path}; set +a; exec env'
    out = subprocess.run(("env", "-i", shell, "-c", script), capture_output=True, timeout=30, check=True)
    assert not canary.exists()
    # `env` output is ambiguous for values with newlines; check a child sees the simple ones.
    lines = out.stdout.decode().split("\n")
    assert "SUBST=" + env["SUBST"] in lines
    assert "SQUOTE=" + env["SQUOTE"] in lines


def test_the_same_values_survive_the_yaml_layer(tmp_path: Path) -> None:
    env = hostile_values(tmp_path / "canary")
    text = cloud_config_text(base_request(env=env))
    files = {f["path"]: f["content"] for f in yaml.safe_load(text)["write_files"]}
    assert files[ENV_FILE] == env_file(env)


def test_runcmd_runs_each_command_as_given_with_the_task_env(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    out = tmp_path / "out"
    env = hostile_values(canary)
    cmds = (
        f"printf '%s|' \"$SUBST\" \"$SQUOTE\" > {out}",
        f"echo \"it's $((6 * 7))\" >> {out}",  # a command is shell code: it runs as written
        "exit 3",  # fails alone; the next one still runs
        f"echo last >> {out}",
    )
    req = base_request(env=env, cmds=cmds)
    envfile = tmp_path / "env"
    envfile.write_text(env_file(env))
    lines = yaml.safe_load(cloud_config_text(req))["runcmd"]
    assert len(lines) == len(cmds)
    # cloud-init writes runcmd strings one per line into a sh script; do the same.
    script = tmp_path / "runcmd"
    script.write_text("#!/bin/sh\n" + "".join(line.replace(ENV_FILE, str(envfile)) + "\n" for line in lines))
    subprocess.run(("sh", "-n", str(script)), check=True, timeout=30)
    subprocess.run(("env", "-i", "PATH=/usr/bin:/bin", "sh", str(script)), timeout=30, check=True)
    assert out.read_text() == f"{env['SUBST']}|{env['SQUOTE']}|it's 42\nlast\n"
    assert not canary.exists()


@pytest.mark.parametrize("field", ["env", "cmds", "hostname", "user_data"])
def test_nul_is_refused_with_the_field_named(field: str) -> None:
    value: object = {"env": {"A": "x\0y"}, "cmds": ("echo\0",), "hostname": "a\0b",
                     "user_data": "#cloud-config\0"}[field]
    with pytest.raises(SpecError) as err:
        base_request(**{field: value})
    assert err.value.where.startswith(field)


@pytest.mark.parametrize("name", ["A B", "1A", "A-B", "A=B", "$(x)", ""])
def test_env_names_a_shell_cannot_assign_are_refused(name: str) -> None:
    with pytest.raises(SpecError, match="not a shell variable name"):
        base_request(env={name: "v"})


def test_hostile_cmds_stay_one_yaml_item_each() -> None:
    cmds = ("a: b", "- c", "# d", "e\n- f", "'g'", '"h"', "{i: j}", "&k *l", "| m", "!n")
    runcmd = yaml.safe_load(cloud_config_text(base_request(cmds=cmds)))["runcmd"]
    assert runcmd == [run_command(c) for c in cmds]
    assert all(shlex.split(line)[2].endswith(cmd) for line, cmd in zip(runcmd, cmds, strict=True))


@pytest.mark.parametrize(("attached", "mount_ok", "expect"), [
    ("9p", "9p", ["9p"]),
    ("9p", "virtiofs", ["9p", "virtiofs"]),
    ("virtiofs", "virtiofs", ["virtiofs"]),
    ("virtiofs", "none", ["virtiofs", "9p"]),
])
def test_mount_lines_try_the_attached_fs_first_then_the_other(
        tmp_path: Path, attached: str, mount_ok: str, expect: list[str]) -> None:
    # Stub mkdir/mountpoint/mount on PATH: the line's logic runs for real, nothing is mounted.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls"
    stubs = {
        "mkdir": 'echo "mkdir $*" >> "$LOG"',
        "mountpoint": "exit 1",
        "mount": f'echo "mount $*" >> "$LOG"; [ "$2" = {mount_ok} ]',
    }
    for name, body in stubs.items():
        (bindir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bindir / name).chmod(0o755)
    share = Share("alloc", "/alloc", ShareFs(attached))
    line = mount_command(share)
    proc = subprocess.run(("sh", "-c", line), env={"PATH": f"{bindir}:/usr/bin:/bin", "LOG": str(log)},
                          capture_output=True, text=True, timeout=30, check=False)
    calls = log.read_text().splitlines()
    assert calls[0] == "mkdir -p /alloc"
    assert [c.split()[2] for c in calls[1:]] == expect
    assert all(c.endswith("alloc /alloc") and (",ro " in c or "-o ro " in c) for c in calls[1:])
    failed = mount_ok == "none"
    assert ("vmdriver: cannot mount tag alloc" in proc.stderr) == failed
    assert proc.returncode == 0 or failed
