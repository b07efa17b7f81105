#!/usr/bin/env bash
# Make .venv-pytrickle/: the real PyTrickle 0.1.6, for the interop tests and bench-live only.
# Idempotent: a stamp records what was installed; a second run with the same pins does nothing.
#
# Why a venv of its own: pytrickle pulls opencv-python (ours is opencv-python-headless; both own
# the `cv2` module, so one venv cannot hold both), pytest-asyncio, uvloop and more as hard
# runtime dependencies. Our .venv is never touched.
#
# Why this order:
#  - torch first, pinned to the CPU build. PyPI's Linux torch is a multi-GB CUDA build, and a
#    plain `pip install pytrickle` would take it. Hosts behind a proxy keep torch 2.13.0+cpu in
#    their pip config's local wheel folder; elsewhere it comes from PyTorch's CPU index.
#  - then av==14.2.0 and pytrickle==0.1.6 under tests/interop/pytrickle-constraints.txt (the
#    `pip freeze` of a working venv): pytrickle 0.1.6 allows av<=14.4.0, and av 14.4.0 is
#    source-only on PyPI (its build needs FFmpeg 7 headers), so pip left alone picks a version
#    that cannot install. The constraints make CI resolve the same set as the machine they were
#    recorded on.
#  - finally a check that fails the run on any CUDA piece (nvidia-* libraries or a torch built
#    with CUDA). nvidia-ml-py is allowed: pytrickle needs it, and it is a pure-Python NVML binding
#    that only logs "Failed to initialize NVML" without a GPU.
# Runs without stdin (CI=true): pip never prompts. Output: one line unless something fails.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "setup-pytrickle: $*"; }

PYTHON=${PYTHON:-python3}
VENV=${PYTRICKLE_VENV:-.venv-pytrickle}
CONSTRAINTS=tests/interop/pytrickle-constraints.txt
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
PIP=("$VENV/bin/python" -m pip install -qq --disable-pip-version-check --no-input)

# The stamp holds a hash of this script and the constraints: changing either reinstalls.
want=$(cat "$0" "$CONSTRAINTS" | sha256sum | cut -c1-16)
stamp="$VENV/.installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    exit 0
fi

say "creating $VENV (pytrickle 0.1.6, av 14.2.0, torch $TORCH_VERSION CPU; ~1.4 GB, a few minutes)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"${PIP[@]}" -c "$CONSTRAINTS" "torch==$TORCH_VERSION+cpu" 2>/dev/null ||
    "${PIP[@]}" -c "$CONSTRAINTS" --extra-index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION+cpu"
"${PIP[@]}" -c "$CONSTRAINTS" "av==14.2.0" "pytrickle==0.1.6"

cuda=$("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -i '^nvidia-' | grep -iv '^nvidia-ml-py==' || true)
if [ -n "$cuda" ]; then
    say "refusing: CUDA packages were installed: $(echo "$cuda" | tr '\n' ' ')" >&2
    exit 1
fi
"$VENV/bin/python" - <<'EOF'
import av, pytrickle, torch
assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"
assert av.__version__ == "14.2.0", av.__version__
EOF
echo "$want" >"$stamp"
say "ready: $VENV ($("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -ci '') packages)"
