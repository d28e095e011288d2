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


@app.command("validate-data")
def validate_data(
    site_dir: str = typer.Argument(..., help="a site folder: MSD dataset.json, or images/ + labels/"),
    num_classes: int = typer.Option(None, help="classes incl. background (default: dataset.json labels)"),
    channels: int = typer.Option(None, help="image channels the run expects (default: consistent across subjects)"),
    tolerance: float = typer.Option(1e-3, help="largest allowed image/label affine difference (mm)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Check a site's data; print every problem; exit 1 when there are errors."""
    import json

    from fedseg.data.validate import validate_site

    report = validate_site(site_dir, num_classes=num_classes, channels=channels, affine_tolerance=tolerance)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else "\n".join(report.lines()))
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def synth(
    out: str = typer.Argument(..., help="output folder: site-0 ... site-<n-1> and outside"),
    size: str = typer.Option("small", help="tiny (CI, seconds) | small (CPU experiments) | full"),
    sites: int = typer.Option(3, help="number of federated institutions"),
    num_classes: int = typer.Option(3, help="classes incl. background: 3 zones, 4 + bladder, 5 + lesion"),
    seed: int = typer.Option(0, help="seed; the same seed writes the same files"),
    overwrite: bool = typer.Option(False, help="replace synthetic sites already in OUT"),
) -> None:
    """Write realistic non-IID synthetic institutions as NIfTI + dataset.json."""
    import json

    from fedseg.data.synth import synthesize

    try:
        folders = synthesize(out, size, seed, sites, num_classes, overwrite)
    except (ValueError, FileExistsError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    for folder in folders:
        meta = json.loads((folder / "dataset.json").read_text())
        typer.echo(f"{folder}: {meta['numTraining']} subjects, {meta['institution']['contrast']}")


@app.command("strategies")
def strategies_command() -> None:
    """List installed strategies (built-in and plugins) with their run-config parameters."""
    from strategies.registry import describe_installed

    typer.echo("\n".join(describe_installed()))


if __name__ == "__main__":
    app()
