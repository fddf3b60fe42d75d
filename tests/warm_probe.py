"""An entry for the warm server's tests (tests/test_warm_start.py): reports what the child sees."""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    import torch

    verb, *rest = argv
    if verb == "describe":
        print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "argv": sys.argv,
                          "env": dict(os.environ), "torch_threads": torch.get_num_threads()}))
        print("to stderr", file=sys.stderr)
        return int(rest[0])
    if verb == "sleep":
        print(os.getpid(), flush=True)
        time.sleep(float(rest[0]))
        return 0
    if verb == "raise":
        raise RuntimeError("the probe failed")
    if verb == "exit":
        sys.exit(rest[0])
    raise ValueError(verb)
