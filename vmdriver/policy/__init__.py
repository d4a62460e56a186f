"""Operator policy: which images, QEMU flags and emulators a job may use."""

from vmdriver.policy.checks import check_args, check_emulator, check_image_path

__all__ = ["check_args", "check_emulator", "check_image_path"]
