#!/bin/sh
# /init of the pycrosvm Linux test guest (busybox-static; initramfs or ext4 root).
#
# Derived from the tiny-kernel reference guest's /init (same console markers), plus a
# "delegate" mode in which the host drives the guest over the serial console.
#
# Console protocol (every line the host acts on starts with "GUEST-"):
#   GUEST-EARLY                    first line of user space, right after the mounts
#   GUEST-INIT-READY mode=<mode>   init is done (built-in virtio drivers have probed by then)
#   delegate mode, per command line the host writes:   <id> <shell command>
#     GUEST-CMD-START <id>
#     ...the command's stdout and stderr...
#     GUEST-CMD-END <id> rc=<exit status> cs=<guest centiseconds>
#   GUEST-DONE rc=N                about to leave (after the console hit EOF, or boot mode)
#
# Commands run with stdin from /dev/null (they must not eat the next command), one at a time.
# The tty's echo is off, so the host never reads its own commands back; the host picks ids
# that cannot appear in output by chance (e.g. random hex).
#
# Kernel command line parameters read here:
#   guestmode=delegate|shell|boot  (default: /etc/kit-mode, else delegate)
#   guestexit=reboot|poweroff|halt|hang   (default reboot: with reboot=k the i8042 reset
#                                          line ends the VM; never reboot=t, it runs int3)
# /etc/kit-modules, if present, lists kernel modules (paths) to insmod in order (the stock
# Debian kernel's virtio drivers are modules; the tiny kernel has them built in).
export PATH=/bin:/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null   # DEVTMPFS_MOUNT may have done it already
mount -t tmpfs tmpfs /tmp 2>/dev/null
echo GUEST-EARLY

guestmode= guestexit=reboot
[ -r /etc/kit-mode ] && read -r guestmode < /etc/kit-mode
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        guestmode=*|guestexit=*) eval "${arg%%=*}='${arg#*=}'" ;;
    esac
done
guestmode=${guestmode:-delegate}

if [ -r /etc/kit-modules ]; then
    while read -r mod; do
        [ -n "$mod" ] || continue
        insmod "$mod" || echo "GUEST-ERROR insmod $mod failed"
    done < /etc/kit-modules
fi

# uptime in centiseconds (guest clock)
cs() { read -r up _ < /proc/uptime; echo "${up%.*}${up#*.}"; }

delegate() {
    stty -echo 2>/dev/null || true
    echo "GUEST-INIT-READY mode=delegate"
    while IFS= read -r line; do
        id=${line%% *}
        cmd=${line#* }
        [ -n "$id" ] || continue
        [ "$cmd" != "$line" ] || cmd=
        echo "GUEST-CMD-START $id"
        t0=$(cs)
        # a subshell, not `sh -c`: a fork without an exec (each exec costs ~0.5 s when the
        # guest kernel is emulated)
        ( eval "$cmd" ) < /dev/null 2>&1
        rc=$?
        t1=$(cs)
        echo "GUEST-CMD-END $id rc=$rc cs=$((t1 - t0))"
    done
    return 0
}

case "$guestmode" in
    delegate) delegate; rc=$? ;;
    shell)
        echo "GUEST-INIT-READY mode=shell"
        setsid cttyhack sh; rc=$? ;;
    boot)
        echo "GUEST-INIT-READY mode=boot"; rc=0 ;;
    *)
        echo "GUEST-ERROR unknown guestmode=$guestmode"; rc=1 ;;
esac
echo "GUEST-DONE rc=$rc"
sync
case "$guestexit" in
    poweroff) poweroff -f ;;
    halt) halt -f ;;
    hang) while :; do sleep 3600; done ;;
    *) reboot -f ;;
esac
sleep 1
exit 1
