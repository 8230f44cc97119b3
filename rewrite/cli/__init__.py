"""The command line: ``effcompile MODEL ...`` (``main``) and ``effcompile train ...`` (``train``)."""

from __future__ import annotations

from .main import build_parser, main, parse_device

__all__ = ["build_parser", "main", "parse_device"]
