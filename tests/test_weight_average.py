"""Stochastic weight averaging on the server (`swa-rounds`): the final model is the mean of the last
rounds' global models, the sites keep training from the ordinary global model."""

from __future__ import annotations

import json
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
    restored = WeightAverage(first_round=2)
    restored.load_state_dict(average.state_dict())
    restored.add(4, _model([3.0, 0.5], 4))
    assert torch.allclose(
        restored.arrays(like=_model([0.0, 0.0], 0)).to_torch_state_dict()["w"], torch.tensor([2.0, 2.5])
    )


def test_final_model_is_the_mean_of_the_last_rounds_global_models(tmp_path: Path, task_identity: None) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 3, "swa-rounds": 2})
    grid = InProcessGrid(values, 2)
    globals_after: dict[int, dict[str, torch.Tensor]] = {}

    def keep_evaluated_model(messages: list) -> None:  # round r's first evaluate messages carry its global model
        if messages and messages[0].metadata.message_type == "evaluate":
            round_ = int(messages[0].content["config"]["server-round"])
            globals_after.setdefault(round_, messages[0].content["arrays"].to_torch_state_dict())  # then: model.pt's

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
    scored = json.loads((tmp_path / "run" / "history.json").read_text())["averaged-model"]
    assert scored["model"] == "mean of the global models of rounds 2-3" and 0.0 <= scored["val-dice"] <= 1.0
    last = json.loads((tmp_path / "run" / "history.json").read_text())["rounds"][-1]
    assert scored["val-dice"] != pytest.approx(sum(s["val-dice"] for s in last["eval"].values()) / 2, abs=1e-9)


def test_swa_rounds_beyond_the_run_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'swa-rounds' must be in \[0, num-server-rounds\], got 4"):
        RunConfig.from_mapping({"num-server-rounds": 3, "swa-rounds": 4})


NOT_A_TENSOR = "weight average's '"


@pytest.mark.parametrize(
    "tampered, fault",
    [
        ({"first_round": "2"}, "weight average is not {first_round"),
        ({"count": -1}, "weight average is not {first_round"),
        ({"count": True}, "weight average is not {first_round"),
        ({"mean": [1.0]}, "weight average is not {first_round"),
        ({"count": 5}, "weight average counts 5 round(s) from round 1 after round 2"),
        ({"mean": {}}, NOT_A_TENSOR),
        ({"mean": {"w": torch.zeros(1)}}, NOT_A_TENSOR),
        ("shape", NOT_A_TENSOR),
        ("float32", NOT_A_TENSOR),
        ("nan", "holds NaN or infinite values"),
        ("tensor", "weight average is a Tensor, not a dict"),
    ],
)
def test_a_tampered_average_in_the_checkpoint_is_a_one_line_error(
    tmp_path: Path, task_identity: None, tampered: dict | str, fault: str
) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 2, "swa-rounds": 2})
    run_federation(InProcessGrid(values, 2), values, tmp_path / "run")
    path = tmp_path / "run" / CHECKPOINT_FILE
    good = torch.load(path, weights_only=True)
    saved = good["weight_average"]
    assert saved["count"] == 2 and saved["first_round"] == 1
    first = next(k for k, v in saved["mean"].items() if v.is_floating_point())
    average: object = (
        {
            "shape": {**saved, "mean": {k: v.reshape(-1)[:1] for k, v in saved["mean"].items()}},
            "float32": {**saved, "mean": {**saved["mean"], first: saved["mean"][first].float()}},
            "nan": {**saved, "mean": {**saved["mean"], first: saved["mean"][first] * float("nan")}},
            "tensor": torch.ones(2),
        }.get(tampered)
        if isinstance(tampered, str)
        else {**saved, **tampered}
    )
    torch.save({**good, "weight_average": average}, path)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: ") + ".*" + re.escape(fault)):
        load_checkpoint(tmp_path / "run")


def test_resuming_with_rounds_that_move_the_average_is_refused(tmp_path: Path, task_identity: None) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 2, "swa-rounds": 2})
    run_federation(InProcessGrid(values, 2), values, tmp_path / "run")
    checkpoint = load_checkpoint(tmp_path / "run")
    longer = RunConfig.from_mapping({**values, "num-server-rounds": 4, "resume-from": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match=r"weight average \(swa-rounds\) began at round 1 after round 2; .* round 3"):
        check_resumable(checkpoint, longer, tmp_path / "run")
    # an average that had not begun cannot start in a round that already ran
    shorter = WeightAverage(first_round=1)
    assert "had not begun after round 1" in (shorter.resume_problem({"first_round": 2, "count": 0}, 1) or "")
    assert WeightAverage(first_round=2).resume_problem({"first_round": 2, "count": 0}, 1) is None
