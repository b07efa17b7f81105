#!/usr/bin/env bash
# Print the base image the Dockerfiles should build FROM, making one if needed.
#
# $BASE_IMAGE if set; else the official python:3.11-slim-bookworm when it is present or can be
# pulled; else (no registry reachable) byoc-base:bookworm, built from Debian packages.
set -euo pipefail
OFFICIAL=python:3.11-slim-bookworm
LOCAL=byoc-base:bookworm

if [ -n "${BASE_IMAGE:-}" ]; then
    echo "$BASE_IMAGE"
elif docker image inspect "$OFFICIAL" >/dev/null 2>&1 || timeout 60 docker pull -q "$OFFICIAL" >/dev/null 2>&1; then
    echo "$OFFICIAL"
else
    echo "choose-base-image: $OFFICIAL cannot be pulled; using $LOCAL" >&2
    "$(dirname "$0")/build-base-image.sh" "$LOCAL" >&2
    echo "$LOCAL"
fi
