"""The ``autobatch`` command line: one module per command, shared options in ``_common``."""

from autobatch.cli.main import main

__all__ = ["main"]
