"""The floor for bench_green_tint's (b): green-tint behind the barest HTTP container Python has.

    .venv/bin/python -m uvicorn --app-dir bench bare_green_tint:app --http httptools --loop uvloop

One ASGI function on uvicorn (httptools, uvloop, as the container runs): read the body, hand it
to a worker thread for the processor's own decode + tint + encode, answer. No routing, no auth,
no limits, no error handling, no job bookkeeping: what is left over it in (b) is the runtime's
own cost (common/app.py and common/server.py), the rest is what any Python HTTP container pays.
Not a product: it answers every request, whatever its method, path or body.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.malloc import collect_cycles_less_often, keep_freed_memory  # noqa: E402
from common.serve import load_processor_class  # noqa: E402

keep_freed_memory()  # as common/serve.py does for the container
processor = load_processor_class(str(ROOT / "processors/green-tint/green_tint.py"))()
collect_cycles_less_often()  # likewise, once started (uvicorn imports this module, then serves)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":  # lifespan: nothing to start
        return
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    output = await asyncio.to_thread(processor._transform, b"".join(chunks))
    headers = [(b"content-type", output.content_type.encode()), (b"content-length", b"%d" % len(output.body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": output.body})
