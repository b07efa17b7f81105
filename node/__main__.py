"""``python -m node -orchestrator ...`` / ``python -m node -gateway ...``.

Flags follow go-livepeer's single-dash style (``--flag`` and ``-flag=value`` work too); every
flag can also come from an ``LP_``-prefixed environment variable, e.g. ``LP_ORCHSECRET``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import Any

from common.http import DEFAULT_MAX_BODY_BYTES
from common.logs import configure_logging
from common.malloc import collect_cycles_less_often, keep_freed_memory
from common.server import serve

from .gateway import GatewayConfig, create_gateway_app
from .jobs import JobLimits
from .orchestrator import OrchestratorConfig, create_orchestrator_app
from .registration import MAX_CAPACITY, Protocol, Registration
from .registry import QueuePolicy, Registry
from .sched import relay_slice
from .stream_gateway import stream_config
from .stream_orchestrator import StreamLimits

log = logging.getLogger("node")

DEFAULT_GATEWAY_PORT = 8935
DEFAULT_ORCHESTRATOR_PORT = 8936
INSECURE_SECRET = "orch-secret"  # published in old READMEs and compose files: refused by default


def _env(name: str) -> str | None:
    return os.environ.get("LP_" + name.upper())


class _Repeated(argparse.Action):
    """``action="append"`` whose command-line values replace the ``LP_`` default, not add to it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        current = getattr(namespace, self.dest, None)
        setattr(
            namespace, self.dest, [*([] if current is None or current is self.default else current), values]
        )


def _flag(
    parser: argparse.ArgumentParser, name: str, help: str, default: Any = None, kind: type = str
) -> None:
    """Add ``-name``/``--name``; its default comes from ``LP_NAME`` when that is set."""
    env = _env(name)
    if env and kind not in (bool, list):
        try:
            env = kind(env)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise SystemExit(f"node: LP_{name.upper()}={env!r} is not valid for -{name}: {exc}") from None
    if kind is bool:
        on = (env or "").lower() in ("1", "true", "yes")
        parser.add_argument(f"-{name}", f"--{name}", dest=name, action="store_true", default=on, help=help)
    elif kind is list:  # repeatable; LP_NAME holds a comma-separated list
        parser.add_argument(f"-{name}", f"--{name}", dest=name, action=_Repeated, help=help,
                            default=[env] if env else None)  # fmt: skip
    else:
        parser.add_argument(f"-{name}", f"--{name}", dest=name, type=kind, help=help,
                            default=env if env else default)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m node", description=__doc__, add_help=False, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("-h", "-help", "--help", action="help", help="show this help and exit")
    gateway, orchestrator = DEFAULT_GATEWAY_PORT, DEFAULT_ORCHESTRATOR_PORT
    for name, kind, default, help in [
        ("gateway", bool, None, f"run as the Gateway (the client-facing job API, port {gateway})"),
        ("orchestrator", bool, None, f"run as the Orchestrator (jobs to containers, port {orchestrator})"),
        ("network", str, "offchain", "only 'offchain' is supported"),
        ("httpAddr", str, None, f"host:port to listen on (default 0.0.0.0:{gateway} / :{orchestrator})"),
        ("serviceAddr", str, None, "orchestrator: URL gateways use to reach it (default http://127.0.0.1:<port>)"),
        ("orchAddr", str, f"127.0.0.1:{orchestrator}", "gateway: comma-separated orchestrator addresses"),
        ("orchSecret", str, None, "orchestrator: secret for /capability/register, or a file holding it"),
        ("insecureDefaults", bool, None, "orchestrator: allow the published secret (local demo only)"),
        ("byocModelID", list, None, "orchestrator: a model id to register at start (repeatable)"),
        ("byocContainerURL", list, None, "orchestrator: container URL of the -byocModelID in that position"),
        ("byocCapacity", list, None, "orchestrator: jobs at once per container: N, or model=N (default 1)"),
        ("byocToken", str, None, "orchestrator: the containers' BYOC_TOKEN, or a file holding it"),
        ("byocQueue", _count(0, 4096), 16, "orchestrator: jobs that may wait per busy model (default 16)"),
        ("byocQueueTimeout", _seconds, 10.0, "orchestrator: longest wait in that queue (default 10s)"),
        ("maxJobTimeout", _count(1, 86400), 300, "cap on a job's or stream's timeout_seconds (default 300)"),
        ("streamIdleTimeout", _count(1, 86400), 30, "seconds without input ending a stream (default 30)"),
        ("streamEventTimeout", _count(1, 86400), 30, "no-event seconds: a stream ends or moves (30)"),
        ("maxStreamLifetime", _count(1, 604800), 3600, "longest live stream in s (default 3600)"),
        ("maxStreams", _count(1, 4096), 64, "gateway: live streams at once (default 64)"),
        ("dataKeepalive", _seconds, 15.0, "gateway: a comment on a quiet data stream (SSE) this often (15s)"),
        ("maxBodyBytes", int, DEFAULT_MAX_BODY_BYTES, f"largest body (default {DEFAULT_MAX_BODY_BYTES})"),
        ("v", int, 3, "log verbosity; 5 or more also logs debug lines"),
    ]:  # fmt: skip
        _flag(parser, name, help, default, kind)
    return parser


def _count(low: int, high: int) -> Any:
    """An argparse type: an integer from ``low`` to ``high``."""

    def count(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{number} is not from {low} to {high}")
        return number

    return count


def _seconds(value: str) -> float:
    """An argparse type: seconds, as ``10s`` (go-livepeer's duration style) or ``10``."""
    try:
        seconds = float(value.removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration such as 10s") from None
    if not math.isfinite(seconds) or not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration from 0 to 3600s")
    return seconds


def _url(addr: str) -> str:
    return (addr if "://" in addr else f"http://{addr}").rstrip("/")


def _listen(addr: str | None, default_port: int) -> tuple[str, int]:
    host, _, port = (addr or f"0.0.0.0:{default_port}").rpartition(":")
    return host or "0.0.0.0", int(port)


def _literal_or_file(value: str | None) -> str:
    """go-livepeer's convention for secrets: the value itself, or a file holding it."""
    if not value:
        return ""
    path = Path(value)
    return path.read_text().strip() if path.is_file() else value


def _secret(value: str | None, insecure: bool) -> str:
    """The registration secret. An empty or published one lets anyone who reaches the port
    register a container and receive every user's jobs, so it is refused unless asked for."""
    secret = _literal_or_file(value)
    if secret and secret != INSECURE_SECRET:
        return secret
    if not insecure:
        raise SystemExit(
            "node: -orchestrator needs a secret of its own in -orchSecret (or LP_ORCHSECRET, or a file "
            f"holding it); {repr(secret) if secret else 'an empty one'} lets anyone register containers. "
            "Make one: python -c 'import secrets; print(secrets.token_hex(32))'. "
            f"For a local demo only: -network offchain -insecureDefaults accepts {INSECURE_SECRET!r}"
        )
    log.warning(
        "-insecureDefaults: registration secret %r is published; do not expose this port", INSECURE_SECRET
    )
    return secret or INSECURE_SECRET


def _token(value: str | None) -> str:
    token = _literal_or_file(value)
    if not all("!" <= c <= "~" for c in token):
        raise SystemExit(
            "node: -byocToken must be visible ASCII without spaces (it is sent as 'Bearer <token>')"
        )
    return token


def _capacities(values: list[str] | None, model_ids: list[str]) -> dict[str, int]:
    """``-byocCapacity``: ``N`` for every model id, ``model=N`` for one; a model id given neither
    gets 1 (the tutorial's one job at a time)."""
    default, own = 1, {}
    for item in _split(values):
        model, named, number = item.rpartition("=")
        try:
            capacity = _count(1, MAX_CAPACITY)(number)
        except argparse.ArgumentTypeError as exc:
            raise SystemExit(f"node: -byocCapacity {item!r}: {exc}") from None
        if not named:
            default = capacity
        elif model in model_ids:
            own[model] = capacity
        else:
            raise SystemExit(
                f"node: -byocCapacity {item!r} names no -byocModelID (given: {', '.join(model_ids)})"
            )
    return {model: own.get(model, default) for model in model_ids}


def _flag_registrations(args: argparse.Namespace) -> list[Registration]:
    model_ids, urls = _split(args.byocModelID), _split(args.byocContainerURL)
    if len(model_ids) != len(urls):
        raise SystemExit(
            f"node: {len(model_ids)} -byocModelID but {len(urls)} -byocContainerURL; give them in pairs"
        )
    capacities, token = _capacities(args.byocCapacity, model_ids), _token(args.byocToken)
    if model_ids and not token:
        log.warning("no -byocToken: containers that require a bearer token (BYOC_TOKEN) will answer 401")
    return [
        Registration(name=m, url=_url(u), capacity=capacities[m], protocol=Protocol.TRICKLE, token=token)
        for m, u in zip(model_ids, urls, strict=True)
    ]


def _split(values: list[str] | None) -> list[str]:
    return [v for value in values or [] for v in value.split(",") if v]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.network != "offchain":
        raise SystemExit(f"node: -network {args.network} is not supported; only -network offchain is")
    if args.gateway == args.orchestrator:
        raise SystemExit("node: choose exactly one role: -gateway or -orchestrator")
    role = "gateway" if args.gateway else "orchestrator"
    keep_freed_memory()
    configure_logging(role, verbose=args.v >= 5)
    relay_slice()  # before any thread starts: they inherit it
    if args.gateway:
        host, port = _listen(args.httpAddr, DEFAULT_GATEWAY_PORT)
        orchs = [_url(a) for a in args.orchAddr.split(",") if a]
        app = create_gateway_app(
            GatewayConfig(
                orch_addrs=orchs,
                max_body_bytes=args.maxBodyBytes,
                max_job_timeout=args.maxJobTimeout,
                live=stream_config(
                    args.maxStreams,
                    args.streamIdleTimeout,
                    args.streamEventTimeout,
                    args.maxStreamLifetime,
                    args.dataKeepalive,
                ),
            )
        )
        log.info("gateway listening on %s:%d, orchestrators: %s", host, port, ", ".join(orchs))
    else:
        host, port = _listen(args.httpAddr, DEFAULT_ORCHESTRATOR_PORT)
        registry = Registry(QueuePolicy(limit=args.byocQueue, wait=args.byocQueueTimeout))
        for registration in _flag_registrations(args):
            registry.register(registration)
        config = OrchestratorConfig(
            service_addr=_url(args.serviceAddr or f"127.0.0.1:{port}"),
            secret=_secret(args.orchSecret, args.insecureDefaults and args.network == "offchain"),
            limits=JobLimits(
                max_body_bytes=args.maxBodyBytes,
                max_job_timeout=args.maxJobTimeout,
            ),
            stream_limits=StreamLimits(
                idle_timeout=args.streamIdleTimeout,
                event_timeout=args.streamEventTimeout,
                max_lifetime=args.maxStreamLifetime,
            ),
        )
        app = create_orchestrator_app(config, registry)
        log.info("orchestrator listening on %s:%d, service address %s", host, port, config.service_addr)
    collect_cycles_less_often()
    serve(app, host, port)


if __name__ == "__main__":
    main()
