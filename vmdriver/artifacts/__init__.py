"""Artifacts: the files a task needs (VM images), fetched over HTTP(S) or from files,
verified by checksum, unpacked safely, cached per host, with progress reports."""

from vmdriver.artifacts.cache import DEFAULT_MAX_BYTES, ArtifactCache, default_cache_dir
from vmdriver.artifacts.fetch import fetch_artifacts, fetch_artifacts_async
from vmdriver.artifacts.http import HttpSettings
from vmdriver.artifacts.progress import ProgressCallback, ProgressEvent, progress_display

__all__ = [
    "DEFAULT_MAX_BYTES",
    "ArtifactCache",
    "HttpSettings",
    "ProgressCallback",
    "ProgressEvent",
    "default_cache_dir",
    "fetch_artifacts",
    "fetch_artifacts_async",
    "progress_display",
]
