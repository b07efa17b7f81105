"""Property tests of the orchestrator's parsers of outside input: registration and unregistration
bodies, container URLs, and the duration and count flags.

Invariant: a valid result or a 400 ``ApiError`` (an argparse error for flags), never another
exception; and whatever is accepted keeps the promises the rest of the node relies on.
"""

from __future__ import annotations

import argparse
import ipaddress
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ApiError
from common.names import is_model_id
from node.__main__ import _count, _seconds
from node.registration import (
    MAX_CAPACITY,
    Protocol,
    Registration,
    check_container_url,
    registration_from_json,
    unregister_name,
)

FAST = settings(max_examples=400, deadline=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
urls = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
        st.sampled_from(["http", "https", "file", "gopher", "HTTP", ""]),
        st.one_of(
            st.sampled_from(["127.0.0.1", "localhost", "[::1]", "169.254.169.254", "[fe80::1]", "0.0.0.0",
                             "[::]", "u:p@127.0.0.1", "[::ffff:a9fe:a9fe]", "metadata.google.internal"]),
            st.ip_addresses().map(lambda a: f"[{a}]" if a.version == 6 else str(a)),
        ),
        st.sampled_from(["", ":8000", ":0", ":65536", ":x"]),
        st.sampled_from(["", "/", "/p", "/?q", "/#f", "/\r\nX: y", "/ a"]),
    ),
)  # fmt: skip
bodies = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.text(max_size=20), json_values),
        "url": st.one_of(urls, json_values),
        "capacity": st.one_of(st.integers(-5, 2000), json_values),
        "protocol": st.one_of(st.sampled_from(["http", "trickle", "grpc"]), json_values),
        "description": json_values,
        "price_per_unit": st.one_of(st.integers(), json_values),
        "price_scaling": st.one_of(st.integers(), json_values),
        "currency": json_values,
        "token": st.one_of(st.text(max_size=20), json_values),
        "extra": json_values,
    },
)


def check_accepted_url(url: str) -> None:
    parts = urlsplit(url)
    assert parts.scheme in ("http", "https") and parts.hostname, url
    assert parts.username is None and parts.password is None and not parts.query, url
    assert url.isprintable() and " " not in url and not url.endswith("/"), url
    try:
        address = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return
    assert not (address.is_link_local or address.is_unspecified), url


def check_accepted(registration: Registration) -> None:
    assert is_model_id(registration.name)
    check_accepted_url(registration.url)
    assert type(registration.capacity) is int and 1 <= registration.capacity <= MAX_CAPACITY
    assert isinstance(registration.protocol, Protocol)
    assert registration.price_scaling >= 1 and registration.price_per_unit >= 0
    for text in (registration.description, registration.currency, registration.token):
        assert isinstance(text, str) and text.isprintable()


@FAST
@given(st.one_of(bodies, json_values))
def test_a_registration_body_is_valid_or_a_400(body: Any) -> None:
    try:
        registration = registration_from_json(body)
    except ApiError as exc:
        assert exc.status == 400 and exc.code in ("invalid_registration", "invalid_model_id"), exc
        return
    check_accepted(registration)


@FAST
@given(urls)
def test_a_container_url_is_a_plain_http_url_or_a_400(url: str) -> None:
    try:
        accepted = check_container_url(url)
    except ApiError as exc:
        assert (exc.status, exc.code) == (400, "invalid_registration")
        return
    check_accepted_url(accepted)


@FAST
@given(st.binary(max_size=200))
def test_an_unregister_body_is_a_model_id_or_a_400(body: bytes) -> None:
    try:
        name = unregister_name(body)
    except ApiError as exc:
        assert exc.status == 400
        return
    assert is_model_id(name)


@FAST
@given(st.text(max_size=30))
def test_flag_values_are_in_range_or_an_argparse_error(value: str) -> None:
    for parse, low, high in ((_seconds, 0.0, 3600.0), (_count(1, 86400), 1, 86400)):
        try:
            number = parse(value)
        except argparse.ArgumentTypeError:
            continue
        assert low <= number <= high and number > 0, (value, number)


@pytest.mark.parametrize("value", ["10s", "10", "0.5s", "3600"])
def test_durations_as_go_livepeer_writes_them(value: str) -> None:
    assert _seconds(value) == float(value.removesuffix("s"))
