"""Optional test dependencies: skip without them, except in CI when requirements.txt pins them.

A package pinned in requirements.txt is one ``./setup.sh`` installs, so in CI (``CI`` set) a failed
import is an error, not a quiet skip; elsewhere (an older venv, a user's own environment) the tests
that need it skip with the reason.
"""

import importlib
import os
import re

import pytest

REQUIREMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "requirements.txt")


def pinned(distribution: str) -> bool:
    """Whether requirements.txt names ``distribution`` (a line starting with the name)."""
    pattern = re.compile(rf"^{re.escape(distribution)}\s*([=<>!~\[;]|$)", re.IGNORECASE)
    with open(REQUIREMENTS, encoding="utf-8") as f:
        return any(pattern.match(line.strip()) for line in f)


def try_import(module: str, distribution: str = None):
    """``(module, None)`` imported, or ``(None, reason)``; in CI a pinned package that fails raises."""
    distribution = distribution or module
    try:
        return importlib.import_module(module), None
    except Exception as error:  # bitsandbytes can fail with more than ImportError on an odd machine
        if os.environ.get("CI") and pinned(distribution):
            raise RuntimeError(f"CI must have {distribution} (pinned in requirements.txt; ./setup.sh installs it)") from error
        return None, f"{distribution} is not installed or does not import here ({type(error).__name__}: {error})"


def import_optional(module: str, distribution: str = None):
    """``module`` imported, or the calling test module skipped (see :func:`try_import`)."""
    imported, reason = try_import(module, distribution)
    if imported is None:
        pytest.skip(reason, allow_module_level=True)
    return imported
