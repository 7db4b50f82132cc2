"""``crosvm run``: turn a :class:`~crosvm.config.Config` into a running VM and wait for its end.

Steps: serial ports and virtio devices are described from the config; ``arch.x86_64.build_vm``
creates the VM (memory, irqchip, kernel, boot state, buses); the vCPU threads and the main loop
of :mod:`crosvm.runloop` run it; the control socket, when asked for, is one more source of the
main loop. Whatever happens, the terminal is restored and every fd is closed on the way out.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

import arch
import devices
import io_jail
from arch.x86_64 import PlaceablePciDevice, VmConfig, VmContext, build_vm
from crosvm import control
from crosvm.config import Config
from crosvm.device_setup import create_virtio_devices
from crosvm.errors import ConfigError, VmError
from crosvm.runloop import (
    MainLoop,
    RunState,
    ServiceThread,
    StopReason,
    join_vcpu_threads,
    start_vcpu_threads,
)
from devices.errors import SerialConfigError
from devices.proxy import BalloonState, BindMount, Sandbox, balloon_adjust, balloon_state
from devices.serial import (
    ComPort,
    SerialHardware,
    SerialParameters,
    create_com_ports,
    merge_serial_parameters,
)
from devices.virtio import Block, Console, Rng, VirtioDevice, VirtioError, VirtioPciDevice
from devices.virtio.balloon import BALLOON_PAGE_SIZE, Balloon, BalloonStat
from devices.virtio.net import Net
from devices.virtio.vhost import VhostNet, VhostVsock
from devices.virtio.vsock import Vsock
from sys_util import SHMEM_THP_SETTING, RawTerminal, shmem_hugepages_enabled

log = logging.getLogger("crosvm")

#: crosvm's base command line, plus reboot=k so a guest reboot is an i8042 reset (a VM exit).
BASE_CMDLINE = "reboot=k panic=-1"

PciFactory = Callable[[VmContext], PlaceablePciDevice]

#: Seconds a ``balloon_stats`` request waits for the guest (less than control.REQUEST_TIMEOUT).
BALLOON_STATS_TIMEOUT = 3.0
_BALLOON_STAT_FIELDS = {
    "swap_in": BalloonStat.SWAP_IN,
    "swap_out": BalloonStat.SWAP_OUT,
    "major_faults": BalloonStat.MAJFLT,
    "minor_faults": BalloonStat.MINFLT,
    "free_memory": BalloonStat.MEMFREE,
    "total_memory": BalloonStat.MEMTOT,
    "available_memory": BalloonStat.AVAIL,
    "disk_caches": BalloonStat.CACHES,
}


def _serial_parameters(config: Config) -> list[SerialParameters]:
    try:
        params = [SerialParameters.parse(text) for text in config.serial]
        merge_serial_parameters(params)  # validates the combination
    except SerialConfigError as err:
        raise ConfigError(f"crosvm run: --serial: {err}") from None
    return params


def _kernel_cmdline(config: Config, serial: list[SerialParameters]) -> str:
    parts = [BASE_CMDLINE]
    for p in merge_serial_parameters(serial).values():
        if p.console:
            tty = "hvc0" if p.hardware is SerialHardware.VIRTIO_CONSOLE else f"ttyS{p.num - 1}"
            parts.append(f"console={tty}")
    root = config.root_disk_index
    if root is not None:
        mode = "ro" if config.disks[root].read_only else "rw"
        parts.append(f"root=/dev/vd{chr(ord('a') + root)} {mode}")
    parts.extend(config.params)
    return " ".join(parts)


#: The seccomp policy each sandboxable device runs under (devices/seccomp/<arch>/<name>.policy).
#: Every virtio device crosvm creates is listed: with the sandbox on, none runs in the main
#: process.
SANDBOX_POLICIES: dict[type[VirtioDevice], str] = {
    Block: "block_device",
    Rng: "rng_device",
    Console: "console_device",
    Balloon: "balloon_device",
    Net: "net_device",
    Vsock: "vsock_device",
    VhostNet: "vhost_net_device",
    VhostVsock: "vhost_vsock_device",
}

#: Resizes disk N (in command-line order), wherever its device runs.
DiskResizer = Callable[[int], None]


class BalloonHandle(Protocol):
    """The balloon, wherever it runs (``devices.proxy.ProxyDevice`` or :class:`LocalBalloon`)."""

    def balloon_adjust(self, num_bytes: int) -> None: ...

    def balloon_stats(self, timeout: float) -> BalloonState: ...


class LocalBalloon:
    """:class:`BalloonHandle` for a balloon in this process (``--disable-sandbox``)."""

    def __init__(self, balloon: Balloon) -> None:
        self.balloon = balloon

    def balloon_adjust(self, num_bytes: int) -> None:
        balloon_adjust(self.balloon, num_bytes)

    def balloon_stats(self, timeout: float) -> BalloonState:
        return balloon_state(self.balloon, timeout)


def jail_bind_mounts(device: VirtioDevice) -> list[BindMount]:
    """Host paths ``device`` needs inside its jail (at the same place).

    virtio-vsock connects guest-initiated streams to ``<uds_path>_<port>`` on the host: its
    directory is bound writable (connecting to a Unix socket needs write permission on it).
    Every other device works on fds it was given and sees an empty root.
    """
    if isinstance(device, Vsock):
        # The same path inside as outside (the device names ``<uds_path>_P``); the jail's
        # working directory is its root, hence an absolute path.
        directory = os.path.dirname(os.path.abspath(device.uds_path))
        return [(directory, directory, True)]
    return []


def _pci_factories(
    config: Config,
    serial: list[SerialParameters],
    stack: contextlib.ExitStack,
    sandbox: Sandbox | None,
    disk_resizers: list[DiskResizer],
    balloons: list[BalloonHandle],
) -> list[PciFactory]:
    """Open every device's resources now (before KVM) and wrap each in the virtio-pci transport,
    jailed in its own process when the sandbox is on and the device has a policy.

    ``disk_resizers`` is filled, in disk order, and ``balloons`` with the balloon's handle, as
    ``build_vm`` runs the factories.
    """

    def factory_for(device: VirtioDevice) -> PciFactory:
        def in_process(ctx: VmContext) -> PlaceablePciDevice:
            return VirtioPciDevice(device, ctx.memory, msix_router=ctx.irq_router)

        policy = SANDBOX_POLICIES.get(type(device)) if sandbox is not None else None
        if sandbox is None or policy is None:

            def plain(ctx: VmContext) -> PlaceablePciDevice:
                if isinstance(device, Block):
                    disk_resizers.append(device.resize)
                elif isinstance(device, Balloon):
                    balloons.append(LocalBalloon(device))
                return in_process(ctx)

            return plain
        jailed = sandbox.sandboxed(in_process, policy, bind_mounts=jail_bind_mounts(device))

        def proxied(ctx: VmContext) -> PlaceablePciDevice:
            proxy = jailed(ctx)
            if isinstance(device, Block):
                disk_resizers.append(proxy.resize_disk)
            elif isinstance(device, Balloon):
                balloons.append(proxy)
            return proxy

        return proxied

    return [factory_for(d) for d in create_virtio_devices(config, serial, stack)]


class _Controller:
    """Answers control-socket requests for one running VM."""

    def __init__(
        self,
        state: RunState,
        disk_resizers: Sequence[DiskResizer] = (),
        balloons: Sequence[BalloonHandle] = (),
    ) -> None:
        self.state = state
        self.disk_resizers = disk_resizers
        self.balloons = balloons

    def handle(self, request: control.VmRequest) -> control.VmResponse:
        if isinstance(request, control.Exit):
            self.state.stop(StopReason.REQUESTED, "control socket")
        elif isinstance(request, control.Suspend):
            self.state.set_suspended(True)
        elif isinstance(request, control.Resume):
            self.state.set_suspended(False)
        elif isinstance(request, control.DiskCommand):
            return self._disk(request)
        elif isinstance(request, control.BalloonCommand):
            return self._balloon(request)
        else:
            return control.Err(errno.EINVAL)
        return control.Ok()

    def _balloon(self, request: control.BalloonCommand) -> control.VmResponse:
        if not self.balloons:  # --no-balloon
            return control.Err(errno.ENODEV)
        balloon = self.balloons[0]
        command = request.command
        try:
            if isinstance(command, control.Adjust):
                balloon.balloon_adjust(command.num_bytes)
                return control.Ok()
            if not isinstance(command, control.Stats):
                return control.Err(errno.EINVAL)
            # Answered on the main thread: the wait is bounded so the main loop stalls at most
            # BALLOON_STATS_TIMEOUT (plus a second for a jailed device; below the client's own
            # timeout).
            state = balloon.balloon_stats(BALLOON_STATS_TIMEOUT)
        except OSError as err:
            if err.errno != errno.ETIMEDOUT:
                log.warning("balloon request failed: %s", err)
            return control.Err(err.errno or errno.EIO)
        # A driver without the stats queue still reports the balloon's size.
        stats = state.stats or {}
        return control.BalloonStats(
            balloon_actual=state.actual_pages * BALLOON_PAGE_SIZE,
            **{name: stats.get(tag) for name, tag in _BALLOON_STAT_FIELDS.items()},
        )

    def _disk(self, request: control.DiskCommand) -> control.VmResponse:
        if request.disk_index >= len(self.disk_resizers):
            return control.Err(errno.ENODEV)
        if not isinstance(request.command, control.Resize):
            return control.Err(errno.EINVAL)
        try:
            self.disk_resizers[request.disk_index](request.command.new_size)
        except (OSError, VirtioError, ValueError) as err:
            log.warning("disk %d resize failed: %s", request.disk_index, err)
            return control.Err(getattr(err, "errno", None) or errno.EINVAL)
        return control.Ok()


def run_config(config: Config) -> int:
    """Build and run the VM; return the exit status for ``crosvm run``."""
    serial = _serial_parameters(config)
    cmdline = _kernel_cmdline(config, serial)
    if config.hugepages and not shmem_hugepages_enabled():
        log.warning(
            "--hugepages: this host gives shared memory no transparent huge pages (%s is not "
            "always, within_size or advise); guest memory uses 4 KiB pages",
            SHMEM_THP_SETTING,
        )
    with contextlib.ExitStack() as stack:
        try:
            com_ports: list[ComPort] = create_com_ports(serial)
        except OSError as err:
            raise ConfigError(f"crosvm run: --serial: {err.strerror}: {err.filename}") from None
        for port in com_ports:
            stack.callback(port.close)
        sandbox: Sandbox | None = None
        if config.sandbox:
            try:
                sandbox = Sandbox(
                    policy_dir=config.seccomp_policy_dir,
                    log_failures=config.seccomp_log_failures,
                )
            except (OSError, devices.Error, io_jail.Error) as err:
                raise ConfigError(f"crosvm run: sandbox: {err}") from None
            stack.callback(sandbox.close)
        disk_resizers: list[DiskResizer] = []
        balloons: list[BalloonHandle] = []
        pci = _pci_factories(config, serial, stack, sandbox, disk_resizers, balloons)
        vm_config = VmConfig(
            memory_size=config.mem_mib << 20,
            hugepages=config.hugepages,
            kernel=config.kernel,
            vcpu_count=config.cpus,
            initrd=config.initrd,
            cmdline=cmdline,
            com_ports=com_ports,
            pci_devices=pci,
        )
        try:
            vm = stack.enter_context(build_vm(vm_config))
        except (arch.KernelLoadError, arch.InitrdLoadError, arch.CmdlineError) as err:
            raise ConfigError(f"crosvm run: {err}") from None
        except arch.Error as err:
            raise VmError(str(err)) from None
        state = RunState(vm.vcpus)
        stack.callback(state.stopped_evt.close)
        sources: list[tuple[int, Callable[[], None]]] = []
        if sandbox is not None:
            # Fork and jail every sandboxed device now: the process is still single-threaded.
            sandbox.monitor.on_death = lambda death: state.stop(
                StopReason.DEVICE_DIED, death.message
            )
            try:
                sandbox.start()
            except (OSError, devices.Error, io_jail.Error) as err:
                raise VmError(f"sandbox: {err}") from None
            service = ServiceThread(sandbox.sources(), "sandbox-service")
            service.start()
            stack.callback(service.stop)  # before sandbox.close (LIFO)
        if config.socket_path is not None:
            server = control.ControlServer(
                config.socket_path, _Controller(state, disk_resizers, balloons)
            )
            stack.callback(server.close)
            sources.append((server.fileno(), server.on_readable))
        if any(port.stdin_fd is not None for port in com_ports) and os.isatty(0):
            stack.enter_context(RawTerminal(0))
        for port in com_ports:
            port.start()
        threads = start_vcpu_threads(vm.vcpus, vm.io_bus, vm.mmio_bus, state)
        try:
            outcome = MainLoop(state, [vm.exit_evt], sources).run()
        finally:
            state.stop(StopReason.REQUESTED)  # no-op when already stopping
            join_vcpu_threads(threads, state)
    detail = f" ({outcome.detail})" if outcome.detail else ""
    if outcome.reason.ok:
        if outcome.reason is StopReason.SIGNAL:
            print(f"crosvm: terminating on signal{detail}", file=sys.stderr)
        return 0
    print(f"crosvm: {outcome.reason.value}{detail}", file=sys.stderr)
    return 1
