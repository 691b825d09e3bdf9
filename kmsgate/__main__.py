"""`python -m kmsgate`: the same as the `kmsgate` command."""

from kmsgate.cli import main

main()
