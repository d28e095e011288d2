"""Speed options of the trainer keep its weights interface: torch.compile wraps only the training forward."""

from __future__ import annotations

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
