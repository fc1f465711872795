"""`python -m lorafuse.bench`: the benchmark CLI (see `lorafuse.bench.cli`)."""

from .cli import main

__all__ = ["main"]
