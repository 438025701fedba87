"""cimc.metadata reads what the passes write, and writes it back byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import cimc
from cimc.data import Dataset
from cimc.metadata import (LAYER, MATRIX, PLACEMENT, SCHEDULE, read_layer, read_matrix, read_placement, read_schedule,
                           write_matrix, write_placement, write_schedule)
from tests.models import export_onnx


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> cimc.artifact.CompiledModel:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1100, 40), torch.nn.ReLU(), torch.nn.Linear(40, 10)).eval()
    path = export_onnx(net, torch.randn(1, 1100), tmp_path_factory.mktemp("meta") / "mlp.onnx")
    x = np.random.default_rng(0).standard_normal((16, 1100)).astype(np.float32)
    return cimc.compile(path, "aon-cim", calibration=Dataset(x, None, "calib"))


def test_readers_see_what_map_and_schedule_wrote(compiled: cimc.artifact.CompiledModel) -> None:
    analog = [n for n in compiled.model.graph if PLACEMENT in n.metadata_props]
    assert len(analog) == 2
    first = analog[0]
    m = read_matrix(first)
    assert m is not None and (m.rows, m.cols, m.groups, m.mvms) == (1100, 40, 1, 1)
    tiles = read_placement(first)
    assert len(tiles) == 2 and sum(t.rows for t in tiles) == 1100  # 1100 rows split over the 1024-row array
    assert {t.src_row0 for t in tiles} == {0, 1024}
    slot = read_schedule(first)
    assert slot is not None and slot.unit == "array" and slot.end_cycle > slot.start_cycle
    assert slot.layer == read_layer(first, "?") and slot.cores == tuple(sorted({t.array for t in tiles}))
    relu = next(n for n in compiled.model.graph if n.op_type == "Relu")
    assert read_matrix(relu) is None and read_placement(relu) == () and read_layer(relu, "relu") == "relu"


def test_writers_reproduce_the_passes_bytes(compiled: cimc.artifact.CompiledModel) -> None:
    for node in compiled.model.graph:
        before = {k: node.metadata_props[k] for k in (LAYER, MATRIX, PLACEMENT, SCHEDULE) if k in node.metadata_props}
        m, tiles, slot = read_matrix(node), read_placement(node), read_schedule(node)
        if m is not None:
            write_matrix(node, m)
        if PLACEMENT in before:
            write_placement(node, tiles)
        if slot is not None:
            write_schedule(node, slot)
        assert {k: node.metadata_props[k] for k in before} == before, node.name


def test_compiled_model_tables_use_the_readers(compiled: cimc.artifact.CompiledModel, tmp_path: Path) -> None:
    table = compiled.summary_table()
    assert "1100x40" in table and "2 tiles on array 0" in table
    events = [e for e in compiled.chrome_trace()["traceEvents"] if e.get("ph") == "X"]
    assert {e["name"] for e in events} >= {n.name for n in compiled.model.graph if PLACEMENT in n.metadata_props}
