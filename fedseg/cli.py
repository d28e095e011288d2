"""The `fedseg` command line (typer). Each command is a thin wrapper over a library function.

Every command runs inside `_boundary`: bad input ends in one line `error: <file or key>: <what is
wrong>` and a non-zero exit, never in a traceback. fedseg's own errors (bad config, data, model
files, inputs, key files) and I/O errors exit 2; anything else is a bug and says so (exit 1;
FEDSEG_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click
import typer

import fedseg
from fedseg.errors import one_line

if TYPE_CHECKING:
    from fedseg.experiments import ExperimentSpec

DEBUG_ENV = "FEDSEG_DEBUG"

app = typer.Typer(
    name="fedseg",
    help="Federated 3D medical image segmentation on Flower and MONAI.",
    no_args_is_help=True,
    add_completion=False,
    suggest_commands=False,  # click suggests a near command itself; typer's would repeat it
)


def _known_errors() -> tuple[type[BaseException], ...]:
    """fedseg's error types whose messages name the file or key (imported only when one is raised)."""
    from fedseg.config import ConfigError
    from fedseg.data.datalist import SiteDataError
    from fedseg.data.validate import SettingError
    from fedseg.deploy.certs import CertError
    from fedseg.experiments import ExperimentError
    from fedseg.model_checkpoint import CheckpointError
    from fedseg.models import ModelError
    from fedseg.predict import PredictError
    from fedseg.report.cases import CasesError

    return (
        ConfigError,
        SiteDataError,
        SettingError,
        CertError,
        ExperimentError,
        CheckpointError,
        ModelError,  # names the network and the argument it cannot be built with
        PredictError,
        CasesError,
    )


def fail(message: str | Exception, code: int = 2) -> None:
    """Print `error: <message>` (one line) to stderr and exit with `code`."""
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code=code)


def _boundary(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command; turn any exception into one `error:` line and a non-zero exit (see the module doc)."""

    @functools.wraps(command)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except MemoryError:
            fail("out of memory (a volume or model too large for this machine? see --max-voxels)", 1)
        except OSError as err:
            if os.environ.get(DEBUG_ENV):
                raise
            where = f"{err.filename}: " if err.filename else ""
            fail(f"{where}{err.strerror or err}")
        except Exception as err:
            if os.environ.get(DEBUG_ENV):
                raise
            if isinstance(err, _known_errors()):
                fail(str(err))
            fail(f"unexpected {type(err).__name__}: {err} (a fedseg bug; {DEBUG_ENV}=1 shows the traceback)", 1)

    return guarded


@app.command()
@_boundary
def version() -> None:
    """Print the installed fedseg version."""
    typer.echo(fedseg.__version__)


@app.command("check-config")
@_boundary
def check_config(path: str = typer.Argument(..., help="TOML file of run-config keys, or an experiment spec")) -> None:
    """Validate a run config or an experiment spec (\\[experiment] table) without training anything.
    Keys of a strategy other than the selected one are ignored by a run: they get a warning."""
    from fedseg.config import ConfigError, RunConfig, read_toml
    from fedseg.experiments import ExperimentSpec
    from fedseg.experiments.arms import plan_arms
    from fedseg.model_spec import checked_network
    from fedseg.server_app import bundle_differences
    from strategies.registry import build_strategy

    try:
        if "experiment" in read_toml(path, "config"):
            spec = ExperimentSpec.from_toml(path)
            arms = plan_arms(spec)
            strategies = sorted({arm.strategy for arm in arms if arm.strategy})
            for key in unused_strategy_keys(spec.run_config(), strategies):
                typer.echo(
                    f"warning: {path}: [run] key '{key}' belongs to a strategy no arm uses "
                    f"({', '.join(strategies)}); the experiment ignores it",
                    err=True,
                )
            for arm in arms:
                plan = (
                    f"ensemble of {len(arm.members)} models"
                    if arm.members
                    else f"{arm.strategy}, {arm.rounds} round(s) x {arm.epochs:g} epoch(s)"
                )
                typer.echo(f"arm {arm.id}: {arm.kind}, {plan}")
            typer.echo(f"{len(arms)} arms; valid")
            return
        config = RunConfig.from_toml(path)
        build_strategy(config)
        network, parameters = checked_network(config)
    except ConfigError as err:
        fail(err if str(err).startswith(f"{path}:") else f"{path}: {err}")
    for key in unused_strategy_keys(config):
        typer.echo(
            f"warning: {path}: run-config key '{key}' belongs to another strategy than the selected "
            f"'{config.strategy}'; a run ignores it",
            err=True,
        )
    for key, value in config.to_dict().items():
        typer.echo(f"{key} = {value!r}")
    typer.echo(f"network: {network} [{network.source}], {parameters:,} parameters")
    for line in bundle_differences(config):
        typer.echo(f"warning: {path}: bundle: {line}", err=True)


def unused_strategy_keys(config: Any, strategies: Sequence[str] = ()) -> list[str]:
    """The `<strategy>.<parameter>` keys of `config` that none of `strategies` (default: the selected
    one) reads."""
    from fedseg.config import STRATEGY_PARAM_SEPARATOR
    from strategies.registry import resolve

    namespaces = {resolve(name).strategy_name() for name in strategies or [config.strategy]}
    return sorted(key for key in config.strategy_params if key.partition(STRATEGY_PARAM_SEPARATOR)[0] not in namespaces)


MAX_VOXELS_HELP = "largest volume this site loads, in voxels per channel (default: $FEDSEG_MAX_VOXELS or 512^3)"
ALLOW_OUTSIDE_HELP = (
    "accept files (links, manifest paths) outside the site folder (else: a file 'allow-outside-data' there)"
)


@app.command("validate-data")
@_boundary
def validate_data(
    site_dir: str = typer.Argument(..., help="a site folder: MSD dataset.json, or images/ + labels/"),
    num_classes: int = typer.Option(None, help="classes incl. background (default: dataset.json labels)"),
    channels: int = typer.Option(None, help="image channels the run expects (default: consistent across subjects)"),
    tolerance: float = typer.Option(1e-3, help="largest allowed image/label affine difference (mm)"),
    max_voxels: int = typer.Option(None, help=MAX_VOXELS_HELP),
    allow_outside_data: bool = typer.Option(None, "--allow-outside-data", help=ALLOW_OUTSIDE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Check a site's data; print every problem; exit 1 when there are errors."""
    import json

    from fedseg.data.validate import SettingError, validate_site

    try:
        report = validate_site(
            site_dir,
            num_classes=num_classes,
            channels=channels,
            affine_tolerance=tolerance,
            max_voxels=max_voxels,
            allow_outside=allow_outside_data,
        )
    except (SettingError, ValueError) as err:
        fail(f"--{err}" if isinstance(err, SettingError) else err)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else "\n".join(report.lines()))
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
@_boundary
def synth(
    out: str = typer.Argument(..., help="output folder: site-0 ... site-<n-1> and outside"),
    size: str = typer.Option("small", help="tiny (CI, seconds) | small (CPU experiments) | full"),
    sites: int = typer.Option(3, help="number of federated institutions"),
    num_classes: int = typer.Option(
        3, help="pelvis classes incl. background: 3 zones, 4 + bladder, 5 + lesion (not used for brain)"
    ),
    seed: int = typer.Option(0, help="seed; the same seed writes the same files"),
    subjects: int = typer.Option(0, help="base subjects per site (0: the size's; each institution scales it)"),
    overwrite: bool = typer.Option(
        False,
        help="replace synthetic sites already in OUT (without it a rerun keeps sites written with the same options)",
    ),
    anatomy: str = typer.Option(
        "pelvis",
        help="pelvis (prostate zones, 1 MR contrast) | brain (BraTS gliomas: T1, T1-Gd, T2, FLAIR; labels 0, 1, 2, 4)",
    ),
    outside_annotator_mm: float = typer.Option(
        None,
        help="label the outside institution's (same) images with this boundary offset in mm, -2 to 3 "
        "(0: the true boundary; default: its own annotator's, +0.5 pelvis, +1 brain)",
    ),
    outside_subjects: int = typer.Option(
        0, help="subjects of the outside institution (0: its share of the base; more begin with the same scans)"
    ),
) -> None:
    """Write realistic non-IID synthetic institutions as NIfTI + dataset.json."""
    import json

    from fedseg.data.synth import synthesize

    try:
        folders = synthesize(
            out, size, seed, sites, num_classes, overwrite, anatomy, subjects, outside_annotator_mm, outside_subjects
        )
    except (ValueError, FileExistsError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    for folder in folders:
        meta = json.loads((folder / "dataset.json").read_text())
        institution = meta["institution"]
        typer.echo(
            f"{folder}: {meta['numTraining']} subjects, {institution['contrast']}, "
            f"annotator {institution['annotator_mm']:+g} mm"
        )


@app.command("strategies")
@_boundary
def strategies_command() -> None:
    """List installed strategies (built-in and plugins) with their run-config parameters."""
    from strategies.registry import describe_installed

    typer.echo("\n".join(describe_installed()))


@app.command("models")
@_boundary
def models_command() -> None:
    """List the networks `model` can name: presets, installed plugins (`fedseg.models`), MONAI's classes."""
    from fedseg.models import describe_models

    typer.echo("\n".join(describe_models()))


@app.command("import-model")
@_boundary
def import_model(
    weights: str = typer.Argument(..., help="a state-dict .pt file, a run's checkpoint.pt, or a MONAI bundle folder"),
    out: str = typer.Option(..., help="the fedseg model file to write"),
    config: str = typer.Option(
        None,
        help="run-config TOML naming the network, in-channels, num-classes, "
        "label-scheme, patch-size and spacing (a bundle folder: optional)",
    ),
) -> None:
    """Make a fedseg model file (what `fedseg predict` and `init-from` read) from other weights."""
    from fedseg.model_import import import_model as run_import

    model = run_import(weights, out, config)
    typer.echo(
        f"{out}: {model.network} [{model.model_source}], {model.in_channels} channel(s), {model.num_classes} classes"
    )


# ---------------------------------------------------------------------- real sites
site_app = typer.Typer(
    help="What a hospital runs: check its data, join a federation.", no_args_is_help=True, suggest_commands=False
)
app.add_typer(site_app, name="site")


@app.command()
@_boundary
def certs(
    out: str = typer.Argument(..., help="folder to write ca.crt, server.crt/.key and sites/<name>/auth.key/.pub"),
    host: list[str] = typer.Option(..., "--host", help="server host name or IP the sites dial (repeatable)"),
    site: list[str] = typer.Option(..., "--site", help="site name (repeatable); one auth key pair each"),
    connection: str = typer.Option("fedseg", help="flwr connection name used in the printed commands"),
    port: int = typer.Option(9092, min=1, max=65535, help="SuperLink port used in the printed commands"),
    force: bool = typer.Option(False, help="replace existing keys and certificates in OUT (never through links)"),
) -> None:
    """Make a CA, the SuperLink's TLS certificate and per-site SuperNode key pairs (all or none;
    existing files only replaced with --force)."""
    from fedseg.deploy.certs import make_certs

    bundle = make_certs(out, host, site, force=force)
    typer.echo(f"CA certificate (give to every site): {bundle.ca_cert}")
    typer.echo(f"SuperLink certificate and key (stay on the server): {bundle.server_cert}, {bundle.server_key}")
    typer.echo("Register the sites once the SuperLink runs:")
    for line in bundle.registration_commands(connection):
        typer.echo(f"  {line}")
    typer.echo("Then each site (send it ca.crt and its own sites/<name>/auth.key, over a trusted channel):")
    for index, keys in enumerate(bundle.sites):
        typer.echo(
            f"  fedseg site join --superlink {host[0]}:{port} --data-dir DATA --name {keys.name} "
            f"--site-id {index} --ca ca.crt --auth-key auth.key"
        )


@app.command()
@_boundary
def server(
    certs_dir: str = typer.Option(None, "--certs", help="folder from `fedseg certs` (ca.crt, server.crt, server.key)"),
    host: str = typer.Option("0.0.0.0", help="address to listen on"),
    port: int = typer.Option(9092, help="port for SuperNodes and run submission (firewall it, see SECURITY.md)"),
    address: str = typer.Option(None, help="host name sites and `flwr` dial (default: the certificate's first name)"),
    node_auth: bool = typer.Option(True, help="accept only registered SuperNodes"),
    insecure: bool = typer.Option(False, help="no TLS: only for a local trial on one machine"),
    database: str = typer.Option(None, help="SQLite file for the SuperLink's state (default: in memory)"),
    print_only: bool = typer.Option(False, "--print", help="print the command instead of running it"),
) -> None:
    """Start the SuperLink of a federation (TLS and SuperNode authentication on by default). Refuses to
    start when its certificate cannot serve the printed address or the SuperExec's host name."""
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
    if tls is None:
        typer.echo("Connection for `flwr run . fedseg` (add to $FLWR_HOME/config.toml, default ~/.flwr/config.toml):")
        typer.echo(connection_toml("fedseg", f"{address or (host if host != '0.0.0.0' else '127.0.0.1')}:{port}", None))
        typer.echo(shell_line(command))
        if not print_only:
            exec_flower(command)
        return
    _serve_tls(tls, command, host, port, address, print_only)


def _serve_tls(tls: Any, command: list[str], host: str, port: int, address: str | None, print_only: bool) -> None:
    """Check the certificate for the printed address and the SuperExec's host, print, run both processes."""
    from fedseg.deploy.launch import connection_toml, shell_line, superexec_command
    from fedseg.deploy.server_process import run_server
    from fedseg.deploy.server_tls import (
        ServerCertificate,
        check_server_files,
        superexec_host,
    )

    cert = ServerCertificate.load(tls.server_cert)
    public = address or (cert.names[0] if cert.names else host)
    local = superexec_host(cert, host)
    check_server_files(tls.ca_cert, tls.server_cert, tls.server_key, [public, local])
    local_address = f"[{local}]:{port}" if ":" in local else f"{local}:{port}"
    public_address = f"[{public}]:{port}" if ":" in public else f"{public}:{port}"
    typer.echo("Connection for `flwr run . fedseg` (add to $FLWR_HOME/config.toml, default ~/.flwr/config.toml):")
    typer.echo(connection_toml("fedseg", public_address, tls.ca_cert))
    typer.echo(shell_line(command))
    typer.echo(shell_line(superexec_command(local_address, tls.ca_cert, parent_pid=None)) + " --parent-pid <SuperLink>")
    if not print_only:
        raise typer.Exit(
            code=run_server(
                command,
                lambda pid: superexec_command(local_address, tls.ca_cert, pid),
                local_address,
                tls.ca_cert,
                echo=typer.echo,
            )
        )


@site_app.command("check")
@_boundary
def site_check(
    data_dir: str = typer.Option(None, "--data-dir", help="this site's data folder"),
    config: str = typer.Option(None, help="run-config TOML (model, classes, patch size); default: built-in"),
    max_voxels: int = typer.Option(None, help=MAX_VOXELS_HELP),
    allow_outside_data: bool = typer.Option(None, "--allow-outside-data", help=ALLOW_OUTSIDE_HELP),
    superlink: str = typer.Option(None, help="HOST:PORT of the SuperLink: check it is reachable and TLS verifies"),
    ca: str = typer.Option(None, help="the federation's ca.crt (with --superlink)"),
) -> None:
    """Check that this site can join: the SuperLink is reachable and its TLS certificate verifies for
    that name (--superlink, --ca); the data validates and the model runs once on one volume
    (--data-dir). Exit 1 on problems."""
    if data_dir is None and superlink is None:
        fail("give --data-dir (check the data), --superlink HOST:PORT --ca ca.crt (check the connection), or both")
    if (superlink is None) != (ca is None):
        fail("--superlink and --ca go together: the SuperLink's address and the federation's ca.crt")
    if superlink is not None:
        from fedseg.deploy.superlink_probe import probe_superlink

        probe = probe_superlink(superlink, ca)
        typer.echo("\n".join(probe.lines))
        if not probe.ok:
            typer.echo("not ready: the SuperLink cannot be reached or verified", err=True)
            raise typer.Exit(code=1)
    if data_dir is not None:
        _check_site_data(data_dir, config, max_voxels, allow_outside_data)
    typer.echo("ready to join")


def _check_site_data(
    data_dir: str, config: str | None, max_voxels: int | None, allow_outside_data: bool | None
) -> None:
    """Validate the site's data, then one dry forward pass; exit 1 on problems."""
    from fedseg.config import ConfigError, RunConfig
    from fedseg.data.nifti_guard import voxel_limit
    from fedseg.deploy.site_check import check_site_ready

    try:
        run_config = RunConfig.from_toml(config) if config else RunConfig()
    except ConfigError as err:
        fail(err if str(err).startswith(f"{config}:") else f"{config}: {err}")
    try:
        with voxel_limit(max_voxels):
            report, dry_run = check_site_ready(data_dir, run_config, allow_outside_data)
    except ValueError as err:
        fail(f"--max-voxels: {err}")
    typer.echo("\n".join(report.lines()))
    if dry_run is None:
        typer.echo("not ready: fix the errors above, then check again", err=True)
        raise typer.Exit(code=1)
    typer.echo(dry_run.line(run_config))


@site_app.command("join")
@_boundary
def site_join(
    superlink: str = typer.Option(..., help="HOST:PORT of the federation's SuperLink"),
    data_dir: str = typer.Option(..., "--data-dir", help="this site's data folder (never leaves the site)"),
    name: str = typer.Option(..., help="this site's name, as registered with the SuperLink"),
    site_id: int = typer.Option(..., help="this site's number in the federation (0, 1, ...; unique)"),
    ca: str = typer.Option(None, help="the federation's ca.crt (TLS)"),
    auth_key: str = typer.Option(None, help="this site's private auth key (sites/<name>/auth.key)"),
    insecure: bool = typer.Option(False, help="no TLS and no authentication: only for a local trial"),
    local_port: int = typer.Option(
        9094, min=1, max=65535, help="port of the SuperNode's local runtime API (localhost)"
    ),
    max_voxels: int = typer.Option(None, min=1, help=MAX_VOXELS_HELP + "; set for the SuperNode's apps"),
    print_only: bool = typer.Option(False, "--print", help="print the command instead of running it"),
    warm_worker: bool = typer.Option(
        True,
        "--warm-worker/--no-warm-worker",
        help="answer every message in one long-lived worker (data and model stay "
        "loaded); off: Flower's fresh process per message does all the work",
    ),
) -> None:
    """Start this site's Flower SuperNode with its data folder and site number (and its warm worker)."""
    from fedseg.data.nifti_guard import MAX_VOXELS_ENV
    from fedseg.deploy.launch import (
        exec_flower,
        shell_line,
        site_worker_socket,
        start_site_worker,
        supernode_command,
    )

    if insecure == (ca is not None):
        typer.echo("error: give --ca (and --auth-key), or --insecure for a local trial", err=True)
        raise typer.Exit(code=2)
    worker = site_worker_socket(data_dir) if warm_worker else None
    command = supernode_command(superlink, data_dir, site_id, ca, auth_key, local_port, worker)
    limit = f"{MAX_VOXELS_ENV}={max_voxels} " if max_voxels else ""
    typer.echo(f"site {name}: {limit}{shell_line(command)}")
    if max_voxels and not print_only:
        os.environ[MAX_VOXELS_ENV] = str(max_voxels)  # the SuperNode, its apps and the worker inherit it
    if not print_only:
        if worker is not None:
            start_site_worker(worker)
        exec_flower(command)


@site_app.command("personal-model")
@_boundary
def site_personal_model(
    out: str = typer.Argument(..., help="the fedseg model file to write"),
    model: str = typer.Option(..., help="the federation's global model file (model.pt) or run folder"),
    state_dir: str = typer.Option(None, "--state-dir", help="this site's state folder (node config 'state-dir')"),
    data_dir: str = typer.Option(
        None, "--data-dir", help="this site's data folder, as given to `site join` (finds the default state folder)"
    ),
    run: str = typer.Option(None, help="the run key, when the state folder holds several runs"),
) -> None:
    """Write this site's personal model (FedBN, FedPer, Ditto) as a model file for `fedseg predict`; with
    `--model` twice there, the global and personal models' mean."""
    from clients.site_runtime import deployed_state_dir
    from fedseg.personal_export import export_personal_model

    if (state_dir is None) == (data_dir is None):
        fail("give --state-dir, or --data-dir of a site that runs with the default state folder")
    folder = state_dir if state_dir is not None else deployed_state_dir(data_dir)
    personal, key = export_personal_model(model, folder, out, run)
    typer.echo(f"{out}: personal model of run {key} ({personal.network}, {personal.num_classes} classes)")


SEED_HELP = (
    "run the study at this seed instead of the config's \\[run] seed: results in <name>-seed<N> (the config's "
    "own seed keeps <name>)"
)


@app.command()
@_boundary
def experiment(
    config: str = typer.Argument(..., help="experiment TOML (see configs/experiment-*.toml)"),
    seed: int = typer.Option(None, help=SEED_HELP),
) -> None:
    """Run every arm of an experiment (finished arms are skipped when started again); write cases.csv."""
    from fedseg.config import ConfigError
    from fedseg.experiments import ExperimentError, run_experiment

    try:
        results = run_experiment(_experiment_spec(config, seed), echo=typer.echo)
    except (ConfigError, ExperimentError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    typer.echo(f"results: {results}; next: fedseg report {results}")


@app.command()
@_boundary
def retest(
    config: str = typer.Argument(..., help="the experiment TOML whose finished results hold the models"),
    outside: str = typer.Argument(..., help="a labelled institution folder no arm trained on"),
    out: str = typer.Option(..., help="new results folder for `fedseg report` (the experiment's is only read)"),
    seed: int = typer.Option(None, help=SEED_HELP),
) -> None:
    """Test an experiment's finished models on another outside institution without training again; the
    internal test cases are kept as they were."""
    from fedseg.experiments.retest import retest_experiment

    results = retest_experiment(_experiment_spec(config, seed), outside, out, echo=typer.echo)
    typer.echo(f"results: {results}; next: fedseg report {results}")


def _experiment_spec(config: str, seed: int | None) -> ExperimentSpec:
    """The experiment config, at `seed` when given (a bad seed names --seed)."""
    from fedseg.config import ConfigError
    from fedseg.experiments import ExperimentSpec

    spec = ExperimentSpec.from_toml(config)
    if seed is None:
        return spec
    try:
        return spec.with_seed(seed)
    except ConfigError as err:
        raise ConfigError(f"--seed {seed}: {err}") from err


def _arm_pairs(values: list[str]) -> dict[str, str]:
    """`--pair OURS=THEIRS` values as a mapping; CasesError for a malformed or repeated one."""
    from fedseg.report.cases import CasesError

    pairs: dict[str, str] = {}
    for value in values:
        ours, sep, theirs = (part.strip() for part in value.partition("="))
        if not sep or not ours or not theirs:
            raise CasesError(f"--pair {value!r}: expected OURS=THEIRS, two arm names")
        if ours in pairs:
            raise CasesError(f"--pair: arm {ours!r} is paired twice")
        pairs[ours] = theirs
    return pairs


@app.command()
@_boundary
def report(
    results_dirs: list[str] = typer.Argument(
        ..., metavar="RESULTS_DIR...", help="results folder holding cases.csv; several: one study at other seeds"
    ),
    out: str = typer.Option(None, help="where report.md and the plots go (default: RESULTS_DIR; several: required)"),
    against: str = typer.Option(
        None,
        help="comma-separated results folders of another configuration (the same seeds): pair each model "
        "both trained across the two, scan by scan (needs --out)",
    ),
    pair: list[str] = typer.Option(
        None,
        metavar="OURS=THEIRS",
        help="with --against: also pair arm OURS of RESULTS_DIR... with arm THEIRS of --against's runs, e.g. "
        "fedavgm=fedavg (repeatable)",
    ),
) -> None:
    """Markdown tables (cross-site Dice, arm means, paired tests) and PNG plots from cases.csv; with several
    results folders (the same study at other seeds), report.md summarising them: % of centralized per
    run and on average, outside Dice, paired tests pooled over the runs; with --against, report.md
    comparing them with another configuration's runs, model by model."""
    from fedseg.report import build_against_report, build_report, build_seed_report
    from fedseg.report.cases import CasesError

    try:
        if against is not None:
            if out is None:
                raise CasesError("--against needs --out (a folder for the comparison's report.md)")
            others = [folder.strip() for folder in against.split(",") if folder.strip()]
            typer.echo(build_against_report(results_dirs, others, out, _arm_pairs(pair or [])))
        elif pair:
            raise CasesError("--pair needs --against (the configuration whose arms it names)")
        elif len(results_dirs) == 1:
            typer.echo(build_report(results_dirs[0], out))
        elif out is None:
            raise CasesError(f"{len(results_dirs)} results folders need --out (a folder for their report.md)")
        else:
            typer.echo(build_seed_report(results_dirs, out))
    except CasesError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err


@app.command()
@_boundary
def predict(
    paths: list[str] = typer.Argument(
        ...,
        metavar="INPUT... OUTPUT",
        help="one case (a 3D/4D .nii/.nii.gz file, or one 3D file per modality in the model's order) and the "
        "output file; or a folder of cases (<id>_0000.nii.gz, <id>_0001.nii.gz, ... grouped) and an output folder",
    ),
    model: list[str] = typer.Option(
        ...,
        help="a fedseg model file (a run's model.pt / best-model.pt, an experiment "
        "arm's model), a run folder or its checkpoint.pt; repeat for an "
        "ensemble (probabilities averaged)",
    ),
    max_voxels: int = typer.Option(
        None,
        help="largest input volume, in voxels per channel, also on the model's grid "
        "(default: $FEDSEG_MAX_VOXELS or 512^3)",
    ),
) -> None:
    """Segment volumes; the labels are written on the input's grid (shape, spacing, affine). All
    outputs are written, or none; inputs with NaN or infinite voxels are refused."""
    from fedseg.data.nifti_guard import max_voxels_setting
    from fedseg.predict import predict as run_predict

    if len(paths) < 2:
        fail(f"{paths[0]}: give the input file(s) or folder, then the output file or folder")
    try:
        limit = max_voxels_setting(max_voxels)
    except ValueError as err:
        fail(f"--max-voxels: {err}")
    for path in run_predict(model, paths[:-1], paths[-1], max_voxels=limit):
        typer.echo(path)


superlink_app = typer.Typer(
    help="The local SuperLink that `flwr run` starts (its environment and folder).",
    no_args_is_help=True,
    suggest_commands=False,
)
app.add_typer(superlink_app, name="superlink")


@app.command("run")
@_boundary
def run_command(
    app_dir: str = typer.Argument(".", help="the Flower app (this project's folder)"),
    connection: str = typer.Argument(None, help="flwr connection name (default: flwr's default, the local SuperLink)"),
    run_config: list[str] = typer.Option([], "--run-config", "-c", help="run-config overrides, as for flwr run"),
    federation_config: list[str] = typer.Option([], "--federation-config", help="as for flwr run"),
    stream: bool = typer.Option(True, help="stream the run's log (flwr run --stream)"),
    restart_superlink: bool = typer.Option(
        False, help="stop a local SuperLink of another Python environment instead of refusing to run"
    ),
) -> None:
    """`flwr run` that runs in this environment and writes below this folder: relative run-config paths
    (output-dir, data-dir, ...) are passed as absolute ones; a local SuperLink started from another
    environment is refused (or restarted)."""
    from pathlib import Path

    from fedseg.local_superlink import SuperLinkError, run

    try:
        code = run(Path(app_dir), connection, run_config, federation_config, stream, restart_superlink, typer.echo)
    except SuperLinkError as err:
        fail(str(err))
    raise typer.Exit(code=code)


@superlink_app.command("status")
@_boundary
def superlink_status() -> None:
    """Which local SuperLink runs: its process, environment and working folder."""
    from fedseg.local_superlink import control_address, find_local_superlink

    superlink = find_local_superlink()
    typer.echo(superlink.describe() if superlink else f"no local SuperLink on {control_address()}")


@superlink_app.command("stop")
@_boundary
def superlink_stop() -> None:
    """Stop the local SuperLink (and its runs); the next `flwr run` starts one from its own environment."""
    from fedseg.local_superlink import SuperLinkError, control_address, find_local_superlink, stop_local_superlink

    superlink = find_local_superlink()
    if superlink is None:
        typer.echo(f"no local SuperLink on {control_address()}")
        return
    try:
        stop_local_superlink(superlink)
    except SuperLinkError as err:
        fail(str(err))
    typer.echo(f"stopped the {superlink.describe()}")


if __name__ == "__main__":
    app()
