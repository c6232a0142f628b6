"""Shared test configuration: logging for test runs is configured here, not in the library."""

from __future__ import annotations

import logging

logging.getLogger("kubernetes").setLevel(logging.WARNING)
