"""Importing the apps leaves the host's logging alone (Flower lines are printed once)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_apps_adds_no_root_log_handler() -> None:
    code = "import logging, fedseg.server_app, clients.client_app; print(len(logging.root.handlers))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "0"
