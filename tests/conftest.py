"""pytest fixtures over :mod:`harness`: servers stopped after each test, async tests on a loop."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import (
    ASYNC_TEST_TIMEOUT,
    AUTH_HEADERS,
    CLIENT_OPTIONS,
    ServerProcess,
    StartServer,
    running_processors,
)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """``start_server(argv, **ServerProcess.start options)``; every server is stopped afterwards."""
    started: list[ServerProcess] = []

    def start(argv: Sequence[str], **options: Any) -> ServerProcess:
        server = ServerProcess.start(argv, log_dir=tmp_path, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def processors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """The three processors with default settings, shared by every test that only reads them."""
    with running_processors(log_dir=tmp_path_factory.mktemp("processors")) as servers:
        yield servers


@pytest.fixture(scope="session")
def http() -> Iterator[httpx.Client]:
    """One keep-alive client for one-off requests to any server (full URLs), with the test token."""
    with httpx.Client(headers=AUTH_HEADERS, **CLIENT_OPTIONS) as client:
        yield client


# -- async tests --------------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests on a fresh event loop, bounded in time (no plugin needed)."""
    function = pyfuncitem.obj
    if not inspect.iscoroutinefunction(function):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in inspect.signature(function).parameters}
    asyncio.run(asyncio.wait_for(function(**kwargs), ASYNC_TEST_TIMEOUT))
    return True
