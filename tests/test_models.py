from __future__ import annotations

import subprocess
import sys
import uuid

from mxm_dataio_async._models import new_id


def test_ids_are_uuid4_text_and_unique() -> None:
    ids = [new_id() for _ in range(5_000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text


_FORK_SCRIPT = """
import os
from mxm_dataio_async._models import new_id

new_id()  # the parent's pool now holds ids it has not handed out yet
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, " ".join(new_id() for _ in range(50)).encode())
    os._exit(0)
os.close(write)
os.waitpid(pid, 0)
with os.fdopen(read) as f:
    child = set(f.read().split())
parent = {new_id() for _ in range(50)}
print(len(child), len(child & parent))
"""


def test_a_forked_child_does_not_reuse_the_parents_ids() -> None:
    # In a fresh interpreter: forking this (threaded) test process is unsafe and warns on 3.12+.
    out = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["50", "0"]
