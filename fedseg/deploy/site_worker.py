"""A site's warm worker: one long-lived process that answers the messages of its SuperNode.

Flower 1.41 (and 1.42) starts a fresh `flwr-clientapp` process for every message, so without help
each message would pay for importing torch and MONAI, validating the data and building the model
again. `fedseg site join` therefore starts this worker beside `flower-supernode` and names its
socket in the node config (`worker`); the ClientApp (clients/entry.py) hands each message with its
Context over that socket and returns the worker's reply. The worker keeps the site's runtime
(validated data, opened datasets, model) between messages, and forgets it when any file under
the data folder changed, so an edited scan is validated again (through the validation memo) before
it is used, as with a fresh process.

The socket is a Unix socket, 0600 in a 0700 folder: only the site's own user reaches it. Requests
and replies are Flower's own protobuf messages (Message, Context), never pickles. Each request
carries a fingerprint of the app's Python sources (the run's FAB); a worker running other code
does not answer it, and the ClientApp then answers in its own process. The worker answers one
message at a time and ends when the process that started it (the SuperNode) ends.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.common import serde
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

NODE_CONFIG_KEY = "worker"  # node config: the worker's socket path
PARENT_CHECK_S = 1.0  # how often an idle worker checks that its SuperNode still runs
MAX_SOCKET_PATH = 100  # bytes; Unix socket paths are limited to 107 on Linux, 103 on macOS
CODE_PACKAGES = ("fedseg", "clients", "strategies")  # the app's code; the worker answers only its own
ANSWERED, OTHER_CODE = b"answered", b"other-code"
_FRAME = struct.Struct("!Q")
log = logging.getLogger("fedseg.worker")


class WorkerUnavailable(ConnectionError):
    """No worker answers on the socket (not started yet, or stopped): run the message in this process."""


# ---------------------------------------------------------------------- the ClientApp's side
def forward(path: str, message: Message, context: Context, code: str) -> Message:
    """The worker's reply to `message`; `context.state` takes the worker's state after the message.
    `code` is the app's code fingerprint: a worker running other code does not answer.
    WorkerUnavailable when nothing (fit) listens; ConnectionError when the worker stops while working."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
    except OSError as err:
        raise WorkerUnavailable(f"no site worker at {path}: {err.strerror or err}") from None
    with conn:
        _send(
            conn,
            code.encode(),
            serde.message_to_proto(message).SerializeToString(),
            serde.context_to_proto(context).SerializeToString(),
        )
        status, reply_bytes, state_bytes = _receive(conn, 3)
    if status != ANSWERED:
        raise WorkerUnavailable(
            f"the site worker at {path} runs other fedseg code than this run's app "
            "(restart `fedseg site join` after updating fedseg)"
        )
    reply = serde.message_from_proto(ProtoMessage.FromString(reply_bytes))
    context.state = serde.recorddict_from_proto(ProtoRecordDict.FromString(state_bytes))
    if reply.has_error():
        return Message(reply.error, reply_to=message)
    return Message(content=reply.content, reply_to=message)


def code_fingerprint(root: Path) -> str:
    """Hash of the Python sources of fedseg's packages under `root` (what a FAB of this app carries)."""
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for source in sorted((root / package).rglob("*.py")):
            digest.update(f"{source.relative_to(root)}\0".encode() + source.read_bytes() + b"\0")
    return digest.hexdigest()


# ---------------------------------------------------------------------- the worker's side
def serve(path: Path, parent_pid: int | None = None) -> None:
    """Answer messages on `path` until the parent process `parent_pid` ends (without one: until stopped)."""
    import clients.client_app as client_app_module  # the heavy imports (torch, MONAI), once per site
    from clients.site_runtime import forget_runtimes

    listener = _listen(path)
    listener.settimeout(PARENT_CHECK_S)
    log.info("site worker ready on %s", path)
    seen: dict[str, str] = {}
    own_code = code_fingerprint(Path(client_app_module.__file__).resolve().parents[1])
    try:
        while parent_pid is None or os.getppid() == parent_pid:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    code, message_bytes, context_bytes = _receive(conn, 3)
                except ConnectionError:
                    continue
                if code.decode(errors="replace") != own_code:
                    log.warning("a message of another fedseg version: left to the ClientApp's own process")
                    _send(conn, OTHER_CODE, b"", b"")
                    continue
                message = serde.message_from_proto(ProtoMessage.FromString(message_bytes))
                context = serde.context_from_proto(ProtoContext.FromString(context_bytes))
                context.node_config = {k: v for k, v in context.node_config.items() if k != NODE_CONFIG_KEY}
                if _data_changed(seen, str(context.node_config.get("data-dir", ""))):
                    forget_runtimes()  # the next message validates the changed scans and reopens the data
                reply = _answer(client_app_module.app, message, context)
                try:
                    _send(
                        conn,
                        ANSWERED,
                        serde.message_to_proto(reply).SerializeToString(),
                        serde.recorddict_to_proto(context.state).SerializeToString(),
                    )
                except OSError as err:
                    log.error("the ClientApp left before the reply: %s", err)
        log.info("the SuperNode ended; the site worker stops")
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def _answer(app: Callable[[Message, Context], Message], message: Message, context: Context) -> Message:
    """The ClientApp's reply; an exception escaping it (an unknown message type) becomes an error reply
    naming only its type, as fedseg's handlers do for their own errors."""
    started = time.perf_counter()
    try:
        reply = app(message, context)
    except Exception as err:  # noqa: BLE001 - the worker must outlive any one message
        log.error("%s raised %s: %s", message.metadata.message_type, type(err).__name__, err)
        error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"ClientApp raised {type(err).__name__}")
        return Message(error, reply_to=message)
    log.info("%s answered in %.2f s", message.metadata.message_type, time.perf_counter() - started)
    return reply


def socket_path_for(data_dir: str, root: Path) -> Path:
    """The worker socket of the site whose data is in `data_dir`: `<root>/site-workers/<hash>.sock`."""
    key = hashlib.sha256(data_dir.encode()).hexdigest()[:16]
    path = root / "site-workers" / f"{key}.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise OSError(f"{path}: longer than {MAX_SOCKET_PATH} bytes, too long for a socket; set FEDSEG_CACHE shorter")
    return path


def _listen(path: Path) -> socket.socket:
    """Bind the socket 0600 in a 0700 folder, replacing a stale socket (never another kind of file)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.is_symlink() or (path.exists() and not stat.S_ISSOCK(path.lstat().st_mode)):
        raise OSError(f"{path}: exists and is not a socket; refusing to replace it")
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(8)
    return listener


def _data_changed(seen: dict[str, str], data_dir: str) -> bool:
    """Whether a file under `data_dir` was added, removed or changed (size, mtime) since the last call."""
    digest = hashlib.sha256()
    for root, folders, files in os.walk(data_dir):
        folders.sort()
        for name in sorted(files):
            try:
                info = os.stat(os.path.join(root, name))
            except OSError:
                continue
            digest.update(f"{root}/{name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    fingerprint, before = digest.hexdigest(), seen.get(data_dir)
    seen[data_dir] = fingerprint
    return before is not None and before != fingerprint


def _send(conn: socket.socket, *parts: bytes) -> None:
    conn.sendall(b"".join(_FRAME.pack(len(part)) + part for part in parts))


def _receive(conn: socket.socket, count: int) -> list[bytes]:
    return [_exactly(conn, _FRAME.unpack(_exactly(conn, _FRAME.size))[0]) for _ in range(count)]


def _exactly(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the site worker's connection closed mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedseg.deploy.site_worker", description=__doc__.split("\n")[0])
    parser.add_argument("--socket", required=True, type=Path, help="Unix socket path to listen on")
    parser.add_argument("--parent-pid", type=int, help="end when this process ends (the SuperNode)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s fedseg site worker: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop between messages, removing the socket
    try:
        serve(args.socket, args.parent_pid)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
