"""settle_malloc: socket-read buffers from glibc's heap, not an mmap each (``_malloc.py``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys
from pathlib import Path

import pytest

import mxm_dataio_async._malloc as malloc_module

# A fresh interpreter without site (nothing imported that may have freed a large buffer): it loads
# _malloc.py by path, optionally settles, then counts the mapped chunks a 300 KiB buffer adds.
_PROBE = """
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("m", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
if sys.argv[2] == "settle":
    m.settle_malloc()
    m.settle_malloc()  # once per process: the second call does nothing
before = libc.mallinfo2().hblks
buffer = bytes(300 * 1024)
print(libc.mallinfo2().hblks - before)
"""


def _mapped_chunks_added(settle: bool) -> int:
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            _PROBE,
            str(Path(malloc_module.__file__)),
            "settle" if settle else "as-is",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def test_after_settling_a_read_sized_buffer_comes_from_the_heap() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("not glibc >= 2.33 (no mallinfo2): nothing to settle")
    unsettled = _mapped_chunks_added(settle=False)
    if unsettled == 0:
        pytest.skip("this interpreter's malloc already serves 300 KiB from its heap at start")
    assert unsettled == 1  # the probe sees the mapping (so it can see its absence below)
    assert _mapped_chunks_added(settle=True) == 0
