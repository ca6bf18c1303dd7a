"""An entry point for tests/test_warm_start.py: writes what it sees as a process to argv[1], exits with argv[2]."""
import json
import os
import sys

import torch

if __name__ == "__main__":
    out, code = sys.argv[1], int(sys.argv[2])
    with open(out, "w") as f:
        json.dump({"argv": sys.argv[1:], "sid": os.getsid(0), "pid": os.getpid(), "probe": os.environ.get("PROBE"),
                   "threads": torch.get_num_threads(), "main": __name__}, f)
    if code == 99:
        raise RuntimeError("the probe failed")
    sys.exit(code)
