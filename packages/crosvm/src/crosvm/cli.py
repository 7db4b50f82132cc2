"""The ``crosvm`` command: ``crosvm SUBCOMMAND [ARGS]``.

Every failure ends as one line on stderr: usage mistakes (:class:`ConfigError`) with exit status
2, runtime failures (:class:`Error`) with exit status 1. A traceback is a bug.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence

from crosvm import control
from crosvm.__about__ import __version__
from crosvm.errors import ConfigError, ControlError, Error

USAGE = """\
usage: crosvm SUBCOMMAND [ARGS]

subcommands:
  run [OPTIONS] KERNEL     boot a kernel in a new VM (crosvm run --help for options)
  stop SOCKET              stop the VM behind the control socket
  suspend SOCKET           pause its vCPUs
  resume SOCKET            resume its vCPUs
  balloon SIZE SOCKET      set the balloon size (bytes, or with K/M/G suffix)
  balloon_stats SOCKET     print the guest's memory statistics
  disk resize INDEX SIZE SOCKET
                           grow disk INDEX (0 = vda) to SIZE bytes
  create_qcow2 PATH SIZE   create an empty qcow2 image of SIZE bytes
  version                  print the version
"""


def _run(argv: Sequence[str]) -> int:
    from crosvm.config import parse_run_args

    config = parse_run_args(argv)
    from crosvm.vm import run_config  # imported late: `crosvm run --help` stays fast

    return run_config(config)


def _version(argv: Sequence[str]) -> int:
    if argv:
        raise ConfigError("crosvm version: takes no arguments")
    print(f"crosvm {__version__}")
    return 0


def _parse_size(text: str) -> int:
    """A byte count with an optional K/M/G/T suffix (powers of 1024), as qemu-img accepts."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    body, unit = (text[:-1], text[-1].upper()) if text[-1:].isalpha() else (text, "")
    if unit not in units or not body.isdigit():
        raise ConfigError(f"crosvm: invalid size {text!r} (bytes, or a number with K/M/G/T)")
    return int(body) * units[unit]


def _create_qcow2(argv: Sequence[str]) -> int:
    if len(argv) != 2:
        raise ConfigError("crosvm create_qcow2: expected PATH SIZE")
    path, size = argv[0], _parse_size(argv[1])
    from qcow import QcowFile

    QcowFile.create(path, size).close()
    return 0


def _control(name: str, argv: Sequence[str], count: int) -> list[str]:
    if len(argv) != count:
        raise ConfigError(f"crosvm {name}: expected {count} argument(s), got {len(argv)}")
    return list(argv)


def _simple_request(name: str, request: control.VmRequest) -> Callable[[Sequence[str]], int]:
    def command(argv: Sequence[str]) -> int:
        (socket_path,) = _control(name, argv, 1)
        control.send_request(socket_path, request)
        return 0

    return command


def _balloon(argv: Sequence[str]) -> int:
    size, socket_path = _control("balloon", argv, 2)
    command = control.Adjust(_parse_size(size))
    control.send_request(socket_path, control.BalloonCommand(command))
    return 0


def _balloon_stats(argv: Sequence[str]) -> int:
    (socket_path,) = _control("balloon_stats", argv, 1)
    response = control.send_request(socket_path, control.BalloonCommand(control.Stats()))
    if not isinstance(response, control.BalloonStats):
        raise ControlError(f"unexpected reply {response!r}")
    print(json.dumps(dataclasses.asdict(response), sort_keys=True))
    return 0


def _disk(argv: Sequence[str]) -> int:
    if not argv or argv[0] != "resize":
        raise ConfigError("crosvm disk: expected: disk resize DISK_INDEX NEW_SIZE SOCKET")
    _, index, size, socket_path = _control("disk", argv, 4)
    if not index.isdigit():
        raise ConfigError(f"crosvm disk: DISK_INDEX must be a number, got {index!r}")
    command = control.Resize(_parse_size(size))
    control.send_request(socket_path, control.DiskCommand(int(index), command))
    return 0


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "run": _run,
    "stop": _simple_request("stop", control.Exit()),
    "suspend": _simple_request("suspend", control.Suspend()),
    "resume": _simple_request("resume", control.Resume()),
    "balloon": _balloon,
    "balloon_stats": _balloon_stats,
    "disk": _disk,
    "version": _version,
    "create_qcow2": _create_qcow2,
}


def dispatch(argv: Sequence[str]) -> int:
    """Run one subcommand; raise crosvm errors instead of exiting (used by tests)."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    command = SUBCOMMANDS.get(argv[0])
    if command is None:
        raise ConfigError(f"crosvm: unknown subcommand {argv[0]!r} (crosvm --help lists them)")
    return command(argv[1:])


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        status = dispatch(args)
    except ConfigError as err:
        print(err, file=sys.stderr)
        status = 2
    except Error as err:
        print(f"crosvm: {err}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)
