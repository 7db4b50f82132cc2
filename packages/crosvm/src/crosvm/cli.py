"""The ``crosvm`` command: ``crosvm SUBCOMMAND [ARGS]``.

Every failure ends as one line on stderr: usage mistakes (:class:`ConfigError`) with exit status
2, runtime failures (:class:`Error`) with exit status 1. A traceback is a bug.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from crosvm.__about__ import __version__
from crosvm.errors import ConfigError, Error

USAGE = """\
usage: crosvm SUBCOMMAND [ARGS]

subcommands:
  run [OPTIONS] KERNEL     boot a kernel in a new VM (crosvm run --help for options)
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


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "run": _run,
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
