"""vmdriver: run QEMU virtual machines as tasks."""

__version__ = "0.1.0"
