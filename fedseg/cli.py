"""The `fedseg` command line (typer). Each command is a thin wrapper over a library function."""

from __future__ import annotations

import typer

import fedseg

app = typer.Typer(
    name="fedseg",
    help="Federated 3D medical image segmentation on Flower and MONAI.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the installed fedseg version."""
    typer.echo(fedseg.__version__)


@app.command("check-config")
def check_config(path: str = typer.Argument(..., help="TOML file of run-config keys")) -> None:
    """Validate a run-config TOML file without training anything."""
    from fedseg.config import ConfigError, RunConfig

    try:
        config = RunConfig.from_toml(path)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    for key, value in config.to_dict().items():
        typer.echo(f"{key} = {value!r}")


@app.command("strategies")
def strategies_command() -> None:
    """List installed strategies (built-in and plugins) with their run-config parameters."""
    from strategies.registry import describe_installed

    typer.echo("\n".join(describe_installed()))


if __name__ == "__main__":
    app()
