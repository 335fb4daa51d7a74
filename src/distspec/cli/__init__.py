"""Command line: `distspec generate | serve | edge | bench* | train-drafter`, one module per
command group. The only package that parses flags; everything below takes typed configs, and
every error reaches the user as one line `distspec: error: ...` with a non-zero exit.
It may import every other package (the harnesses in bench/ and train/ only from here)."""

from distspec.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
