"""VMs starting at once grant their uids on the same dirs: no grant may be lost."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from vmdriver.jail import dirs


def test_concurrent_grants_and_revokes_keep_every_entry(tmp_path: Path) -> None:
    target = tmp_path / "shared-parent"
    target.mkdir(mode=0o700)
    uids = list(range(300000, 300032))
    threads = [threading.Thread(target=dirs.grant, args=(str(target), u, 1)) for u in uids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each uid may pass (the read-modify-write of the ACL lost none of them).
    assert [u for u in uids if not dirs._can(str(target), u, [], 1)] == []
    threads = [threading.Thread(target=dirs.revoke, args=(str(target), u)) for u in uids[::2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    left = {u for u in uids if dirs._can(str(target), u, [], 1)}
    assert left == set(uids[1::2])
    assert os.stat(target).st_mode & 0o007 == 0
