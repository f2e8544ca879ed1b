"""Wait until a Ray cluster has N live nodes; used by slurm/multi_node.sbatch before it starts `rl`.

    python slurm/ray_wait.py ADDRESS NODES [TIMEOUT_S]

Prints one line: ``ray cluster at ADDRESS: K of NODES nodes alive``; exits 0 once K >= NODES, 1 when
TIMEOUT_S (default 300) passes first, 2 on bad arguments.
"""

from __future__ import annotations

import os
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or not argv[1].isdigit() or (len(argv) == 3 and not argv[2].isdigit()):
        print("usage: python slurm/ray_wait.py ADDRESS NODES [TIMEOUT_S]", file=sys.stderr)
        return 2
    address, want = argv[0], int(argv[1])
    deadline = time.monotonic() + (int(argv[2]) if len(argv) == 3 else 300)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    alive, error = 0, ""
    while time.monotonic() < deadline:
        try:
            if not ray.is_initialized():
                ray.init(address=address, log_to_driver=False, logging_level="ERROR")
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            if alive >= want:
                print(f"ray cluster at {address}: {alive} of {want} nodes alive", flush=True)
                ray.shutdown()
                return 0
        except (ConnectionError, RuntimeError) as e:  # the head is not up yet
            error = " ".join(str(e).split())[:200]
        time.sleep(1)
    print(f"error: ray cluster at {address}: {alive} of {want} nodes alive after the timeout"
          + (f" ({error})" if error and not alive else ""), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
