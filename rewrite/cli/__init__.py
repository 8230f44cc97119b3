"""The command line: ``effcompile MODEL ...`` (``main``), ``effcompile train ...`` (``train``),
``torchrun ... -m effcompile.cli.pipeline`` (``pipeline``) and what they share (``common``)."""

from __future__ import annotations

from .common import parse_device
from .main import build_parser, main

__all__ = ["build_parser", "main", "parse_device"]
