"""What a process the tests start sees, printed as JSON for test_warm_start.py; then it exits with argv[2], or
sleeps until a signal ends it when argv[1] is "sleep"."""

import atexit
import json
import os
import sys
import time

atexit.register(lambda: print("atexit ran", flush=True))
print(json.dumps({"argv": sys.argv[1:], "argv0": os.path.basename(sys.argv[0]), "cwd": os.getcwd(),
                  "path0": sys.path[0], "probe": os.environ.get("PROBE"), "own_session": os.getsid(0) == os.getpid(),
                  "name": __name__, "stdin": sys.stdin.read()}), flush=True)
print("to stderr", file=sys.stderr, flush=True)
if sys.argv[1] == "sleep":
    time.sleep(120)
sys.exit(int(sys.argv[2]))
