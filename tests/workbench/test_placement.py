"""Device maps (workbench.placement): the placement rules, the refusals, and that a placed model
records the same statistics as the unplaced one. On a machine without GPUs every map places on
the CPU; several GPUs are measured through the device tool (docs/scale-out.md)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SEED
from tests.tiny_models import tiny_llama
from workbench import WorkbenchError, load_model, record
from workbench.placement import block_devices, devices_of, place_hugging_face


def _same_recordings(a, b) -> None:
    assert a.layers == b.layers
    for layer in a.layers:
        for (name, x), (_, y) in zip(a.layer(layer).items(), b.layer(layer).items()):
            torch.testing.assert_close(x.cpu(), y.cpu(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "n_layers, n_devices, want",
    [(5, 2, [0, 0, 0, 1, 1]), (4, 4, [0, 1, 2, 3]), (2, 4, [0, 2]), (7, 3, [0, 0, 0, 1, 1, 2, 2])],
)
def test_blocks_spread_evenly_in_order(n_layers, n_devices, want):
    devices = block_devices(n_layers, n_devices, torch.device("cuda", 0))
    assert [d.index for d in devices] == want
    assert block_devices(3, 2, torch.device("cpu")) == [torch.device("cpu")] * 3


def test_placed_zoo_model_records_what_the_unplaced_one_does(zoo):
    ids = torch.randint(3, 250, (2, 48), generator=torch.Generator().manual_seed(SEED))
    plain = zoo
    placed = load_model("zoo-2l", device_map="auto")
    want = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert devices_of(placed)[0] == want
    _same_recordings(
        record(plain, ids, progress=False, backend="reference"),
        record(placed, ids, progress=False, backend="reference"),
    )


@pytest.mark.parametrize("device_map", ["auto", "sequential", {"": "cpu"}])
def test_placed_hugging_face_model_records_what_the_unplaced_one_does(device_map):
    ids = torch.randint(3, 250, (2, 40), generator=torch.Generator().manual_seed(SEED))
    placed = place_hugging_face(tiny_llama(layers=3), device_map)
    first = devices_of(placed)[0]  # the CPU here; a GPU where there are some and the map names none
    assert first == ("cuda:0" if torch.cuda.is_available() and not isinstance(device_map, dict) else "cpu")
    plain = tiny_llama(layers=3).to(first)
    _same_recordings(record(plain, ids, progress=False), record(placed, ids, progress=False))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(device="cpu", device_map="auto"), "not both"),
        (dict(device_map="everywhere"), "unknown device_map"),
        (dict(device_map=0), ">= 1"),
        (dict(device_map=True), "device_map must be"),
        (dict(device_map=64), "GPUs asked for"),
        (dict(max_memory={0: "10GiB"}), "give device_map as well"),
        (dict(device_map={"blocks.0": "cpu"}), "not a dict"),
    ],
)
def test_bad_device_maps_are_refused(kwargs, message):
    with pytest.raises(WorkbenchError, match=message):
        load_model("zoo-2l", **kwargs)


def test_score_command_takes_a_device_map(tmp_path):
    from typer.testing import CliRunner

    from workbench.cli import app
    from workbench.runs import Run

    args = ["score", "--task", "repeats", "--lengths", "128", "--samples", "1", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, [*args, "--device-map", "auto"])
    assert result.exit_code == 0, result.output
    want = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert Run.open(tmp_path / "run").manifest["device"].startswith(want)
    result = CliRunner().invoke(app, [*args, "--device-map", "auto", "--device", "cpu", "--force"])
    assert result.exit_code == 2 and "not both" in result.output
