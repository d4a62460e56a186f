"""Benchmarks: vmdriver against bare QEMU and libvirt, interleaved in one run (python -m bench)."""
