"""`python -m kmsgate.cli`: the same as the `kmsgate` command."""

from kmsgate.cli import main

main()
