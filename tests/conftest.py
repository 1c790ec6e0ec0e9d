"""Shared test helpers: external tools are required in CI (GPU_ROUTER_REQUIRE_TOOLS=1), optional elsewhere."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """The path of an external program; skips the test without it, or fails when CI demands every tool."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install prometheus prometheus-alertmanager chromium systemd)"
        if os.environ.get("GPU_ROUTER_REQUIRE_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path
