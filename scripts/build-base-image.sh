#!/usr/bin/env bash
# Build a local stand-in for python:3.11-slim-bookworm from Debian packages.
#
# Usage: scripts/build-base-image.sh [--force] [TAG]      (default TAG: byoc-base:bookworm)
#
# Why: hosts with no container-registry access cannot pull any base image, but can reach a
# Debian mirror. debootstrap builds a minimal bookworm root file system with Debian's python3
# (3.11, at /usr/bin/python3) and `docker import` turns it into an image. Processor Dockerfiles
# create a venv (`python3 -m venv /opt/venv`), so they behave the same on this base and on the
# official one. Needs root, docker and debootstrap (scripts/setup-docker.sh installs both).
set -euo pipefail

say() { echo "build-base-image: $*"; }

FORCE=
TAG=byoc-base:bookworm
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
        -*) say "unknown option $arg" >&2; exit 2 ;;
        *) TAG=$arg ;;
    esac
done
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

if [ -z "$FORCE" ] && docker image inspect "$TAG" >/dev/null 2>&1; then
    say "$TAG already exists (use --force to rebuild)"
    exit 0
fi

old_id=$(docker image inspect "$TAG" --format '{{.Id}}' 2>/dev/null || true)
ROOTFS=$(mktemp -d /tmp/byoc-base-rootfs.XXXXXX)
cleanup() { # a failed debootstrap or upgrade can leave /proc, /sys ... mounted inside the root
    awk -v r="$ROOTFS/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r |
        xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf --one-file-system "$ROOTFS" "$ROOTFS.log"
}
trap cleanup EXIT
start=$SECONDS

say "debootstrap bookworm into $ROOTFS (mirror $MIRROR)"
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || {
    say "ERROR: debootstrap failed; last lines of its log:" >&2
    tail -n 20 "$ROOTFS.log" >&2
    exit 1
}
rm -f "$ROOTFS.log"

# debootstrap lists only the release itself; add updates and security like debian:bookworm
# does, so `apt-get install` in a processor Dockerfile gets fixed versions.
cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
EOF
say "applying bookworm-updates and security fixes"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
mount -t proc proc "$ROOTFS/proc"
chroot "$ROOTFS" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq' \
    >"$ROOTFS.log" 2>&1 || {
    say "ERROR: apt-get upgrade in the new root failed; last lines:" >&2
    tail -n 20 "$ROOTFS.log" >&2
    exit 1
}
umount "$ROOTFS/proc"
rm -f "$ROOTFS/etc/resolv.conf" "$ROOTFS.log"  # docker provides resolv.conf at run time

# Smaller image: package lists, caches and docs are not needed at run time (the official slim
# images drop them too). apt still works after `apt-get update`.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/cache/debconf/*-old \
    "$ROOTFS"/var/log/* "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* \
    "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/locale/* "$ROOTFS"/tmp/*
find "$ROOTFS"/usr/lib/python3* -name __pycache__ -type d -prune -exec rm -rf {} +
# Bookworm marks its Python "externally managed"; images install into /opt/venv anyway.

say "importing into docker as $TAG"
# `docker import` loses ENV/CMD, so set the ones the official python image has.
tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null

# --force: drop the image this one replaces (fails harmlessly while images built on it exist).
if [ -n "$old_id" ] && [ "$old_id" != "$(docker image inspect "$TAG" --format '{{.Id}}')" ]; then
    docker image rm "$old_id" >/dev/null 2>&1 || true
fi
size=$(docker image inspect "$TAG" --format '{{.Size}}')
say "built $TAG in $((SECONDS - start)) s, $((size / 1000000)) MB"
