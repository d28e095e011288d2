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
def check_config(path: str = typer.Argument(..., help="TOML file of run-config keys, or an experiment spec")) -> None:
    """Validate a run config or an experiment spec ([experiment] table) without training anything."""
    from fedseg.config import ConfigError, RunConfig, read_toml
    from fedseg.experiments import ExperimentSpec
    from fedseg.experiments.arms import plan_arms
    from strategies.registry import build_strategy

    try:
        if "experiment" in read_toml(path, "config"):
            arms = plan_arms(ExperimentSpec.from_toml(path))
            for arm in arms:
                plan = (f"ensemble of {len(arm.members)} models" if arm.members
                        else f"{arm.strategy}, {arm.rounds} round(s) x {arm.epochs} epoch(s)")
                typer.echo(f"arm {arm.id}: {arm.kind}, {plan}")
            typer.echo(f"{len(arms)} arms; valid")
            return
        config = RunConfig.from_toml(path)
        build_strategy(config)
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
    num_classes: int = typer.Option(
        3, help="pelvis classes incl. background: 3 zones, 4 + bladder, 5 + lesion (not used for brain)"
    ),
    seed: int = typer.Option(0, help="seed; the same seed writes the same files"),
    overwrite: bool = typer.Option(False, help="replace synthetic sites already in OUT"),
    anatomy: str = typer.Option(
        "pelvis", help="pelvis (prostate zones, 1 MR contrast) | brain (BraTS gliomas: T1, T1-Gd, T2, FLAIR; "
        "labels 0, 1, 2, 4)"
    ),
) -> None:
    """Write realistic non-IID synthetic institutions as NIfTI + dataset.json."""
    import json

    from fedseg.data.synth import synthesize

    try:
        folders = synthesize(out, size, seed, sites, num_classes, overwrite, anatomy)
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



# ---------------------------------------------------------------------- real sites
site_app = typer.Typer(help="What a hospital runs: check its data, join a federation.", no_args_is_help=True)
app.add_typer(site_app, name="site")


@app.command()
def certs(
    out: str = typer.Argument(..., help="folder to write ca.crt, server.crt/.key and sites/<name>/auth.key/.pub"),
    host: list[str] = typer.Option(..., "--host", help="server host name or IP the sites dial (repeatable)"),
    site: list[str] = typer.Option(..., "--site", help="site name (repeatable); one auth key pair each"),
    connection: str = typer.Option("fedseg", help="flwr connection name used in the printed commands"),
    port: int = typer.Option(9092, help="SuperLink port used in the printed commands"),
) -> None:
    """Make a CA, the SuperLink's TLS certificate and per-site SuperNode key pairs."""
    from fedseg.deploy.certs import make_certs

    try:
        bundle = make_certs(out, host, site)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    typer.echo(f"CA certificate (give to every site): {bundle.ca_cert}")
    typer.echo(f"SuperLink certificate and key (stay on the server): {bundle.server_cert}, {bundle.server_key}")
    typer.echo("Register the sites once the SuperLink runs:")
    for line in bundle.registration_commands(connection):
        typer.echo(f"  {line}")
    typer.echo("Then each site (send it ca.crt and its own sites/<name>/auth.key, over a trusted channel):")
    for index, keys in enumerate(bundle.sites):
        typer.echo(f"  fedseg site join --superlink {host[0]}:{port} --data-dir DATA --name {keys.name} "
                   f"--site-id {index} --ca ca.crt --auth-key auth.key")


@app.command()
def server(
    certs_dir: str = typer.Option(None, "--certs", help="folder from `fedseg certs` (ca.crt, server.crt, server.key)"),
    host: str = typer.Option("0.0.0.0", help="address to listen on"),
    port: int = typer.Option(9092, help="port for SuperNodes and run submission (firewall it, see SECURITY.md)"),
    node_auth: bool = typer.Option(True, help="accept only registered SuperNodes"),
    insecure: bool = typer.Option(False, help="no TLS: only for a local trial on one machine"),
    database: str = typer.Option(None, help="SQLite file for the SuperLink's state (default: in memory)"),
    print_only: bool = typer.Option(False, "--print", help="print the command instead of running it"),
) -> None:
    """Start the SuperLink of a federation (TLS and SuperNode authentication on by default)."""
    from fedseg.deploy.launch import TlsFiles, connection_toml, exec_flower, shell_line, superlink_command

    if (certs_dir is None) != insecure:
        typer.echo("error: give --certs DIR (from `fedseg certs`), or --insecure for a local trial", err=True)
        raise typer.Exit(code=2)
    try:
        tls = None if insecure else TlsFiles.from_dir(certs_dir)
    except FileNotFoundError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    command = superlink_command(tls, host=host, port=port, node_auth=node_auth, database=database)
    typer.echo("Connection for `flwr run . fedseg` (add to $FLWR_HOME/config.toml, default ~/.flwr/config.toml):")
    typer.echo(connection_toml("fedseg", f"{host if host != '0.0.0.0' else '127.0.0.1'}:{port}",
                               tls.ca_cert if tls else None))
    typer.echo(shell_line(command))
    if not print_only:
        exec_flower(command)


@site_app.command("check")
def site_check(
    data_dir: str = typer.Option(..., "--data-dir", help="this site's data folder"),
    config: str = typer.Option(None, help="run-config TOML (model, classes, patch size); default: built-in"),
) -> None:
    """Validate this site's data, then run the model once on one volume; exit 1 on problems."""
    from fedseg.config import ConfigError, RunConfig
    from fedseg.deploy.site_check import check_site_ready

    try:
        run_config = RunConfig.from_toml(config) if config else RunConfig()
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    report, dry_run = check_site_ready(data_dir, run_config)
    typer.echo("\n".join(report.lines()))
    if dry_run is None:
        typer.echo("not ready: fix the errors above, then check again", err=True)
        raise typer.Exit(code=1)
    typer.echo(dry_run.line(run_config))
    typer.echo("ready to join")


@site_app.command("join")
def site_join(
    superlink: str = typer.Option(..., help="HOST:PORT of the federation's SuperLink"),
    data_dir: str = typer.Option(..., "--data-dir", help="this site's data folder (never leaves the site)"),
    name: str = typer.Option(..., help="this site's name, as registered with the SuperLink"),
    site_id: int = typer.Option(..., help="this site's number in the federation (0, 1, ...; unique)"),
    ca: str = typer.Option(None, help="the federation's ca.crt (TLS)"),
    auth_key: str = typer.Option(None, help="this site's private auth key (sites/<name>/auth.key)"),
    insecure: bool = typer.Option(False, help="no TLS and no authentication: only for a local trial"),
    local_port: int = typer.Option(9094, help="port of the SuperNode's local runtime API (localhost)"),
    print_only: bool = typer.Option(False, "--print", help="print the command instead of running it"),
) -> None:
    """Start this site's Flower SuperNode with its data folder and site number."""
    from fedseg.deploy.launch import exec_flower, shell_line, supernode_command

    if insecure == (ca is not None):
        typer.echo("error: give --ca (and --auth-key), or --insecure for a local trial", err=True)
        raise typer.Exit(code=2)
    command = supernode_command(superlink, data_dir, site_id, ca, auth_key, local_port)
    typer.echo(f"site {name}: {shell_line(command)}")
    if not print_only:
        exec_flower(command)



@app.command()
def experiment(config: str = typer.Argument(..., help="experiment TOML (see configs/experiment-*.toml)")) -> None:
    """Run every arm of an experiment (finished arms are skipped when started again); write cases.csv."""
    from fedseg.config import ConfigError
    from fedseg.experiments import ExperimentError, ExperimentSpec, run_experiment

    try:
        results = run_experiment(ExperimentSpec.from_toml(config), echo=typer.echo)
    except (ConfigError, ExperimentError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    typer.echo(f"results: {results}; next: fedseg report {results}")


@app.command()
def report(
    results_dir: str = typer.Argument(..., help="results folder holding cases.csv"),
    out: str = typer.Option(None, help="where report.md and the plots go (default: RESULTS_DIR)"),
) -> None:
    """Markdown tables (cross-site Dice, arm means, paired tests) and PNG plots from cases.csv."""
    from fedseg.report import build_report
    from fedseg.report.cases import CasesError

    try:
        typer.echo(build_report(results_dir, out))
    except CasesError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err


@app.command()
def predict(
    paths: list[str] = typer.Argument(
        ..., metavar="INPUT... OUTPUT",
        help="one case (a 3D/4D .nii/.nii.gz file, or one 3D file per modality in the model's order) and the "
             "output file; or a folder of cases (<id>_0000.nii.gz, <id>_0001.nii.gz, ... grouped) and an output folder",
    ),
    model: list[str] = typer.Option(..., help="model checkpoint; repeat for an ensemble (probabilities averaged)"),
) -> None:
    """Segment volumes; the labels are written on the input's grid (shape, spacing, affine)."""
    from fedseg.model_checkpoint import CheckpointError
    from fedseg.predict import PredictError
    from fedseg.predict import predict as run_predict

    if len(paths) < 2:
        typer.echo("error: give the input file(s) or folder, then the output", err=True)
        raise typer.Exit(code=2)
    try:
        outputs = run_predict(model, paths[:-1], paths[-1])
    except (PredictError, CheckpointError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    for path in outputs:
        typer.echo(path)

if __name__ == "__main__":
    app()
