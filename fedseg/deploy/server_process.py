"""Run a TLS SuperLink and its SuperExec as one service: `fedseg server` with `--certs`.

The SuperLink starts first; once it listens, its certificate is checked live the way the SuperExec
will check it (a TLS handshake to the SuperExec's host name with `ca.crt`); only then does the
SuperExec start. A failed check stops the SuperLink and ends in one line. Afterwards this process
waits: TERM or INT stops both, and when either stops the other is stopped too.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from fedseg.deploy.certs import CertError
from fedseg.deploy.launch import flower_environment, flower_program
from fedseg.deploy.superlink_probe import Probe, probe_superlink

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def run_server(
    superlink: list[str],
    superexec: Callable[[int], list[str]],
    local_address: str,
    ca_cert: Path,
    echo: Callable[[str], None] = print,
) -> int:
    """Start `superlink`, verify it at `local_address`, start `superexec(superlink pid)`; return the exit code."""
    link = subprocess.Popen(flower_program(superlink), env=flower_environment())
    processes = [link]
    stopping: list[int] = []

    def stop_all(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        probe = _wait_until_verified(link, local_address, ca_cert, stopping)
        if probe is None:
            return link.returncode if link.returncode is not None else 0
        if not probe.ok:
            raise CertError(f"the SuperLink's own SuperExec could not use it: {probe.lines[-1]}")
        echo(f"SuperLink verified at {local_address}; starting its SuperExec")
        processes.append(subprocess.Popen(flower_program(superexec(link.pid)), env=flower_environment()))
        while not stopping:
            for proc in processes:
                if proc.poll() is not None:
                    if proc is not link:
                        echo(f"error: the SuperExec stopped (exit {proc.returncode}); stopping the SuperLink")
                    return proc.returncode or (0 if proc is link else 1)
            time.sleep(0.5)
        return 0
    finally:
        _stop(processes)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_until_verified(link: subprocess.Popen, address: str, ca_cert: Path, stopping: list[int]) -> Probe | None:
    """The probe of the SuperLink once it accepts connections (None: it exited or we were told to stop)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not stopping and link.poll() is None:
        probe = probe_superlink(address, ca_cert, timeout=5.0)
        refused = not probe.ok and "connection refused" in probe.lines[-1]
        if not refused or time.monotonic() > deadline:
            return probe
        time.sleep(0.5)
    return None


def _stop(processes: list[subprocess.Popen]) -> None:
    """TERM the still-running processes (last started first), KILL what outlives the timeout."""
    for proc in reversed(processes):
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(processes):
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
