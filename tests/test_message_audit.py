"""Audit of everything that leaves a site: weight arrays and whitelisted aggregate metrics only."""

from __future__ import annotations

import re
from pathlib import Path

from flwr.app import Message
from inprocess_grid import InProcessGrid, run_federation, task_identity, tiny_config

from fedseg.models import build_model

__all__ = ["task_identity"]  # the fixture

ALLOWED_METRIC = re.compile(
    r"^(num-examples|train-loss|val-dice|train-seconds|eval-seconds|dice|dice-class-\d+|dice-(WT|TC|ET)|personal-dice|site-id"
    r"|val-dice-ET-min-voxels-\d+|val-dice-personal-weight-(\d+|WT|TC|ET)-(0\.0|0\.25|0\.5|0\.75|1\.0)"
    r"|dp-epsilon|dp-delta|dp-noise-multiplier)$"
)


def assert_only_weights_and_aggregates(reply: Message, model_shapes: dict[str, tuple[int, ...]]) -> None:
    content = reply.content
    assert not content.config_records, f"config records leave the site: {list(content.config_records)}"
    assert list(content.metric_records) == ["metrics"]
    for key, value in content.metric_records["metrics"].items():
        assert ALLOWED_METRIC.match(key), f"metric '{key}' is not on the whitelist"
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"metric '{key}' = {value!r}"
    if reply.metadata.message_type == "train":
        assert list(content.array_records) == ["arrays"]
        shapes = {key: tuple(array.shape) for key, array in content.array_records["arrays"].items()}
        assert shapes == model_shapes, "train replies carry exactly the model's weight arrays"
    else:
        assert not content.array_records, "evaluate replies carry no arrays"


def test_replies_hold_only_weights_and_whitelisted_metrics(tmp_path: Path, task_identity: None) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 1})
    grid = InProcessGrid(values, 2)
    run_federation(grid, values, tmp_path / "run")
    model_shapes = {k: tuple(v.shape) for k, v in build_model("unet", 1, 3).state_dict().items()}
    kinds = [reply.metadata.message_type for reply in grid.replies]
    assert sorted(kinds) == ["evaluate"] * 4 + ["train"] * 2
    for reply in grid.replies:
        assert not reply.has_error()
        assert_only_weights_and_aggregates(reply, model_shapes)


def test_ditto_sites_add_only_their_aggregate_personal_weight_candidates(tmp_path: Path, task_identity: None) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 1, "strategy": "ditto"})
    grid = InProcessGrid(values, 2)
    run_federation(grid, values, tmp_path / "run")
    model_shapes = {k: tuple(v.shape) for k, v in build_model("unet", 1, 3).state_dict().items()}
    evaluated = [r for r in grid.replies if r.metadata.message_type == "evaluate" and not r.has_error()]
    for reply in grid.replies:
        assert not reply.has_error()
        assert_only_weights_and_aggregates(reply, model_shapes)
    # after round 1 each site holds a personal model: its evaluate reply carries 5 weights x 2 structures
    candidates = [
        k for k in evaluated[-1].content.metric_records["metrics"] if k.startswith("val-dice-personal-weight-")
    ]
    assert len(candidates) == 10


def test_a_failing_site_names_no_path_or_subject(tmp_path: Path, task_identity: None) -> None:
    secret = tmp_path / "ward-7" / "patient_0042"
    values = tiny_config(tmp_path, **{"num-server-rounds": 1, "min-sites": 1})
    grid = InProcessGrid(values, 1, node_configs=[{"data-dir": str(secret), "site-id": 4}])
    _, history = run_federation(grid, values, tmp_path / "run")
    assert grid.replies and all(reply.has_error() for reply in grid.replies)
    for reply in grid.replies:
        reason = reply.error.reason
        assert "site folder not found" in reason or "not-a-site" in reason, reason
        for leak in (str(tmp_path), "ward-7", "patient_0042"):
            assert leak not in reason, reason
    assert {f["stage"] for f in history.rounds[-1].failures} == {"train", "evaluate"}


def test_a_corrupt_scan_fails_its_site_without_naming_the_subject(tmp_path: Path, task_identity: None) -> None:
    from fedseg.data.synth import write_site

    site = write_site(tmp_path / "sites", 0, num_subjects=4, size=24, seed=0)
    scan = sorted((site / "imagesTr").glob("*.nii.gz"))[0]
    scan.write_bytes(scan.read_bytes()[:200])  # truncated .nii.gz
    values = tiny_config(tmp_path, **{"num-server-rounds": 1, "min-sites": 1})
    grid = InProcessGrid(values, 1, node_configs=[{"data-dir": str(site), "site-id": 0}])
    _, history = run_federation(grid, values, tmp_path / "run")
    reasons = [reply.error.reason for reply in grid.replies]
    assert reasons and all("unreadable" in reason for reason in reasons), reasons
    subject = scan.name.split(".")[0]
    assert all(subject not in reason and str(tmp_path) not in reason for reason in reasons), reasons
    assert history.rounds[-1].failures


ALLOWED_REASON = re.compile(
    r"^(train|evaluate|probe) failed at this site: \w+: (site data invalid: (\d+ x [a-z-]+(, )?)+|"
    r"message withheld \(it may name files or subjects\)|out of memory|the site's [\w ,'()-]+|"
    r"privacy budget reached: [^/\\]+) \(details in the site's log\)$"
)


def test_every_kind_of_reply_is_audited_dp_probe_and_error(tmp_path: Path, task_identity: None) -> None:
    """DP-SGD train replies (dp-* metrics), evaluate replies, a probe (query) reply of a site that rejoins,
    and error replies of a site whose folder and file names hold spaces and a subject id."""
    broken = tmp_path / "ward 7" / "patient 0042 scan"
    for sub in ("images", "labels"):
        (broken / sub).mkdir(parents=True)
        (broken / sub / "patient 0042 t1 scan.nii.gz").write_bytes(b"\x1f\x8b not a scan")
    values = tiny_config(
        tmp_path,
        **{"num-server-rounds": 2, "min-sites": 3, "round-timeout": 5.0, "dp-sgd": True, "dp-noise-multiplier": 1.0},
    )
    nodes = [
        {"partition-id": 0, "num-partitions": 3},
        {"partition-id": 1, "num-partitions": 3},
        {"data-dir": str(broken), "site-id": 2},
    ]
    grid = InProcessGrid(values, 3, node_configs=nodes)

    def before_send(messages: list[Message]) -> None:  # site-1's node leaves as round 1 trains, is back to evaluate
        kind = messages[0].metadata.message_type if messages else ""
        if kind in ("train", "evaluate") and int(messages[0].content["config"]["server-round"]) == 1:
            (grid.killed.add if kind == "train" else grid.killed.discard)(grid.node_of(1))

    grid.before_send = before_send
    run_federation(grid, values, tmp_path / "run")
    model_shapes = {k: tuple(v.shape) for k, v in build_model("unet", 1, 3).state_dict().items()}
    kinds = {(reply.metadata.message_type, reply.has_error()) for reply in grid.replies}
    assert {("train", False), ("evaluate", False), ("query", False), ("train", True), ("evaluate", True)} <= kinds
    for reply in grid.replies:
        if reply.has_error():
            reason = reply.error.reason
            assert ALLOWED_REASON.match(reason), reason
            assert not any(leak in reason for leak in ("ward", "0042", "patient", "scan", "t1", str(tmp_path))), reason
        elif reply.metadata.message_type == "query":
            assert not reply.content.array_records and dict(reply.content["metrics"]) == {"site-id": 1}
        else:
            assert_only_weights_and_aggregates(reply, model_shapes)
            if reply.metadata.message_type == "train":
                assert {"dp-epsilon", "dp-delta", "dp-noise-multiplier"} <= set(reply.content["metrics"])
