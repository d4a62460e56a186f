"""Placing a task's artifacts into its task dir.

Interim implementation: local files only (a path relative to the job file, or
file://), copied into the destination. HTTP(S), checksums, archives and the
shared cache come with the artifacts issue.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

from vmdriver.errors import ArtifactError
from vmdriver.spec import ArtifactSpec


def fetch_artifacts(artifacts: tuple[ArtifactSpec, ...], task_dir: Path, job_dir: Path) -> list[Path]:
    """Fetch each artifact into ``task_dir``; return the paths placed."""
    placed = []
    for art in artifacts:
        url = urlparse(art.source)
        if url.scheme not in ("", "file"):
            raise ArtifactError(art.source, f"scheme {url.scheme!r} is not supported yet")
        src = Path(url.path if url.scheme else art.source)
        src = src if src.is_absolute() else job_dir / src
        if not src.is_file():
            raise ArtifactError(art.source, "no such file")
        dest_dir = (task_dir / art.destination).resolve()
        if task_dir.resolve() not in (dest_dir, *dest_dir.parents):
            raise ArtifactError(art.source, "destination leaves the task dir")
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / src.name
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
        placed.append(dest)
    return placed
