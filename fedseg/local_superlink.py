"""The local SuperLink that `flwr run` starts, and runs that land where the caller expects.

`flwr run` against the local connection (address ":local:") starts a detached `flower-superlink`
the first time and reuses it afterwards, from any folder and any Python environment. Its apps run
in *its* environment, and their relative paths resolve against *its* working folder: after `flwr
run .` in a second checkout (or another virtual environment), the run used the first checkout's
fedseg and wrote its run folder there. `fedseg run` closes both gaps: it refuses (or, asked to,
restarts) a local SuperLink of another environment, and passes the run config's relative paths as
absolute ones, resolved against the caller's folder. `fedseg superlink status|stop` shows and ends it.

Finding the process reads /proc (Linux); elsewhere the environment check is skipped with a note.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.config import ConfigError, read_toml

LOCAL_ADDRESSES = (":local:", ":local-in-memory:")  # flwr's magic addresses of the managed local SuperLink
DEFAULT_CONTROL_PORT = "39093"  # Flower's default; FLWR_LOCAL_CONTROL_API_PORT overrides it (as in flwr)
# run-config keys holding paths that the ServerApp or the simulated sites open, and their "not a path" values
PATH_KEYS = {
    "output-dir": (),
    "data-dir": ("synthetic",),
    "resume-from": ("",),
    "tracking-dir": ("",),
    "init-from": ("",),
    "bundle": ("",),
}
STOP_WAIT_S = 15.0


class SuperLinkError(RuntimeError):
    """The local SuperLink belongs to another environment, or cannot be stopped."""


@dataclass(frozen=True)
class LocalSuperLink:
    """A running local SuperLink: its process, the environment's bin folder it runs from, its working folder."""

    pid: int
    bin_dir: Path
    folder: Path | None

    @property
    def same_environment(self) -> bool:
        """Whether it runs from this Python environment (the bin folder of this interpreter)."""
        return self.bin_dir == this_bin_dir()

    def describe(self) -> str:
        where = f"started from folder {self.folder}" if self.folder else "its folder unknown"
        env = "this Python environment" if self.same_environment else f"another Python environment ({self.bin_dir})"
        return f"local SuperLink pid {self.pid}: {env}, {where}"


def this_bin_dir() -> Path:
    """The bin folder of this interpreter's environment (where its flwr and flower-superlink are)."""
    return Path(sys.executable).absolute().parent.resolve()


def control_address() -> str:
    """The local SuperLink's Control API address, as flwr computes it."""
    return f"127.0.0.1:{os.environ.get('FLWR_LOCAL_CONTROL_API_PORT', DEFAULT_CONTROL_PORT)}"


def find_local_superlink(address: str | None = None) -> LocalSuperLink | None:
    """The process serving the local SuperLink's Control API `address` (default: flwr's), None when none
    runs; None too where /proc is missing (not Linux)."""
    address = address or control_address()
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        script = next((arg for arg in args[:2] if Path(arg).name == "flower-superlink"), None)
        if script is None or _option(args, "--control-api-address") != address:
            continue
        try:
            folder: Path | None = Path(os.readlink(entry / "cwd"))
        except OSError:
            folder = None
        return LocalSuperLink(int(entry.name), Path(script).absolute().parent.resolve(), folder)
    return None


def relative_path_notes(values: dict[str, Any], folder: Path) -> list[str]:
    """For a ServerApp: the run-config paths that resolve against its working `folder`, which under `flwr
    run`'s local SuperLink is the folder that first started the SuperLink, not the caller's."""
    notes = []
    for key, not_paths in PATH_KEYS.items():
        value = values.get(key)
        if isinstance(value, str) and value not in not_paths and not Path(value).expanduser().is_absolute():
            notes.append(
                f"run-config '{key}' = '{value}' is relative: it resolves against the ServerApp's folder "
                f"{folder} (under flwr run's local SuperLink, the folder that started that SuperLink); "
                "`fedseg run` passes it resolved against your folder"
            )
    return notes


def environment_line() -> str:
    """This process's Python environment and the fedseg and Flower it runs, for the run's log."""
    import fedseg
    from fedseg.flower_compat import flower_version

    return (
        f"environment: {sys.executable} (fedseg {fedseg.__version__} from {Path(fedseg.__file__).parent.parent}, "
        f"flwr {flower_version()}), folder {Path.cwd()}"
    )


def stop_local_superlink(superlink: LocalSuperLink) -> None:
    """End the SuperLink and the apps it started (its process group); SuperLinkError if it stays."""
    try:
        group = os.getpgid(superlink.pid)
        if group == superlink.pid:  # flwr starts it detached, as the leader of its own group
            os.killpg(group, signal.SIGTERM)
        else:
            os.kill(superlink.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline:
        if not _alive(superlink.pid):
            return
        time.sleep(0.2)
    os.kill(superlink.pid, signal.SIGKILL)
    if _alive(superlink.pid):
        raise SuperLinkError(f"local SuperLink pid {superlink.pid} did not stop")


def check_local_superlink(restart: bool, echo: Any = print) -> None:
    """Refuse a local SuperLink of another environment (with `restart`: stop it, so that flwr starts one
    from this environment)."""
    superlink = find_local_superlink()
    if superlink is None or superlink.same_environment:
        return
    if not restart:
        raise SuperLinkError(
            f"the {superlink.describe()}: `flwr run` would run this app with that environment's packages. "
            "Stop it (fedseg superlink stop) or pass --restart-superlink; flwr then starts one from here"
        )
    echo(f"stopping the {superlink.describe()}")
    stop_local_superlink(superlink)


def absolute_run_config(app_dir: Path, overrides: list[str], cwd: Path) -> dict[str, Any]:
    """The run config's path keys (app defaults, then `overrides` "key=value ..." as flwr parses them) as
    absolute paths against `cwd`; keys the app does not define are left out."""
    pyproject = app_dir / "pyproject.toml"
    defaults = read_toml(pyproject, "the app's pyproject.toml").get("tool", {}).get("flwr", {}).get("app", {})
    values = {**defaults.get("config", {}), **_parsed(overrides)}
    resolved = {}
    for key, not_paths in PATH_KEYS.items():
        value = values.get(key)
        if not isinstance(value, str) or value in not_paths:
            continue
        path = Path(value).expanduser()
        resolved[key] = str(path if path.is_absolute() else (cwd / path).resolve())
    return resolved


def connection_is_local(connection: str | None) -> bool:
    """Whether the named flwr connection (default: flwr's default one) is the managed local SuperLink."""
    from flwr.supercore.utils import get_flwr_home

    path = get_flwr_home() / "config.toml"
    if not path.is_file():
        return connection is None  # flwr writes its default config, whose default is the local SuperLink
    try:
        superlinks = tomllib.loads(path.read_text()).get("superlink", {})
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: cannot read flwr's connections: {err}") from None
    name = connection or superlinks.get("default", "local")
    return superlinks.get(name, {}).get("address") in LOCAL_ADDRESSES


def flwr_run_command(
    app_dir: Path,
    connection: str | None,
    run_config: dict[str, Any],
    overrides: list[str],
    federation_config: list[str],
    stream: bool = True,
    scratch: Path | None = None,
) -> list[str]:
    """`flwr run` of this environment with the caller's overrides and then `run_config` (the last wins);
    a TOML file of overrides is merged with them into `scratch`/run-config.toml (flwr takes a file alone)."""
    command = [str(this_bin_dir() / "flwr"), "run", str(app_dir)] + ([connection] if connection else [])
    if len(overrides) == 1 and overrides[0].endswith(".toml"):
        if scratch is None:
            raise ValueError("a TOML file of run-config overrides needs a scratch folder")
        merged = {**_parsed(overrides), **run_config}
        path = scratch / "run-config.toml"
        path.write_text("".join(f"{_toml_key(key)} = {json.dumps(value)}\n" for key, value in merged.items()))
        command += ["--run-config", str(path)]
    else:
        for override in overrides:
            command += ["--run-config", override]
        if run_config:
            command += ["--run-config", " ".join(f"{key}={run_config_value(v)}" for key, v in run_config.items())]
    for item in federation_config:
        command += ["--federation-config", item]
    return command + (["--stream"] if stream else [])


def run(
    app_dir: Path,
    connection: str | None,
    overrides: list[str],
    federation_config: list[str],
    stream: bool,
    restart_superlink: bool,
    echo: Any = print,
) -> int:
    """`flwr run` whose run lands below the caller's folder and runs in the caller's environment."""
    app_dir = app_dir.expanduser().resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise ConfigError(f"{app_dir}: not a Flower app (no pyproject.toml)")
    run_config = absolute_run_config(app_dir, overrides, Path.cwd())
    if connection_is_local(connection):
        check_local_superlink(restart_superlink, echo)
    for key, value in run_config.items():
        echo(f"{key}: {value}")
    env = flwr_environment()
    with tempfile.TemporaryDirectory(prefix="fedseg-run-") as scratch:
        command = flwr_run_command(app_dir, connection, run_config, overrides, federation_config, stream, Path(scratch))
        return subprocess.run(command, env=env, check=False).returncode


def _parsed(overrides: list[str]) -> dict[str, Any]:
    """`--run-config` values as flwr reads them; ConfigError (one line) when flwr cannot."""
    import click
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args(overrides)
    except (click.ClickException, ValueError, OSError) as err:
        message = err.format_message() if isinstance(err, click.ClickException) else str(err)
        raise ConfigError(f"--run-config {' '.join(overrides)!r}: {message}") from None


def flwr_environment(**extra: str) -> dict[str, str]:
    """This process's environment with this environment's bin folder first on PATH (so that `flwr` starts
    our flower-superlink), plus `extra` variables."""
    return {**os.environ, "PATH": f"{this_bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def run_config_value(value: object) -> str:
    """A run-config value as flwr's --run-config parser reads it back unchanged: a string in double quotes
    (the parser takes no escapes), a boolean in lower case, a number as it is."""
    if isinstance(value, bool):
        return str(value).lower()
    if not isinstance(value, str):
        return str(value)
    if '"' in value:
        raise ConfigError(f"value {value!r}: a double quote cannot be passed to flwr's --run-config")
    return f'"{value}"'


def _toml_key(key: str) -> str:
    """A flat run-config key as TOML (dotted strategy keys stay dotted: flwr flattens tables back)."""
    return ".".join(
        part if part.replace("-", "").replace("_", "").isalnum() else json.dumps(part) for part in key.split(".")
    )


def _option(args: list[str], name: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.is_file() and status.read_text().split(")")[-1].split()[0] == "Z")  # a zombie has ended
