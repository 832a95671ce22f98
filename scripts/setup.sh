#!/usr/bin/env bash
# Create (or reuse) the project virtual environment and install certnas into it.
# Idempotent: a second run with unchanged install files does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CERTNAS_VENV:-.venv}"
TORCH_SPEC="${CERTNAS_TORCH:-torch==2.14.1 torchvision==0.29.1}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "certnas: creating virtual environment $VENV" >&2
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.certnas-install-stamp"
want="$(cat setup.cfg pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import certnas, verifiers.lirpa" 2>/dev/null; then
    exit 0
fi
echo "certnas: installing into $VENV (torch, auto-LiRPA 0.3 --no-deps, certnas)" >&2
"$PY" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$PY" -m pip install -q $TORCH_SPEC
# auto-LiRPA 0.3 declares torch<1.13; install it without its dependency pins.
"$PY" -m pip install -q --no-deps auto-LiRPA==0.3
"$PY" -m pip install -q -e ".[test]"
echo "certnas: (pip's note that auto-lirpa 0.3 wants torch<1.13 is expected: it runs on torch 2 with the patches in verifiers/lirpa.py)" >&2
"$PY" -c "import certnas, verifiers.lirpa" 2>/dev/null
echo "$want" > "$stamp"
