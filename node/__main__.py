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

import uvicorn

from common.http import DEFAULT_MAX_BODY_BYTES
from common.logs import configure_logging
from common.malloc import keep_freed_memory

from .gateway import GatewayConfig, create_gateway_app
from .orchestrator import OrchestratorConfig, create_orchestrator_app
from .registry import Capability, Registry

log = logging.getLogger("node")

DEFAULT_GATEWAY_PORT = 8935
DEFAULT_ORCHESTRATOR_PORT = 8936


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get("LP_" + name.upper(), default)


def _env_list(name: str) -> list[str]:
    value = _env(name)
    return [v for v in value.split(",") if v] if value else []


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs: object) -> None:
    parser.add_argument(f"-{name}", f"--{name}", dest=name, **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m node",
        description=__doc__,
        add_help=False,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-h", "-help", "--help", action="help", help="show this help and exit")
    on = ("1", "true", "yes")
    _flag(
        parser,
        "gateway",
        action="store_true",
        default=_env("gateway", "") in on,
        help="run as the Gateway (client-facing job API, default port 8935)",
    )
    _flag(
        parser,
        "orchestrator",
        action="store_true",
        default=_env("orchestrator", "") in on,
        help="run as the Orchestrator (runs jobs on BYOC containers, default port 8936)",
    )
    _flag(parser, "network", default=_env("network", "offchain"), help="only 'offchain' is supported")
    _flag(
        parser,
        "httpAddr",
        default=_env("httpAddr"),
        help="host:port to listen on (default 0.0.0.0:8935 gateway, 0.0.0.0:8936 orchestrator)",
    )
    _flag(
        parser,
        "serviceAddr",
        default=_env("serviceAddr"),
        help="orchestrator: the URL gateways use to reach it (default http://127.0.0.1:<port>)",
    )
    _flag(
        parser,
        "orchAddr",
        default=_env("orchAddr", f"127.0.0.1:{DEFAULT_ORCHESTRATOR_PORT}"),
        help="gateway: comma-separated orchestrator addresses (host:port or URL)",
    )
    _flag(
        parser,
        "orchSecret",
        default=_env("orchSecret"),
        help="orchestrator: secret for /capability/register, or a path to a file holding it",
    )
    _flag(
        parser,
        "byocModelID",
        action="append",
        default=None,
        help="orchestrator: a model id to register at start (repeatable; pairs with -byocContainerURL)",
    )
    _flag(
        parser,
        "byocContainerURL",
        action="append",
        default=None,
        help="orchestrator: the container URL for the -byocModelID in the same position",
    )
    _flag(
        parser,
        "byocCapacity",
        type=int,
        default=int(_env("byocCapacity", "1") or 1),
        help="orchestrator: concurrent jobs per -byocModelID container (default 1)",
    )
    _flag(
        parser,
        "maxBodyBytes",
        type=int,
        default=int(_env("maxBodyBytes", str(DEFAULT_MAX_BODY_BYTES)) or 0),
        help=f"largest request body accepted (default {DEFAULT_MAX_BODY_BYTES})",
    )
    _flag(
        parser,
        "v",
        type=int,
        default=int(_env("v", "3") or 3),
        help="log verbosity; 5 or more logs debug lines",
    )
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
    model_ids = _split(args.byocModelID) or _env_list("byocModelID")
    urls = _split(args.byocContainerURL) or _env_list("byocContainerURL")
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
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")


if __name__ == "__main__":
    sys.exit(main())
