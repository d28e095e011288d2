"""Speed options of the trainer keep its weights interface: torch.compile wraps only the training forward."""

from __future__ import annotations

import numpy as np
import torch

from fedseg.trainer import SegmentationTrainer


def test_compiled_trainer_keeps_plain_state_dict_keys() -> None:
    torch.manual_seed(0)
    plain = SegmentationTrainer("unet", num_classes=3, patch_size=(16, 16, 16), device="cpu")
    compiled = SegmentationTrainer("unet", num_classes=3, patch_size=(16, 16, 16), device="cpu", compile=True)
    assert list(compiled.get_weights()) == list(plain.get_weights())
    compiled.set_weights(plain.get_weights())  # strict load: the keys carry no "_orig_mod." prefix
    for key, tensor in plain.get_weights().items():
        assert torch.equal(compiled.get_weights()[key], tensor), key
    # The compiled forward shares the plain module's parameters, so training updates both views.
    assert compiled._train_forward is not compiled.model
    assert {id(p) for p in compiled._train_forward.parameters()} == {id(p) for p in compiled.model.parameters()}


def test_received_weights_view_the_record_without_copying() -> None:
    from flwr.app import ArrayRecord

    from clients.weights import state_from_record

    torch.manual_seed(0)
    trainer = SegmentationTrainer("unet", num_classes=3, patch_size=(16, 16, 16), device="cpu")
    sent = trainer.get_weights()
    record = ArrayRecord(sent)
    received = state_from_record(record)
    assert list(received) == list(sent)
    for key, tensor in sent.items():
        assert received[key].dtype == tensor.dtype and torch.equal(received[key], tensor), key
    first = next(iter(record))
    serialized = np.frombuffer(record[first].data, dtype=np.uint8)
    assert np.shares_memory(received[first].numpy(), serialized), "the tensor must view the record's bytes"
    other = SegmentationTrainer("unet", num_classes=3, patch_size=(16, 16, 16), device="cpu")
    other.set_weights(received)  # loading copies the read-only views into the model
    assert all(torch.equal(other.get_weights()[k], sent[k]) for k in sent)
