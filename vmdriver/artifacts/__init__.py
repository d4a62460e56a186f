"""Artifacts: fetching the files a task needs (VM images) into its task dir."""

from vmdriver.artifacts.fetch import fetch_artifacts

__all__ = ["fetch_artifacts"]
