"""The site's warm worker: the ClientApp entry hands messages over its socket and gets the same replies
a fresh process would give; other code, a missing worker or edited data are handled."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.entry import app as entry_app
from fedseg import messages as m
from fedseg.data.synth import write_site
from fedseg.deploy.launch import node_config, supernode_command
from fedseg.deploy.site_worker import WorkerUnavailable, code_fingerprint, forward

RUN_CONFIG = {"patch-size": "16,16,16", "num-classes": 3, "in-channels": 1, "data-dir": "per-site", "seed": 3}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instructions need the run/node/task identity that the ServerApp runtime sets."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_site(tmp_path_factory.mktemp("data"), 1, 4, 24, 3)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A worker process on a fresh socket, with its own cache folder."""
    root = tmp_path_factory.mktemp("worker")
    socket = root / "w.sock"
    env = {**os.environ, "FEDSEG_CACHE": str(root / "cache"), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedseg.deploy.site_worker", "--socket", str(socket)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not socket.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.2)
    yield socket
    proc.terminate()
    proc.wait(timeout=20)


def probe_message() -> Message:
    return Message(RecordDict({m.CONFIG: ConfigRecord({m.IN_CHANNELS: 1})}), dst_node_id=7, message_type="query")


def context_for(site: Path, worker: Path | None) -> Context:
    node = {"data-dir": str(site), "site-id": 1, **({"worker": str(worker)} if worker else {})}
    state = RecordDict({"kept": MetricRecord({"x": 1.0})})
    return Context(run_id=11, node_id=7, node_config=node, state=state, run_config=dict(RUN_CONFIG))


def test_the_worker_answers_for_the_clientapp_and_keeps_its_context_state(site: Path, worker: Path) -> None:
    message, context = probe_message(), context_for(site, worker)
    reply = entry_app(message, context)
    assert not reply.has_error(), reply.error
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert reply.content[m.METRICS][m.SITE_ID] == 1
    assert context.state["kept"]["x"] == 1.0


def test_the_worker_refuses_messages_of_other_code(site: Path, worker: Path) -> None:
    with pytest.raises(WorkerUnavailable, match="runs other fedseg code"):
        forward(str(worker), probe_message(), context_for(site, worker), code="0" * 64)
    assert code_fingerprint(REPO) != "0" * 64


def test_without_a_worker_the_clientapp_answers_in_its_own_process(site: Path, tmp_path: Path) -> None:
    reply = entry_app(probe_message(), context_for(site, tmp_path / "nobody.sock"))
    assert not reply.has_error() and reply.content[m.METRICS][m.SITE_ID] == 1


def test_an_edited_scan_is_validated_again_before_the_next_message(site: Path, worker: Path, tmp_path: Path) -> None:
    edited = write_site(tmp_path, 1, 4, 24, 3)
    context = context_for(edited, worker)
    assert not entry_app(probe_message(), context).has_error()
    label = min((edited / "labelsTr").iterdir())
    label.write_bytes(b"not a NIfTI file")
    reply = entry_app(probe_message(), context)
    assert reply.has_error() and reply.error.code == m.SITE_ERROR_CODE


def test_site_join_names_the_worker_socket_in_the_node_config(tmp_path: Path) -> None:
    command = supernode_command("s:1", tmp_path, 2, None, None, worker=tmp_path / "w.sock")
    assert command[command.index("--node-config") + 1] == node_config(tmp_path, 2) + f' worker="{tmp_path / "w.sock"}"'
