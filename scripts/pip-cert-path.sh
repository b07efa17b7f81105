#!/usr/bin/env bash
# Print the path of the CA bundle the host's pip is configured with, or /dev/null if none.
#
# Why: behind a TLS-intercepting proxy, pip inside `docker build` needs the same CA bundle as
# pip on the host. The Makefile hands this path to the build as the BuildKit secret `pip_cert`
# (compose: `secrets: pip_cert: file: ${PIP_CERT_FILE}`), so the bundle is used during the
# install step but never stored in an image. On a normal machine there is no such setting and
# /dev/null (an empty secret) makes the Dockerfile fall back to pip's default trust store.
#
# Order: $PIP_CERT, then pip's config (install.cert, then global.cert). Never fails.
set -uo pipefail

cert=${PIP_CERT:-}
if [ -z "$cert" ]; then
    # `pip config list` prints the effective value of each key (`global.cert='/path'`);
    # parsed instead of `pip config get`, which fails on some pip versions (23.2).
    conf=$(python3 -m pip config list 2>/dev/null || true)
    for key in install.cert :env:.cert global.cert; do
        cert=$(printf '%s\n' "$conf" | sed -n "s/^${key}='\(.*\)'\$/\1/p" | tail -n 1)
        [ -n "$cert" ] && break
    done
fi
if [ -n "$cert" ] && [ -r "$cert" ] && [ -s "$cert" ]; then
    # Absolute path: compose resolves relative secret paths against the compose file's folder.
    cd "$(dirname "$cert")" && echo "$(pwd -P)/$(basename "$cert")"
else
    echo /dev/null
fi
