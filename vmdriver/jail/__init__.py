"""QEMU in a jail: its own uid, no capabilities, a mount namespace of its own files.

See docs/jail.md. Imports only :mod:`vmdriver.errors`, so the host layer (the
fingerprint) and the runtime can both use it.
"""
