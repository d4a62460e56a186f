"""The canonical VM spec every face maps into."""

from vmdriver.spec.artifact import ArtifactSpec
from vmdriver.spec.model import (
    Accelerator,
    Drive,
    DriveInterface,
    NetworkSpec,
    PortForward,
    Resources,
    ShutdownPolicy,
    VMSpec,
    resolve_in,
)

__all__ = [
    "Accelerator",
    "ArtifactSpec",
    "Drive",
    "DriveInterface",
    "NetworkSpec",
    "PortForward",
    "Resources",
    "ShutdownPolicy",
    "VMSpec",
    "resolve_in",
]
