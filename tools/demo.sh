#!/usr/bin/env bash
# Boot the default guest (a Linux kernel and busybox initramfs built by the guest kit) under
# crosvm and attach this terminal to its serial console.
set -euo pipefail
source "$(dirname "$0")/setup-host.sh"
cd "$ROOT"
exec nox -s demo -- "$@"
