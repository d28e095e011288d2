"""The FAB's ClientApp: hands each message to the site's warm worker when the node config names one
(`worker`, set by `fedseg site join`; fedseg/deploy/site_worker.py), else runs clients.client_app here.

This module imports only Flower and the socket protocol, so the fresh process Flower starts for every
message in deployment spends no time on torch or MONAI. Without a worker (simulation, a SuperNode
started by hand, or a worker that has not finished starting) the full ClientApp is imported on the
first message and answers in this process, as before.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedseg import messages as m
from fedseg.deploy.site_worker import (
    NODE_CONFIG_KEY,
    WorkerUnavailable,
    code_fingerprint,
    forward,
)

log = logging.getLogger("fedseg.client")


class SiteClientApp(ClientApp):
    """clients.client_app's ClientApp, answered by the site's warm worker where there is one."""

    def __call__(self, message: Message, context: Context) -> Message:
        path = context.node_config.get(NODE_CONFIG_KEY)
        if path:
            try:
                return forward(str(path), message, context, code_fingerprint(Path(__file__).resolve().parents[1]))
            except WorkerUnavailable as err:
                log.warning("%s; answering in this process", err)
            except ConnectionError as err:
                log.error("the site worker stopped while answering: %s", err)
                stage = message.metadata.message_type.split(".")[0]
                return Message(
                    Error(
                        code=m.SITE_ERROR_CODE,
                        reason=f"{stage} failed at this site: the site worker stopped (details in the site's log)",
                    ),
                    reply_to=message,
                )
        from clients.client_app import app as in_process

        return in_process(message, context)


app = SiteClientApp()
