"""Small helpers shared by the artifact tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from vmdriver.artifacts import ArtifactCache, HttpSettings, ProgressEvent, fetch_artifacts
from vmdriver.spec import ArtifactSpec

#: Quick timeouts and backoff so failure tests take well under a second each.
FAST = HttpSettings(connect_timeout=2.0, read_timeout=0.5, attempts=3, backoff=0.01,
                    max_backoff=0.05)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fetch(source: str, task_dir: Path, *, cache: ArtifactCache | None = None,
          events: list[ProgressEvent] | None = None, http: HttpSettings = FAST,
          job_dir: Path | None = None, **fields: object) -> list[Path]:
    """Fetch one artifact built from ``fields`` (options/headers as dicts)."""
    opts = fields.pop("options", {})
    headers = fields.pop("headers", {})
    assert isinstance(opts, dict) and isinstance(headers, dict)
    spec = ArtifactSpec(source=source, options=tuple(sorted(opts.items())),
                        headers=tuple(sorted(headers.items())), **fields)
    return fetch_artifacts((spec,), task_dir, job_dir or task_dir, cache=cache,
                           progress=events.append if events is not None else None,
                           http=http)


def leftovers(*roots: Path) -> list[Path]:
    """Temporary files a failed fetch must not leave behind."""
    out: list[Path] = []
    for root in roots:
        if root.exists():
            out += [p for p in root.rglob("*") if ".vmdriver-" in p.name or p.name.endswith(".part")]
            out += [p for p in (root / "tmp").glob("*")] if (root / "tmp").is_dir() else []
            out += [p for p in (root / "entries").glob("*")] if (root / "entries").is_dir() else []
    return out


def files(root: Path) -> list[str]:
    """Every file under ``root``, relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
