"""Packing: reference models fit one AON-CIM array, no overlap, exact coverage; splits; fit errors."""

from __future__ import annotations

import numpy as np
import pytest
from cimc.passes.packing import ArrayGeometry, Block, check_packing, pack_blocks, split_block
from cimc.targets import load_target

from cimc.errors import FitError

KWS = [Block("conv1", 40, 56)] + [Block(f"conv{i}", 504, 56) for i in range(2, 7)]
KWS += [Block("conv7", 504, 72), Block("fc", 72, 12)]
VWW = [Block("conv1", 9, 24), Block("conv2", 216, 48), Block("conv3", 432, 56)]
VWW += [Block(f"conv{i}", 504, 56) for i in range(4, 9)] + [Block("conv9", 504, 88), Block("fc", 88, 2)]
AON = ArrayGeometry(1024, 256, 1)


def test_geometry_from_target():
    assert ArrayGeometry.from_target(load_target("aon-cim")) == AON
    assert ArrayGeometry.from_target(load_target("hermes")) == ArrayGeometry(256, 256, 64)


@pytest.mark.parametrize(("blocks", "utilisation"), [(KWS, 180512 / 262144), (VWW, 220424 / 262144)])
def test_reference_models_fit_one_aon_cim_array(blocks, utilisation):
    packing = pack_blocks(blocks, AON)
    check_packing(packing, blocks)
    assert packing.arrays_used == 1
    assert packing.utilisation == pytest.approx(utilisation)
    assert packing.array_utilisation == [pytest.approx(utilisation)]


def test_check_packing_detects_overlap():
    packing = pack_blocks(KWS, AON)
    first = packing.placements[0]
    other = next(p for p in packing.placements if p.block != first.block)
    moved = type(first)(**{**first.to_dict(), "row0": other.row0, "col0": other.col0})
    packing.placements[0] = moved
    with pytest.raises(AssertionError):
        check_packing(packing, KWS)


def test_hermes_splits_large_block_into_tiles_over_cores():
    block = Block("fc", 2048, 1000)
    packing = pack_blocks([block], ArrayGeometry.from_target(load_target("hermes")))
    check_packing(packing, [block])
    assert len(packing.placements) == 32
    assert {p.src_row0 for p in packing.placements} == set(range(0, 2048, 256))
    assert sorted({p.cols for p in packing.placements}) == [232, 256]
    assert len({p.array_index for p in packing.placements}) == 32


def test_split_block_is_row_major_and_exact():
    tiles = split_block(Block("w", 1500, 300), AON)
    assert [(t.rows, t.cols, t.src_row0, t.src_col0) for t in tiles] == [
        (1024, 256, 0, 0),
        (1024, 44, 0, 256),
        (476, 256, 1024, 0),
        (476, 44, 1024, 256),
    ]


def test_column_pieces_make_a_tight_set_fit():
    # 200 columns of 'b' fit only after cutting it into two 512x100 pieces stacked beside 'a'.
    blocks = [Block("a", 1024, 100), Block("b", 512, 200), Block("c", 512, 56)]
    packing = pack_blocks(blocks, AON)
    check_packing(packing, blocks)
    assert len(packing.for_block("b")) >= 2


def test_small_tiles_share_cores():
    blocks = [Block(f"l{i}", 100, 100) for i in range(8)]
    packing = pack_blocks(blocks, ArrayGeometry(256, 256, 64))
    check_packing(packing, blocks)
    assert packing.arrays_used == 2  # four 100x100 tiles per 256x256 core


def test_too_many_weights_raises_fit_error_with_numbers():
    with pytest.raises(FitError) as info:
        pack_blocks(KWS + [Block("big", 2048, 1000)], AON)
    message = str(info.value)
    assert "2,228,512 weights" in message and "262,144" in message
    assert "'big' is 2048×1000" in message and "at least 9 array(s)" in message


def test_fragmentation_raises_fit_error():
    # 240,000 weights < 262,144, but two 600-row blocks can neither stack (1200 rows) nor sit side by side.
    blocks = [Block("a", 600, 200), Block("b", 600, 200)]
    with pytest.raises(FitError, match=r"cannot be packed without overlap"):
        pack_blocks(blocks, AON)


def test_hundreds_of_tiles_pack_exactly():
    rng = np.random.default_rng(0)
    blocks = [Block(f"b{i}", int(r), int(c)) for i, (r, c) in enumerate(rng.integers(8, 400, size=(300, 2)))]
    packing = pack_blocks(blocks, ArrayGeometry(256, 256, None))
    check_packing(packing, blocks)
    assert len(packing.placements) > 300
    assert packing.utilisation > 0.7


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match="duplicate block names"):
        pack_blocks([Block("x", 1, 1), Block("x", 2, 2)], AON)


def test_pipelined_core_sharing_packs_without_overlap_and_counts_shared_weights_once(tmp_path):
    """Map pass on a tiny multi-core target: 6 small layers + a weight used by 5 Gemm nodes, 3 cores.
    One layer per core would need 7; merged placements must still be a valid packing of every block once."""
    import onnx
    import torch

    from cimc.frontend import load_model
    from cimc.ir import is_analog
    from cimc.passes.mapping import MapPass, shared_layers
    from cimc.pipeline import CompileContext
    from tests.models import export_onnx, shared_weight_model

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)]).eval()
    target = load_target("hermes").with_overrides(**{"array.rows": 32, "array.cols": 64, "array.count": 3})
    for path in (export_onnx(mlp, torch.randn(1, 16), tmp_path / "mlp.onnx"), tmp_path / "chain.onnx"):
        if path.name == "chain.onnx":
            onnx.save(shared_weight_model("gemm-chain"), path)
        model = load_model(path)
        ctx = CompileContext(target=target)
        MapPass(ctx=ctx)(model)
        layers = shared_layers([n for n in model.graph if is_analog(n)])
        blocks = [b for layer in layers for b in layer.blocks()]
        packing = ctx.results["packing"]
        check_packing(packing, blocks)
        assert packing.arrays_used <= 3 and packing.weights_placed == sum(b.weights for b in blocks)
    assert len(layers) == 1 and len(layers[0].users) == 5 and packing.weights_placed == 256
