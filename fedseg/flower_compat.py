"""The Flower internals fedseg relies on, in one place, checked against the installed Flower.

fedseg uses Flower's public app API (flwr.app, flwr.serverapp, flwr.clientapp) and, for its in-process
grid (fedseg.experiments.local_grid), the site worker and some strategies, a few internals that
Flower may change between minor versions: a message's id (set by the SuperLink when it is pushed),
the process-wide TaskIdentity a ServerApp runs under, the empty Run a Grid holds, error codes,
the wire encoding and the metric-record aggregation. Everything else imports them from here, and
`incompatibilities()` says what the installed Flower lacks (tests/test_flower_compat.py fails on it).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version

from flwr.app import Message, Metadata, RecordDict
from flwr.common.constant import ErrorCode, SType
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

# Flower releases fedseg is tested with; pyproject's flwr pin must say the same (tests/test_flower_compat.py).
TESTED_FLOWER = (">=1.41", "<1.43")
# module → names fedseg imports from it (the internals beyond Flower's documented app API)
INTERNALS: dict[str, tuple[str, ...]] = {
    "flwr.common.constant": ("ErrorCode", "SType"),
    "flwr.common.serde": (
        "message_to_proto",
        "message_from_proto",
        "context_to_proto",
        "context_from_proto",
        "recorddict_to_proto",
        "recorddict_from_proto",
    ),
    "flwr.common.secure_aggregation.crypto.shamir": ("combine_shares", "create_shares"),
    "flwr.proto.message_pb2": ("Message", "Context"),
    "flwr.proto.recorddict_pb2": ("RecordDict",),
    "flwr.serverapp.exception": ("AggregationError", "InconsistentMessageReplies"),
    "flwr.serverapp.strategy.strategy_utils": ("aggregate_metricrecords",),
    "flwr.supercore.run": ("Run",),
    "flwr.supercore.task_identity": ("TaskIdentity",),
}
ERROR_CODES = ("NODE_UNAVAILABLE", "MESSAGE_UNAVAILABLE", "REPLY_MESSAGE_UNAVAILABLE")
IDENTITY_FIELDS = ("run_id", "node_id", "task_id")

__all__ = [
    "ErrorCode",
    "Run",
    "SType",
    "TaskIdentity",
    "aggregate_metricrecords",
    "combine_shares",
    "create_shares",
    "empty_run",
    "flower_version",
    "incompatibilities",
    "message_with_metadata",
    "server_identity",
    "set_message_id",
]


class FlowerCompatibilityError(RuntimeError):
    """The installed Flower lacks an internal fedseg needs."""


def flower_version() -> str:
    return version("flwr")


def set_message_id(message: Message, message_id: str) -> None:
    """Give a message the id a SuperLink would (an in-process grid pushes without one)."""
    if "_message_id" not in message.metadata.__dict__:
        raise FlowerCompatibilityError(_fault("Message.metadata keeps no '_message_id'"))
    message.metadata.__dict__["_message_id"] = message_id


def message_with_metadata(content: RecordDict, metadata: Metadata) -> Message:
    """A message carrying a copy of another's metadata (Message's keyword form outside its public overloads)."""
    return Message(content=content, metadata=metadata)  # type: ignore[call-overload]


def empty_run(run_id: int) -> Run:
    """The placeholder Run a Grid holds before the runtime sets the real one."""
    return Run.create_empty(run_id)


@contextmanager
def server_identity(run_id: int, node_id: int) -> Iterator[None]:
    """Give this process the ServerApp identity that new Messages need (as the Flower runtime does),
    restoring the previous one afterwards."""
    fields = [f"_{name}" for name in IDENTITY_FIELDS]
    missing = [name for name in fields if not hasattr(TaskIdentity, name)]
    if missing:
        raise FlowerCompatibilityError(_fault(f"TaskIdentity has no {', '.join(missing)}"))
    saved = [getattr(TaskIdentity, name) for name in fields]
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, node_id
    try:
        yield
    finally:
        for name, value in zip(fields, saved, strict=True):
            setattr(TaskIdentity, name, value)


def incompatibilities() -> list[str]:
    """What the installed Flower lacks of the internals fedseg uses (empty: compatible)."""
    faults = []
    for module_name, names in INTERNALS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            faults.append(f"{module_name}: cannot import ({err})")
            continue
        faults += [f"{module_name}.{name}: missing" for name in names if not hasattr(module, name)]
    faults += [f"ErrorCode.{code}: missing" for code in ERROR_CODES if not hasattr(ErrorCode, code)]
    faults += [f"TaskIdentity._{name}: missing" for name in IDENTITY_FIELDS if not hasattr(TaskIdentity, f"_{name}")]
    if not hasattr(Run, "create_empty"):
        faults.append("Run.create_empty: missing")
    if faults:
        return faults
    with server_identity(run_id=1, node_id=1):
        probe = Message(RecordDict(), dst_node_id=1, message_type="query")
    if "_message_id" not in probe.metadata.__dict__:
        faults.append("Message.metadata: no '_message_id' entry (the id an in-process grid sets)")
    return faults


def _fault(what: str) -> str:
    low, high = TESTED_FLOWER
    return (
        f"Flower {flower_version()} is not compatible with this fedseg ({what}); fedseg is tested with "
        f"flwr{low},{high}: pip install 'flwr[simulation,dp]{low},{high}'"
    )
