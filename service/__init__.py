"""sparq's controller: REST API, job store, launcher, settings and CLI.

Nothing here imports torch or ray at import time (tests/service/test_imports.py).
"""
