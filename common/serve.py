"""``python -m common.serve processors/green-tint/green_tint.py``: run one processor as a server.

The processor module defines one processor class; its ``model_id`` and ``default_port`` are the
defaults, overridden by ``--model-id/--host/--port`` or ``MODEL_ID/HOST/PORT`` (HOST defaults to
127.0.0.1). ``BYOC_TOKEN`` is the bearer token every route but /health and /version requires
(see :func:`token_from_env`); ``MAX_JOBS`` caps the open trickle jobs (default 64);
``WORK_WAIT_SECONDS`` is how long a one-shot job waits for a busy processor (default 30) before
it is answered 503 ``busy``. Live streams (``POST /stream/start``): ``STREAM_CAPACITY`` streams at
once (default 1), ``TRICKLE_TIMEOUT`` and ``TRICKLE_VERIFY_TLS`` (see ``common/live/stream.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import logging
import os
import secrets
import sys
from pathlib import Path

from .app import Settings, create_app
from .http import DEFAULT_MAX_BODY_BYTES
from .live.stream import LiveSettings
from .logs import configure_logging
from .malloc import collect_cycles_less_often, keep_freed_memory
from .processor import BaseProcessor, ImageProcessor, Processor
from .registration import Registration
from .server import serve

log = logging.getLogger("serve")


def load_processor_class(path: str) -> type[BaseProcessor]:
    """Import a processor module by file path and return the processor class it defines."""
    module_path = Path(path)
    spec = importlib.util.spec_from_file_location(module_path.stem, module_path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"serve: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_path.stem] = module
    spec.loader.exec_module(module)
    found = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, BaseProcessor)
        and obj not in (BaseProcessor, Processor, ImageProcessor)
        and obj.__module__ == module.__name__
    ]
    if len(found) != 1:
        raise SystemExit(f"serve: {path} must define exactly one processor class, found {found}")
    return found[0]


def token_from_env() -> str | None:
    """The bearer token every route but /health and /version will need.

    BYOC_TOKEN when set; else, for a container that registers itself (ORCH_URL and ORCH_SECRET),
    a random one it registers with; else none only when ALLOW_NO_TOKEN=1 says so (development).
    """
    token = os.environ.get("BYOC_TOKEN", "")
    if token:
        return token
    if os.environ.get("ORCH_URL") and os.environ.get("ORCH_SECRET"):
        return secrets.token_urlsafe(32)
    if os.environ.get("ALLOW_NO_TOKEN") == "1":
        log.warning("ALLOW_NO_TOKEN=1: every route is open to anyone who can reach this port")
        return None
    raise SystemExit(
        "serve: no BYOC_TOKEN. Set BYOC_TOKEN to the bearer token the orchestrator sends (its "
        "-byocToken), or ORCH_URL and ORCH_SECRET to register with a generated one; "
        "ALLOW_NO_TOKEN=1 serves without a token (development only)."
    )


def registration_from_env(model_id: str, port: int, token: str | None) -> Registration | None:
    """Self-register when ORCH_URL and ORCH_SECRET are set, as a PyTrickle worker does.

    pytrickle's variable names are read first, then ours: CAPABILITY_URL (or CONTAINER_URL) is
    how the orchestrator reaches us, CAPABILITY_NAME the capability (default: the model id),
    CAPABILITY_CAPACITY (or CAPACITY) its capacity, 1..1024. REGISTER_INTERVAL (seconds, default
    10) is how often the registration is renewed, so a restarted orchestrator gets us back.
    """
    orch_url, secret = os.environ.get("ORCH_URL"), os.environ.get("ORCH_SECRET")
    if not (orch_url and secret):
        return None
    capacity_text = _env("CAPABILITY_CAPACITY", "CAPACITY") or "1"
    if not capacity_text.isdigit() or not 1 <= int(capacity_text) <= 1024:
        raise SystemExit(f"serve: CAPABILITY_CAPACITY must be an integer 1..1024, got {capacity_text!r}")
    return Registration(
        token=token,
        orch_url=orch_url,
        secret=secret,
        name=_env("CAPABILITY_NAME") or model_id,
        url=_env("CAPABILITY_URL", "CONTAINER_URL") or f"http://127.0.0.1:{port}",
        capacity=int(capacity_text),
        interval=float(os.environ.get("REGISTER_INTERVAL", "10")),
    )


def _env(*names: str) -> str | None:
    """The first of ``names`` set to a non-empty value."""
    return next((value for name in names if (value := os.environ.get(name))), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.serve", description=__doc__)
    parser.add_argument("processor", help="path to the processor module")
    parser.add_argument("--model-id", default=os.environ.get("MODEL_ID"))
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=os.environ.get("PORT"))
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=int(os.environ.get("MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)),
    )
    parser.add_argument(
        "--job-idle-seconds", type=float, default=float(os.environ.get("JOB_IDLE_SECONDS", 300))
    )
    parser.add_argument("-v", "--verbose", action="store_true", default=bool(os.environ.get("VERBOSE")))
    args = parser.parse_args(argv)

    keep_freed_memory()
    cls = load_processor_class(args.processor)
    if args.model_id:
        cls.model_id = args.model_id
    configure_logging(cls.model_id, args.verbose)
    port = args.port or cls.default_port
    token = token_from_env()
    settings = Settings(
        max_body_bytes=args.max_body_bytes,
        job_idle_seconds=args.job_idle_seconds,
        max_jobs=int(os.environ.get("MAX_JOBS", "64")),
        work_wait_seconds=float(os.environ.get("WORK_WAIT_SECONDS", "30")),
        token=token,
        live=LiveSettings.from_env(),
    )
    app = create_app(cls(), settings, registration_from_env(cls.model_id, port, token))
    log.info("%s (%s) listening on %s:%d", cls.model_id, cls.__name__, args.host, port)
    collect_cycles_less_often()
    serve(app, args.host, port)


if __name__ == "__main__":
    main()
