"""Model weights survive the Flower message round trip bit-exactly."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from fedseg.models import build_model


def transport(record: RecordDict) -> RecordDict:
    """Deflate a record to the bytes Flower sends and inflate it again, as the receiver does."""
    objects = get_all_nested_objects(record)
    contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
    return inflate_object_from_contents(record.object_id, contents)


def test_model_state_survives_transport_bit_exactly() -> None:
    torch.manual_seed(0)
    state = build_model("unet", 1, 3).state_dict()
    state["extra.float64"] = torch.randn(5, dtype=torch.float64)
    received = transport(RecordDict({"arrays": ArrayRecord(state)}))["arrays"].to_torch_state_dict()
    assert list(received) == list(state)
    for key, tensor in state.items():
        assert received[key].dtype == tensor.dtype, key
        assert torch.equal(received[key], tensor), key


def test_integer_buffers_stay_integer() -> None:
    state = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4)).state_dict()
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters
    received = transport(RecordDict({"arrays": ArrayRecord(state)}))["arrays"].to_torch_state_dict()
    assert all(received[k].dtype == torch.int64 for k in counters)


def test_metrics_survive_transport() -> None:
    metrics = MetricRecord({"num-examples": 7, "dice": 0.8125, "dice-class-1": np.float64(0.75).item()})
    received = transport(RecordDict({"metrics": metrics}))["metrics"]
    assert dict(received) == {"num-examples": 7, "dice": 0.8125, "dice-class-1": 0.75}
    assert isinstance(received["num-examples"], int)
