"""FedProx end to end at one site: the strategy's train message → the ClientApp → SegmentationTrainer.

mu travels in the message's config and the client applies (mu/2)·‖w − w_global‖², so the site's
model stays closer to the global model than with FedAvg's message (mu = 0)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY_RUN
from flwr.app import Context, RecordDict
from strategy_replies import as_numpy, instructions, task_identity  # noqa: F401 - fixture

from clients.client_app import train
from fedseg.models import build_model
from strategies.fedavg import FedAvg
from strategies.fedprox import FedProx

pytestmark = pytest.mark.usefixtures("task_identity")
RUN_CONFIG = {
    **TINY_RUN,
    "synthetic-subjects": 4,
    "local-epochs": 4,
}  # several Adam steps: the prox gradient is 0 at step 1


def distance_after_local_training(strategy, global_state) -> float:
    message = instructions(strategy, global_state, [1])[1]
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=dict(RUN_CONFIG),
    )
    answer = train(message, context)
    assert not answer.has_error(), answer.error.reason if answer.has_error() else ""
    trained = as_numpy(answer.content["arrays"])
    return math.sqrt(
        sum(
            float(np.sum((trained[k].astype(np.float64) - v) ** 2))
            for k, v in global_state.items()
            if np.issubdtype(v.dtype, np.floating)
        )
    )


def test_fedprox_keeps_site_weights_closer_to_the_global_model() -> None:
    torch.manual_seed(0)
    global_state = {k: v.numpy() for k, v in build_model("unet", 1, 3).state_dict().items()}
    plain = distance_after_local_training(FedAvg(min_sites=1), global_state)
    proximal = distance_after_local_training(FedProx(min_sites=1, proximal_mu=10.0), global_state)
    assert 0 < proximal < 0.9 * plain
