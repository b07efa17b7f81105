#!/usr/bin/env bash
# Create .env (git-ignored, mode 0600) with the topology's secrets, once.
#
# Usage: scripts/make-env.sh [FILE]      (default FILE: .env next to compose.yaml)
#
# Why: the orchestrator's registration secret and the containers' bearer token must not have a
# published default. docker compose reads .env from the project folder by itself, so compose.yaml
# refers to ${ORCH_SECRET} and ${BYOC_TOKEN} and refuses to start without them. Idempotent:
# an existing file is never rewritten; a key it lacks is appended, the values it has are kept.
set -euo pipefail
umask 077
cd "$(dirname "$0")/.."
FILE=${1:-.env}

random_hex() { # 32 bytes from the kernel's CSPRNG, as 64 hex digits
    head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n'
}

[ -e "$FILE" ] || : >"$FILE"
for key in ORCH_SECRET BYOC_TOKEN; do
    if ! grep -q "^${key}=." "$FILE"; then
        [ -s "$FILE" ] && [ -n "$(tail -c 1 "$FILE")" ] && echo >>"$FILE" # end the last line
        echo "${key}=$(random_hex)" >>"$FILE"
        echo "make-env: wrote a new random $key to $FILE"
    fi
done
chmod 600 "$FILE"
