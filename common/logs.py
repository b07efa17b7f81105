"""Log format shared by every component: one line per event, prefixed by the component."""

from __future__ import annotations

import logging
import sys


def configure_logging(component: str, verbose: bool = False) -> None:
    """``docker compose logs`` adds the service name; the prefix keeps local runs readable too."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s {component} %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
        force=True,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
