"""The config watcher sees in-place writes, editor renames and ConfigMap symlink swaps."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from vmdriver.errors import SpecError
from vmdriver.runner.config import RunnerConfig
from vmdriver.runner.watch import watch_config

CONFIG = '"/Runner":\n  vm: {{name: v, currentCpus: {cpus}}}\n'


async def next_update(updates: asyncio.Queue[RunnerConfig | SpecError], timeout: float = 5
                      ) -> RunnerConfig | SpecError:
    return await asyncio.wait_for(updates.get(), timeout)


async def collect(path: Path, updates: asyncio.Queue[RunnerConfig | SpecError]) -> None:
    async for item in watch_config(path, debounce=0.05):
        await updates.put(item)


async def scenario(tmp: Path) -> list[object]:
    seen: list[object] = []
    # A ConfigMap volume: config.yaml -> ..data/config.yaml, ..data -> ..<timestamp>.
    first = tmp / "..2026_12_01_1"
    first.mkdir()
    (first / "config.yaml").write_text(CONFIG.format(cpus=1))
    (tmp / "..data").symlink_to(first.name)
    path = tmp / "config.yaml"
    path.symlink_to("..data/config.yaml")
    updates: asyncio.Queue[RunnerConfig | SpecError] = asyncio.Queue()
    task = asyncio.create_task(collect(path, updates))
    await asyncio.sleep(0.2)
    try:
        # The kubelet's update: new dir, new symlink, renamed over ..data.
        second = tmp / "..2026_12_01_2"
        second.mkdir()
        (second / "config.yaml").write_text(CONFIG.format(cpus=2))
        (tmp / "..data_tmp").symlink_to(second.name)
        os.replace(tmp / "..data_tmp", tmp / "..data")
        seen.append(await next_update(updates))
        # The same content again: nothing to report.
        third = tmp / "..2026_12_01_3"
        third.mkdir()
        (third / "config.yaml").write_text(CONFIG.format(cpus=2))
        (tmp / "..data_tmp").symlink_to(third.name)
        os.replace(tmp / "..data_tmp", tmp / "..data")
        # A plain file written in place, then a bad edit, then an editor's rename.
        path.unlink()
        path.write_text(CONFIG.format(cpus=3))
        seen.append(await next_update(updates))
        path.write_text('"/Runner":\n  vm: {name: v, curentCpus: 4}\n')
        seen.append(await next_update(updates))
        (tmp / ".config.yaml.swp").write_text(CONFIG.format(cpus=4))
        os.replace(tmp / ".config.yaml.swp", path)
        seen.append(await next_update(updates))
        assert updates.empty()
    finally:
        task.cancel()
    return seen


def test_watch(tmp_path: Path) -> None:
    seen = asyncio.run(scenario(tmp_path))
    cpus = [s.vm.current_cpus if isinstance(s, RunnerConfig) else str(s) for s in seen]
    assert cpus[0] == 2 and cpus[1] == 3 and cpus[3] == 4
    assert "vm.curentCpus: unknown key 'curentCpus'; did you mean 'currentCpus'?" in str(cpus[2])
