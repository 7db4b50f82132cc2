#!/bin/bash
# build-kernel.sh OUTDIR [WORKDIR] - build the trimmed test-guest kernel from
# Debian's own kernel source (package linux-source-6.1).
#
# Called by e2e_tests/kit (ensure_tiny_kernel), which picks OUTDIR inside the
# cache, keyed by a hash of everything this build reads; run it by hand only
# to debug the build.
#
# Produces in OUTDIR (written to OUTDIR.partial, renamed when complete, so an
# interrupted build never looks finished):
#   vmlinux     ELF kernel with a PVH entry note: a VMM (or QEMU -kernel) can
#               enter it directly, nothing runs the emulated decompressor
#   bzImage     the same kernel as a bzImage (LZ4 payload), for boot-protocol tests
#   System.map, config, build.log
#
# Steps:
#   1. unpack /usr/src/linux-source-6.1.tar.xz into WORKDIR (a fresh copy);
#   2. apply patches/*.patch (see each patch's header for why);
#   3. `make tinyconfig`, merge tiny-guest.config, `make olddefconfig`, then
#      check that every line of the fragment came out as asked (Kconfig
#      silently drops options whose dependencies are missing);
#   4. `nice -n 10 make -jJOBS vmlinux bzImage` (~11 min on 2 idle cores).
#
# Env: JOBS (default 2: the machines are shared), KIT_KEEP_SRC=1 keeps the
#      ~1.6 GB source tree in WORKDIR afterwards (default: removed).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build-kernel.sh OUTDIR [WORKDIR]}
WORKDIR=${2:-$OUT.work}
JOBS=${JOBS:-2}
TARBALL=/usr/src/linux-source-6.1.tar.xz
log() { echo "kit/build-kernel: $*" >&2; }

for tool in gcc make bc bison flex patch xz perl; do
    command -v "$tool" >/dev/null || { log "missing $tool (apt-get install build-essential bc bison flex libelf-dev libssl-dev xz-utils)"; exit 1; }
done
[ -f "$TARBALL" ] || { log "$TARBALL missing (apt-get install linux-source-6.1)"; exit 1; }

rm -rf "$WORKDIR" "$OUT.partial"
mkdir -p "$WORKDIR" "$OUT.partial"
log "unpacking $TARBALL ($(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || echo '?'))"
tar -C "$WORKDIR" -xf "$TARBALL"
SRC=$WORKDIR/linux-source-6.1
for p in "$HERE"/patches/*.patch; do
    log "applying $(basename "$p")"
    patch -d "$SRC" -p1 --quiet --forward < "$p"
done

cd "$SRC"
make -s tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m .config "$HERE/tiny-guest.config" >/dev/null
make -s olddefconfig >/dev/null
bad=0
while read -r line; do   # every "CONFIG_X=v" and "# CONFIG_X is not set" must hold
    case "$line" in
        CONFIG_*=*)
            grep -qxF "$line" .config ||
                { log "config: wanted $line, got: $(grep "^${line%%=*}=" .config || echo unset)"; bad=1; } ;;
        "# CONFIG_"*" is not set")
            opt=${line#\# }; opt=${opt%% *}
            ! grep -q "^$opt=" .config ||
                { log "config: wanted $opt off, got: $(grep "^$opt=" .config)"; bad=1; } ;;
    esac
done < "$HERE/tiny-guest.config"
[ $bad = 0 ] || { log "the configuration did not come out as asked"; exit 1; }

log "nice -n 10 make -j$JOBS vmlinux bzImage (about 11 min on 2 idle cores; log: $OUT.partial/build.log)"
t0=$(date +%s)
if ! nice -n 10 make -s -j"$JOBS" vmlinux bzImage > "$OUT.partial/build.log" 2>&1; then
    tail -n 40 "$OUT.partial/build.log" >&2
    log "kernel build failed"
    exit 1
fi
t1=$(date +%s)
cp vmlinux "$OUT.partial/vmlinux"
cp arch/x86/boot/bzImage "$OUT.partial/bzImage"
cp System.map "$OUT.partial/System.map"
cp .config "$OUT.partial/config"
echo "$(make -s kernelrelease) built in $((t1 - t0)) s with -j$JOBS" > "$OUT.partial/build-info"
cd /
[ -n "${KIT_KEEP_SRC:-}" ] || rm -rf "$WORKDIR"
rm -rf "$OUT"
mv "$OUT.partial" "$OUT"
log "$(cat "$OUT/build-info")"
