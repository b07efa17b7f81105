#!/bin/sh
# Image build step: pip install into /opt/venv, keeping only what runs.
# Usage (in a Dockerfile): RUN --mount=type=secret,id=pip_cert sh common/install-requirements.sh -r FILE
set -eu
# Behind a TLS-intercepting proxy the host's CA bundle arrives as the BuildKit secret pip_cert:
# used for this step only, never stored in a layer. Empty on a normal machine.
if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi
# The venv is made without pip: the base image's own pip installs into it, so neither pip nor
# setuptools ends up in the image (official base: /usr/local/bin/python3; Debian: /usr/bin/python3).
for python in /usr/local/bin/python3 /usr/bin/python3; do [ -x "$python" ] && break; done
# --no-compile: bytecode for every module of numpy and OpenCV costs more image (~10 MB) than
# compiling the few imported at start (~0.3 s).
"$python" -m pip --python /opt/venv/bin/python install --no-cache-dir --no-compile \
    --disable-pip-version-check "$@"
# The libraries' own test suites are dead weight at run time.
find /opt/venv/lib -depth -type d -name tests -path '*/site-packages/*' -exec rm -rf {} +
