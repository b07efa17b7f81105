"""``python -m node -orchestrator ...`` / ``python -m node -gateway ...``.

Flags follow go-livepeer's single-dash style (``--flag`` and ``-flag=value`` work too); every
flag can also come from an ``LP_``-prefixed environment variable, e.g. ``LP_ORCHSECRET``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from common.http import DEFAULT_MAX_BODY_BYTES
from common.logs import configure_logging
from common.malloc import keep_freed_memory
from common.server import serve

from .gateway import GatewayConfig, create_gateway_app
from .orchestrator import OrchestratorConfig, create_orchestrator_app
from .registry import Capability, Registry

log = logging.getLogger("node")

DEFAULT_GATEWAY_PORT = 8935
DEFAULT_ORCHESTRATOR_PORT = 8936


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
    if kind is bool:
        on = (env or "").lower() in ("1", "true", "yes")
        parser.add_argument(f"-{name}", f"--{name}", dest=name, action="store_true", default=on, help=help)
    elif kind is list:  # repeatable; LP_NAME holds a comma-separated list
        parser.add_argument(f"-{name}", f"--{name}", dest=name, action=_Repeated, help=help,
                            default=[env] if env else None)  # fmt: skip
    else:
        parser.add_argument(f"-{name}", f"--{name}", dest=name, type=kind, help=help,
                            default=kind(env) if env else default)  # fmt: skip


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
        ("byocModelID", list, None, "orchestrator: a model id to register at start (repeatable)"),
        ("byocContainerURL", list, None, "orchestrator: container URL of the -byocModelID in that position"),
        ("byocCapacity", int, 1, "orchestrator: concurrent jobs per -byocModelID container (default 1)"),
        ("maxBodyBytes", int, DEFAULT_MAX_BODY_BYTES, f"largest body (default {DEFAULT_MAX_BODY_BYTES})"),
        ("v", int, 3, "log verbosity; 5 or more also logs debug lines"),
    ]:  # fmt: skip
        _flag(parser, name, help, default, kind)
    return parser


def _url(addr: str) -> str:
    return (addr if "://" in addr else f"http://{addr}").rstrip("/")


def _listen(addr: str | None, default_port: int) -> tuple[str, int]:
    host, _, port = (addr or f"0.0.0.0:{default_port}").rpartition(":")
    return host or "0.0.0.0", int(port)


def _secret(value: str | None) -> str:
    if not value:
        raise SystemExit("node: -orchestrator needs -orchSecret (the secret containers register with)")
    path = Path(value)
    return path.read_text().strip() if path.is_file() else value


def _flag_capabilities(args: argparse.Namespace) -> list[Capability]:
    model_ids, urls = _split(args.byocModelID), _split(args.byocContainerURL)
    if len(model_ids) != len(urls):
        raise SystemExit(
            f"node: {len(model_ids)} -byocModelID but {len(urls)} -byocContainerURL; give them in pairs"
        )
    return [
        Capability(name=m, url=_url(u), capacity=args.byocCapacity, protocol="trickle")
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
    if args.gateway:
        host, port = _listen(args.httpAddr, DEFAULT_GATEWAY_PORT)
        orchs = [_url(a) for a in args.orchAddr.split(",") if a]
        app = create_gateway_app(GatewayConfig(orch_addrs=orchs, max_body_bytes=args.maxBodyBytes))
        log.info("gateway listening on %s:%d, orchestrators: %s", host, port, ", ".join(orchs))
    else:
        host, port = _listen(args.httpAddr, DEFAULT_ORCHESTRATOR_PORT)
        registry = Registry()
        for capability in _flag_capabilities(args):
            registry.register(capability)
        config = OrchestratorConfig(
            service_addr=_url(args.serviceAddr or f"127.0.0.1:{port}"),
            secret=_secret(args.orchSecret),
            max_body_bytes=args.maxBodyBytes,
        )
        app = create_orchestrator_app(config, registry)
        log.info("orchestrator listening on %s:%d, service address %s", host, port, config.service_addr)
    serve(app, host, port)


if __name__ == "__main__":
    sys.exit(main())
