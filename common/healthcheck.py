"""Docker HEALTHCHECK: exit 0 when ``GET http://127.0.0.1:$PORT/health`` says IDLE or OK.

Plain standard library, because the images carry no curl.
"""

import json
import os
import sys
import urllib.request

try:
    with urllib.request.urlopen(f"http://127.0.0.1:{os.environ['PORT']}/health", timeout=3) as response:
        status = json.load(response).get("status")
except (OSError, ValueError) as exc:
    sys.exit(f"unhealthy: {exc}")
sys.exit(0 if status in ("IDLE", "OK") else f"unhealthy: status {status}")
