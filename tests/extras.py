"""The test extras (``pip install -e '.[test]'``: sep, difi, the notebook runner): a test that needs one is
skipped where it is missing — except under ``CI=true``, where it fails, so that CI cannot pass by skipping.
Packages the project itself requires are imported plainly: a missing one is an error, never a skip."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def need_extra(module: str) -> ModuleType:
    """Import ``module`` from the test extras; skip without it, fail without it under CI=true."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = f"{module} is not importable ({exc}); pip install -e '.[test]' brings it"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {message}; CI must not skip these tests", pytrace=False)
        pytest.skip(message, allow_module_level=True)
