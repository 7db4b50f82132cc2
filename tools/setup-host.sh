#!/usr/bin/env bash
# Install what the project needs on a fresh Debian 12 machine (idempotent), then make a bootstrap
# venv with nox. Sourced by tools/test.sh and tools/demo.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
APT_PKGS=(python3-venv gcc libc6-dev linux-libc-dev libseccomp-dev qemu-system-x86 qemu-utils
          busybox-static cpio e2fsprogs iproute2 socat iperf3 build-essential bc bison flex
          libelf-dev libssl-dev xz-utils lz4 zstd linux-source-6.1)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup-host: please install: ${missing[*]} (needs root)" >&2; exit 1
    fi
    echo "setup-host: apt-get install ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
BOOT="$ROOT/.venv-bootstrap"
if [ ! -x "$BOOT/bin/nox" ]; then
    python3 -m venv "$BOOT"
    "$BOOT/bin/pip" install -q -U pip
    "$BOOT/bin/pip" install -q "nox>=2024.4" "tox>=4"
fi
export PATH="$BOOT/bin:$PATH"
