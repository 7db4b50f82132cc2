"""``python -m crosvm`` is the ``crosvm`` command."""

from crosvm.cli import main

main()
