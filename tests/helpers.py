"""Test helpers: the library's in-process Grid under its historical test name."""

from fedqsn_flwr.inprocess import InProcessGrid as LocalGrid
from fedqsn_flwr.inprocess import Tamper

__all__ = ["LocalGrid", "Tamper"]
