from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from audiostream.models import files, prepare


def _session(path: Path, level: str = "ORT_ENABLE_ALL") -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _dims(value_info: onnx.ValueInfoProto) -> list[object]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_manifest_covers_every_file(model_dir: Path) -> None:
    manifest = json.loads((model_dir / files.MANIFEST_NAME).read_text())
    assert manifest["sources"] == prepare.expected_sources()
    names = set(manifest["files"])
    for rate in prepare.NSNET2_RATES:
        for variant in prepare.VARIANTS:
            name = prepare.nsnet2_name(rate, variant)
            assert name in names
            assert f"optimized/{name.removesuffix('.onnx')}.cpu.onnx" in names
    assert prepare.SILERO_NAME in names
    for name, entry in manifest["files"].items():
        assert files.sha256_file(model_dir / name) == entry["sha256"], name
    assert prepare.is_prepared(model_dir)


@pytest.mark.parametrize(("rate", "bins", "hidden"), [(16000, 161, 400), (48000, 513, 600)])
def test_streaming_graph_exposes_state_and_is_bit_identical(
    model_dir: Path, rate: int, bins: int, hidden: int
) -> None:
    path = model_dir / prepare.nsnet2_name(rate, "fp32")
    graph = onnx.load(str(path)).graph
    assert [(i.name, _dims(i)) for i in graph.input] == [
        ("input", ["batch", "frames", bins]),
        ("h0", [2, "batch", hidden]),
    ]
    assert [(o.name, _dims(o)) for o in graph.output] == [
        ("output", ["batch", "frames", bins]),
        ("hn", [2, "batch", hidden]),
    ]
    original = _session(files.source_path(f"nsnet2-{rate // 1000}k"))
    streaming = _session(path)
    feat = np.random.default_rng(1).normal(-4, 2, (3, 40, bins)).astype(np.float32)
    ref = original.run(None, {"input": feat})[0]
    whole, _ = streaming.run(None, {"input": feat, "h0": np.zeros((2, 3, hidden), np.float32)})
    assert np.array_equal(whole, ref)
    h = np.zeros((2, 3, hidden), np.float32)
    steps = []
    for t in range(feat.shape[1]):
        g, h = streaming.run(None, {"input": feat[:, t : t + 1], "h0": h})
        steps.append(g)
    assert np.array_equal(np.concatenate(steps, axis=1), ref)


def test_gru_cell_rewrite_matches_the_gru_op(model_dir: Path, tmp_path: Path) -> None:
    src = model_dir / prepare.nsnet2_name(16000, "fp32")
    cells = prepare.gru_cells(onnx.load(str(src)))
    onnx.save(cells, str(tmp_path / "cells.onnx"))
    gru, cell = _session(src), _session(tmp_path / "cells.onnx")
    feat = np.random.default_rng(2).normal(-4, 2, (4, 30, 161)).astype(np.float32)
    h1 = h2 = np.zeros((2, 4, 400), np.float32)
    for t in range(30):
        x = feat[:, t : t + 1]
        g1, h1 = gru.run(None, {"input": x, "h0": h1})
        g2, h2 = cell.run(None, {"input": x, "h0": h2})
        assert np.abs(g1 - g2).max() < 1e-5 and np.abs(h1 - h2).max() < 1e-4


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_reduced_precision_variants_stay_close(model_dir: Path, variant: str) -> None:
    entry = files.read_manifest(model_dir)["files"][prepare.nsnet2_name(16000, variant)]
    ref = _session(model_dir / prepare.nsnet2_name(16000, "fp32"))
    low = _session(model_dir / prepare.nsnet2_name(16000, variant), entry["graph_optimization"])
    feat = np.random.default_rng(3).normal(-4, 2, (2, 50, 161)).astype(np.float32)
    h_ref = h_low = np.zeros((2, 2, 400), np.float32)
    diffs = []
    for t in range(50):
        x = feat[:, t : t + 1]
        g_ref, h_ref = ref.run(None, {"input": x, "h0": h_ref})
        g_low, h_low = low.run(None, {"input": x, "h0": h_low})
        diffs.append(np.abs(g_ref - g_low).mean())
    assert max(diffs) < (0.02 if variant == "int8" else 0.002)
    graph = onnx.load(str(model_dir / prepare.nsnet2_name(16000, variant))).graph
    types = {i.name: i.type.tensor_type.elem_type for i in list(graph.input) + list(graph.output)}
    assert set(types.values()) == {onnx.TensorProto.FLOAT}  # state format is variant-independent
    if variant == "int8":
        assert _dims(graph.input[0]) == ["batch", 1, 161]
        ops = [n.op_type for n in graph.node]
        assert ops.count("MatMulIntegerToFloat") == 8 and "MatMul" not in ops
        assert "DynamicQuantizeLinear" not in ops  # one scale per batch: sessions would mix


@pytest.mark.parametrize(("rate", "bins", "hidden"), [(16000, 161, 400), (48000, 513, 600)])
def test_int8_rows_are_independent_at_every_batch_size(
    model_dir: Path, rate: int, bins: int, hidden: int
) -> None:
    """Row i of a batch equals that row run alone, bit for bit, whatever else is in the batch.

    Batch sizes cover ORT/MLAS's different code paths (GEMV at 1, tails of
    vector loops); rows include an all-zero state and wildly different scales.
    """
    path = model_dir / prepare.nsnet2_name(rate, "int8")
    session = _session(path)
    rng = np.random.default_rng(4)
    feat = rng.normal(-4, 3, (130, 1, bins)).astype(np.float32)
    feat[5] *= 20.0
    h = rng.uniform(-1, 1, (2, 130, hidden)).astype(np.float32)
    h[:, 1] = 0.0
    h[:, 7] *= 1e-3
    alone = [session.run(None, {"input": feat[i : i + 1], "h0": h[:, i : i + 1]}) for i in range(9)]
    for batch in (2, 3, 7, 9, 16, 17, 64, 130):
        order = rng.permutation(batch)
        gain, hn = session.run(None, {"input": feat[order], "h0": h[:, order]})
        for pos, i in enumerate(order):
            if i < len(alone):
                assert np.array_equal(gain[pos], alone[i][0][0]), (batch, i)
                assert np.array_equal(hn[:, pos], alone[i][1][:, 0]), (batch, i)


@pytest.mark.parametrize("rate", [16000, 48000])
def test_int8_graph_survives_ort_optimisation(model_dir: Path, rate: int) -> None:
    """ORT's optimiser must not change the int8 results (it mis-fused an earlier form)."""
    name = prepare.nsnet2_name(rate, "int8")
    level = files.read_manifest(model_dir)["files"][name]["graph_optimization"]
    hidden, bins = (400, 161) if rate == 16000 else (600, 513)
    feat = np.random.default_rng(5).normal(-4, 2, (5, 1, bins)).astype(np.float32)
    h = np.random.default_rng(6).uniform(-1, 1, (2, 5, hidden)).astype(np.float32)
    feeds = {"input": feat, "h0": h}
    plain = _session(model_dir / name, "ORT_DISABLE_ALL").run(None, feeds)
    optimised = _session(model_dir / name, level).run(None, feeds)
    for a, b in zip(plain, optimised, strict=True):
        assert np.abs(a - b).max() <= 1e-6


def test_prepare_is_idempotent_reproducible_and_repairs(model_dir: Path, tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in model_dir.rglob("*") if p.is_file()}
    started = time.perf_counter()
    assert prepare.prepare(model_dir) is False
    assert time.perf_counter() - started < 2.0
    assert {p: p.stat().st_mtime_ns for p in model_dir.rglob("*") if p.is_file()} == before

    fresh = tmp_path / "fresh"
    assert prepare.prepare(fresh, optimized=False) is True
    ours = files.read_manifest(fresh)["files"]
    theirs = files.read_manifest(model_dir)["files"]
    for name, entry in ours.items():
        assert entry["sha256"] == theirs[name]["sha256"], f"{name} is not reproducible"

    victim = fresh / prepare.nsnet2_name(48000, "int8")
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0x01
    victim.write_bytes(bytes(data))
    assert not prepare.is_prepared(fresh)
    assert prepare.prepare(fresh, optimized=False) is True
    assert prepare.is_prepared(fresh)
    assert oct(victim.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cli_entry_points(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    args = parser.parse_args(["--model-dir", str(model_dir)])
    assert prepare.run(args) == 0
    assert "already prepared" in capsys.readouterr().out


def test_optimized_graphs_are_saved_for_inspection(model_dir: Path) -> None:
    for rate in prepare.NSNET2_RATES:
        for variant in prepare.VARIANTS:
            opt = model_dir / "optimized" / f"nsnet2-{rate // 1000}k-{variant}.cpu.onnx"
            assert onnx.load(str(opt), load_external_data=False).graph.node
