"""Integration Pipeline Console: an idempotent integration pipeline and its operator console."""

__version__ = "0.1.0"
