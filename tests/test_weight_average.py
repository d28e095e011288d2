"""Stochastic weight averaging on the server (`swa-rounds`): the final model is the mean of the last
rounds' global models, the sites keep training from the ordinary global model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord
from inprocess_grid import InProcessGrid, run_federation, task_identity, tiny_config

from fedseg.checkpoint import CHECKPOINT_FILE, check_resumable, load_checkpoint
from fedseg.config import ConfigError, RunConfig
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.weight_average import WeightAverage

__all__ = ["task_identity"]  # the fixture


def _model(weight: list[float], batches: int) -> ArrayRecord:
    return ArrayRecord({"w": torch.tensor(weight, dtype=torch.float32), "n": torch.tensor(batches)})


def test_average_of_the_last_rounds_keeps_dtypes_and_takes_integer_buffers_from_the_last() -> None:
    average = WeightAverage.last_rounds(2, total_rounds=3)
    assert average is not None and WeightAverage.last_rounds(0, total_rounds=3) is None
    for server_round, weight in enumerate(([9.0, 9.0], [1.0, 2.0], [2.0, 5.0]), start=1):
        average.add(server_round, _model(weight, server_round))
    result = average.arrays(like=_model([0.0, 0.0], 0)).to_torch_state_dict()
    assert torch.equal(result["w"], torch.tensor([1.5, 3.5])) and result["w"].dtype == torch.float32
    assert int(result["n"]) == 3  # round 1 (9, 9) is not in it; the counter is round 3's
    restored = WeightAverage(first_round=1)
    restored.load_state_dict(average.state_dict())
    restored.add(4, _model([3.0, 0.5], 4))
    assert torch.allclose(
        restored.arrays(like=_model([0.0, 0.0], 0)).to_torch_state_dict()["w"], torch.tensor([2.0, 2.5])
    )


def test_final_model_is_the_mean_of_the_last_rounds_global_models(tmp_path: Path, task_identity: None) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 3, "swa-rounds": 2})
    grid = InProcessGrid(values, 2)
    globals_after: dict[int, dict[str, torch.Tensor]] = {}

    def keep_evaluated_model(messages: list) -> None:  # round r's evaluate messages carry its global model
        if messages and messages[0].metadata.message_type == "evaluate":
            round_ = int(messages[0].content["config"]["server-round"])
            globals_after[round_] = messages[0].content["arrays"].to_torch_state_dict()

    grid.before_send = keep_evaluated_model
    final, _ = run_federation(grid, values, tmp_path / "run")
    got = final.to_torch_state_dict()
    floats = [key for key, value in got.items() if value.is_floating_point()]
    for key in floats:
        expected = ((globals_after[2][key].double() + globals_after[3][key].double()) / 2).float()
        assert torch.allclose(got[key], expected, rtol=1e-6, atol=1e-7), key
    assert not all(torch.equal(got[key], globals_after[3][key]) for key in floats)  # not the last model
    saved = ModelCheckpoint.load(tmp_path / "run" / "model.pt")
    assert all(torch.equal(saved.state_dict[key], got[key]) for key in got)
    assert "mean of the global models of rounds 2-3" in saved.description


def test_swa_rounds_beyond_the_run_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'swa-rounds' must be in \[0, num-server-rounds\], got 4"):
        RunConfig.from_mapping({"num-server-rounds": 3, "swa-rounds": 4})


@pytest.mark.parametrize(
    "tampered, fault",
    [
        ({"first_round": "2", "count": 2}, "is not {first_round"),
        ({"count": -1}, "is not {first_round"),
        ({"mean": [1.0]}, "is not {first_round"),
        ({"mean": {}}, "does not hold one tensor"),
        ({"mean": {"w": torch.zeros(1)}}, "does not hold one tensor"),
        ({"mean": "shape"}, "does not hold one tensor"),
    ],
)
def test_a_tampered_or_shifted_average_fails_the_resume_with_one_line(
    tmp_path: Path, task_identity: None, tampered: dict, fault: str
) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 2, "swa-rounds": 2})
    run_federation(InProcessGrid(values, 2), values, tmp_path / "run")
    path = tmp_path / "run" / CHECKPOINT_FILE
    good = torch.load(path, weights_only=True)
    assert good["weight_average"]["count"] == 2
    if tampered.get("mean") == "shape":
        tampered = {"mean": {k: v.reshape(-1)[:1] for k, v in good["weight_average"]["mean"].items()}}
    torch.save({**good, "weight_average": {**good["weight_average"], **tampered}}, path)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: weight average {fault}")):
        load_checkpoint(tmp_path / "run")
    torch.save(good, path)
    longer = RunConfig.from_mapping({**values, "num-server-rounds": 4, "resume-from": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match=r"its weight average \(swa-rounds\) began at round 1; .* round 3"):
        check_resumable(load_checkpoint(tmp_path / "run"), longer, tmp_path / "run")
