#!/usr/bin/env bash
# Run every test: lint, type check, unit tests, wheel checks, end-to-end VM tests (`nox`).
set -euo pipefail
source "$(dirname "$0")/setup-host.sh"
cd "$ROOT"
exec nox "$@"
