"""A publisher in its own process, for the race and crash tests.

python -m tests.datasets._publish_child LOCATION NAME FIRST LAST MODE BARRIER [RETRIES]
MODE: ``race`` waits at the swap until the other publisher is there too (files in BARRIER);
``crash`` ends the process (os._exit) after writing parts and manifest, before the swap.
Prints the PublishResult as JSON, or ``conflict`` on PublishConflict.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from mxm_dataio_async.datasets import Dataset, PublishConflict


def main() -> None:
    location, name, first, last, mode, barrier = sys.argv[1:7]
    retries = int(sys.argv[7]) if len(sys.argv) > 7 else 5
    ds = Dataset(location, name, keys=["id"])
    staging = ds.stage()
    staging.add({"id": i, "value": f"v{i}"} for i in range(int(first), int(last)))
    me = Path(barrier) / f"{os.getpid()}"
    swaps = 0

    def before_swap() -> None:
        nonlocal swaps
        swaps += 1
        if mode == "crash":
            os._exit(17)
        if mode == "race" and swaps == 1:
            me.touch()
            deadline = time.monotonic() + 30
            # A real rendezvous of two processes: both must have computed on the same version.
            while len(list(Path(barrier).iterdir())) < 2:
                if time.monotonic() > deadline:
                    raise SystemExit("the other publisher never came")
                time.sleep(0.01)

    try:
        result = ds.publish(staging, retries=retries, before_swap=before_swap)
    except PublishConflict:
        print("conflict")
        return
    finally:
        staging.close()
    print(json.dumps(result.to_json()))


if __name__ == "__main__":
    main()
