"""The `kmsgate` command and `python -m kmsgate`. Ctrl-C while the command line loads (about
a quarter of a second) ends it as Ctrl-C does once it runs: exit 130, no traceback."""

import signal


def main() -> None:
    """Load the command line, then run it."""
    try:
        from kmsgate.cli import main as run_cli
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None
    run_cli()


if __name__ == "__main__":
    main()
