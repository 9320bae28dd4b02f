"""The `pomona` command: the subcommand table (`commands`) and the flags made from the settings dataclasses
(`args`). Importing it loads no PyTorch."""

from .commands import main

__all__ = ["main"]
