"""``audiostream models prepare``: derive the serving models from the pinned upstream files.

Everything here is a pure function of the pinned source files and the installed
``onnx``/``onnxruntime`` versions, so a model directory can be rebuilt anywhere
(no download). What is derived, and why:

* ``nsnet2-{16k,48k}-fp32.onnx``: the upstream NSNet2 with the GRU state made
  explicit. Upstream builds a zero ``[2, B, H]`` state inside the graph
  (Shape -> ... -> ConstantOfShape, sliced into the two GRUs), so it can only
  run whole files. We delete that chain, feed both Slices from a new input
  ``h0 [2, batch, H]`` and expose the GRUs' final states as ``hn [2, batch, H]``
  (H = 400 at 16 kHz, 600 at 48 kHz). Streaming with it is bit-identical to
  running a whole file.
* ``nsnet2-*-int8.onnx``: dynamic int8 quantisation (no calibration set),
  built here rather than with ``onnxruntime.quantization.quantize_dynamic``:
  that quantises activations with one scale per *tensor*, i.e. per batch, so a
  session's output would change with its batch neighbours. Here every
  activation *row* (one session's frame) gets its own scale; weights are int8
  per output column; integer accumulation is exact, so a row's output depends
  on that row only and sessions stay isolated (see ``int8_graph``). The GRUs
  hold ~70 % of the weights and a GRU op cannot be quantised, so first each
  GRU is rewritten as one explicit GRU cell (MatMul/Sigmoid/Tanh) for a single
  10 ms step. This graph takes exactly one frame per call (``[batch, 1, F]``).
* ``nsnet2-*-fp16.onnx``: float16 weights/compute for GPUs, converted with the
  ``float16`` tool that ships inside onnxruntime (no extra dependency). Inputs
  and outputs stay float32 so the session state format is the same, and the
  GRUs stay float32: a recurrent state re-rounded to fp16 every 10 ms drifts
  over long sessions, and ORT 1.32 crashes loading an fp16 GRU on CPU.
* ``silero_vad.onnx``: copied and verified, so serving needs only the model dir.
* ``optimized/*.cpu.onnx``: what ORT's optimiser makes of each graph on CPU,
  for inspection (e.g. in Netron); never loaded for serving.
* ``manifest.json``: hashes of everything above; loaders verify against it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from audiostream.errors import AudioStreamError, ErrorCode, ModelError
from audiostream.models import files

log = logging.getLogger(__name__)

#: Bump when the derivation changes: an older model dir is then rebuilt.
RECIPE_VERSION = 3

NSNET2_RATES = (16000, 48000)
VARIANTS = ("fp32", "int8", "fp16")


def nsnet2_name(rate: int, variant: str) -> str:
    return f"nsnet2-{rate // 1000}k-{variant}.onnx"


SILERO_NAME = "silero_vad.onnx"


# --- graph surgery ------------------------------------------------------------------


def _copy_node(node: Any) -> Any:
    import onnx

    return onnx.NodeProto.FromString(node.SerializeToString())


def _opset(model: Any) -> int:
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def streaming_graph(model: Any) -> Any:
    """Expose NSNet2's GRU state as ``h0``/``hn`` (see the module docstring)."""
    import onnx
    from onnx import TensorProto, helper

    g = model.graph
    nodes = list(g.node)
    zeros = [k for k, n in enumerate(nodes) if n.op_type == "ConstantOfShape"]
    grus = [n for n in nodes if n.op_type == "GRU"]
    if len(zeros) != 1 or len(grus) != 2:
        raise ModelError("NSNet2 graph does not have the expected GRU state chain")
    zero_name = nodes[zeros[0]].output[0]
    consumers: dict[str, list[int]] = {}
    for k, n in enumerate(nodes):
        for name in n.input:
            consumers.setdefault(name, []).append(k)
    # Remove the zero-state chain: every node all of whose outputs feed only removed nodes.
    dead = {zeros[0]}
    changed = True
    while changed:
        changed = False
        for k, n in enumerate(nodes):
            if k in dead or not n.output:
                continue
            if all(consumers.get(o) and all(c in dead for c in consumers[o]) for o in n.output):
                dead.add(k)
                changed = True
    kept = [_copy_node(n) for k, n in enumerate(nodes) if k not in dead]
    hidden = int(
        next(helper.get_attribute_value(a) for a in grus[0].attribute if a.name == "hidden_size")
    )
    final_states = []
    for n in kept:
        for i, name in enumerate(n.input):
            if name == zero_name:
                n.input[i] = "h0"
        if n.op_type == "GRU":
            if len(n.output) < 2 or not n.output[1]:
                raise ModelError("NSNet2 GRU has no Y_h output")
            final_states.append(n.output[1])
    kept.append(helper.make_node("Concat", final_states, ["hn"], axis=0, name="hn_concat"))
    bins = g.input[0].type.tensor_type.shape.dim[2].dim_value
    used = {name for n in kept for name in n.input}
    initializers = [t for t in g.initializer if t.name in used]
    del g.node[:]
    g.node.extend(kept)
    del g.initializer[:]
    g.initializer.extend(initializers)
    del g.input[:]
    del g.output[:]
    del g.value_info[:]
    g.input.extend(
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "frames", bins]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [2, "batch", hidden]),
        ]
    )
    g.output.extend(
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "frames", bins]),
            helper.make_tensor_value_info("hn", TensorProto.FLOAT, [2, "batch", hidden]),
        ]
    )
    onnx.checker.check_model(model, full_check=True)
    return model


class _CellBuilder:
    """Nodes and initialisers for one rewritten subgraph, names under ``prefix``."""

    def __init__(self, prefix: str, hidden: int, opset: int) -> None:
        self.p = prefix
        self.hidden = hidden
        self.opset = opset
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def const(self, name: str, arr: np.ndarray[Any, Any]) -> str:
        from onnx import numpy_helper as nh

        self.initializers.append(nh.from_array(np.ascontiguousarray(arr), self.p + name))
        return self.p + name

    def node(
        self, op: str, ins: list[str], out: str, *, output: str | None = None, **attrs: Any
    ) -> str:
        """Add one node; its output is ``prefix + out`` unless ``output`` names it."""
        from onnx import helper

        name = output or self.p + out
        domain = attrs.pop("domain", "")
        self.nodes.append(
            helper.make_node(op, ins, [name], name=self.p + out, domain=domain, **attrs)
        )
        return name

    def reduce(self, op: str, src: str, out: str) -> str:
        """``op`` (ReduceMax/ReduceMin) over the last axis, keeping it (axes moved in opset 18)."""
        if self.opset >= 18:
            axes = self.const(f"{out}_axes", np.array([-1], np.int64))
            return self.node(op, [src, axes], out, keepdims=1)
        return self.node(op, [src], out, axes=[-1], keepdims=1)

    def split(self, src: str, outs: list[str]) -> list[str]:
        from onnx import helper

        names = [self.p + o for o in outs]
        thirds = [self.hidden] * 3
        if self.opset >= 13:
            sizes = self.const(f"{outs[0]}_split", np.array(thirds, dtype=np.int64))
            self.nodes.append(helper.make_node("Split", [src, sizes], names, axis=1))
        else:
            self.nodes.append(helper.make_node("Split", [src], names, axis=1, split=thirds))
        return names


def _gru_cell(gru: Any, inits: dict[str, Any], opset: int) -> tuple[list[Any], list[Any]]:
    from onnx import helper
    from onnx import numpy_helper as nh

    attrs = {a.name: helper.get_attribute_value(a) for a in gru.attribute}
    direction = attrs.get("direction", b"forward")
    if attrs.get("linear_before_reset") != 1 or direction not in (b"forward", "forward"):
        raise ModelError("unexpected GRU configuration in NSNet2")
    x, w_name, r_name, b_name = gru.input[:4]
    hid = int(attrs["hidden_size"])
    w = nh.to_array(inits[w_name])[0]
    r = nh.to_array(inits[r_name])[0]
    b = nh.to_array(inits[b_name])[0]
    c = _CellBuilder(f"{gru.name or gru.output[0]}_cell/", hid, opset)
    xs = c.node("Reshape", [x, c.const("shape_x", np.array([-1, w.shape[1]], np.int64))], "x")
    h = c.node("Reshape", [gru.input[5], c.const("shape_h", np.array([-1, hid], np.int64))], "h")
    xw = c.node("MatMul", [xs, c.const("WT", w.T.astype(np.float32))], "xw0")
    xw = c.node("Add", [xw, c.const("wb", b[: 3 * hid].astype(np.float32))], "xw")
    hr = c.node("MatMul", [h, c.const("RT", r.T.astype(np.float32))], "hr0")
    hr = c.node("Add", [hr, c.const("rb", b[3 * hid :].astype(np.float32))], "hr")
    xz, xr, xn = c.split(xw, ["xz", "xr", "xn"])
    hz, hr_r, hn = c.split(hr, ["hz", "hr_r", "hn"])
    z = c.node("Sigmoid", [c.node("Add", [xz, hz], "z0")], "z")
    rr = c.node("Sigmoid", [c.node("Add", [xr, hr_r], "r0")], "r")
    n = c.node("Tanh", [c.node("Add", [xn, c.node("Mul", [rr, hn], "rhn")], "n0")], "n")
    zd = c.node("Mul", [z, c.node("Sub", [h, n], "d")], "zd")
    h_new = c.node("Add", [n, zd], "h_new")
    shape_yh = c.const("shape_yh", np.array([1, -1, hid], np.int64))
    shape_y = c.const("shape_y", np.array([1, 1, -1, hid], np.int64))
    c.nodes.append(helper.make_node("Reshape", [h_new, shape_yh], [gru.output[1]], name=c.p + "yh"))
    c.nodes.append(helper.make_node("Reshape", [h_new, shape_y], [gru.output[0]], name=c.p + "y"))
    return c.nodes, c.initializers


def _replace_nodes(graph: Any, nodes: list[Any], initializers: list[Any]) -> None:
    """Swap in rewritten ``nodes`` plus their new ``initializers``; drop unused tensors."""
    graph.initializer.extend(initializers)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for nd in graph.node for name in nd.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def gru_cells(model: Any) -> Any:
    """Replace each single-direction GRU by one explicit cell step (input ``[batch, 1, F]``).

    Implements ONNX GRU with ``linear_before_reset=1`` and default activations:
    z = sigmoid(x Wz' + h Rz' + b), r = sigmoid(x Wr' + h Rr' + b),
    n = tanh(x Wn' + bw + r * (h Rn' + br)), h_new = n + z * (h - n).
    Plain MatMuls are what dynamic quantisation can handle.
    """
    import onnx
    from onnx import TensorProto, helper

    g = model.graph
    opset = _opset(model)
    inits = {t.name: t for t in g.initializer}
    out_nodes: list[Any] = []
    extra: list[Any] = []
    for n in g.node:
        if n.op_type == "GRU":
            nodes, tensors = _gru_cell(n, inits, opset)
            out_nodes += nodes
            extra += tensors
        else:
            out_nodes.append(_copy_node(n))
    _replace_nodes(g, out_nodes, extra)
    bins = g.input[0].type.tensor_type.shape.dim[2].dim_value
    g.input[0].CopyFrom(
        helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, bins])
    )
    g.output[0].CopyFrom(
        helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1, bins])
    )
    onnx.checker.check_model(model, full_check=True)
    return model


# --- int8: per-row dynamic quantisation ---------------------------------------------

#: Guards the scale of an all-zero row (the first GRU state, silence after a ReLU).
_TINY_RANGE = 1e-30
#: Ops that only move values: a ReLU's output is still non-negative after them.
_LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")
_MS_DOMAIN = "com.microsoft"


#: Largest uint8 code an activation gets: 7 bits, not 8. x86 CPUs without VNNI (AVX2,
#: plain AVX-512) multiply uint8 activations by int8 weights in pairs summed into int16
#: (``vpmaddubsw``), which saturates once 2 x code x |w| passes 32,767: with codes up to
#: 255 the int8 model lost 9-16 dB against fp32 on an AVX2-only EPYC (42.6 dB at 16 kHz,
#: 35.5 at 48 kHz) while it had 57.2 / 51.2 dB on a VNNI CPU. Codes up to 127 cannot
#: saturate (2 x 127 x 127 = 32,258): 54.4 / 50.3 dB on that EPYC, one model file for
#: every CPU. (7-bit weights, ORT's ``reduce_range``, also avoid it but cost more here:
#: 50.5 / 42.7 dB.)
ACTIVATION_CODES = 127


def _int8_weights(w: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Symmetric int8 per output column: ``w ~= q * scale[None, :]``."""
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def _after_relu(name: str, producers: dict[str, Any]) -> bool:
    node = producers.get(name)
    while node is not None and node.op_type in _LAYOUT_OPS:
        node = producers.get(node.input[0])
    return node is not None and node.op_type == "Relu"


def _row_quantized_matmul(
    x: str, w: np.ndarray[Any, Any], y: str, prefix: str, opset: int, *, non_negative: bool
) -> tuple[list[Any], list[Any]]:
    """``y = x @ w`` with ``x`` quantised to uint8 per row (last axis), ``w`` int8 per column.

    ORT's CPU ``MatMulInteger`` takes only a scalar ``a_zero_point`` (the ONNX
    spec allows one per row; ORT refuses it), so only the *scale* is per row and
    the zero point is a constant: after a ReLU the row is quantised on
    ``[0, max]`` (zero point 0, 127 steps), otherwise symmetrically on
    ``[-max|x|, max|x|]`` (zero point 64, 126 steps): codes stay within
    ``ACTIVATION_CODES``. ``MatMulIntegerToFloat``
    (ORT's fused integer GEMM) applies the column scales; the row scale is one
    more Mul. Written as plain ``MatMulInteger -> Cast -> Mul(row x column scales)
    -> Add(bias)`` instead, ORT 1.32's optimiser fuses all of it into one
    ``MatMulIntegerToFloat`` with the row scales as ``a_scale``, and that kernel
    then scales the bias by the row scale too: ``s_row * (acc * s_col + bias)``.
    """
    q_w, col_scale = _int8_weights(w)
    half = ACTIVATION_CODES // 2
    levels, zero_point = ((float(ACTIVATION_CODES), 0) if non_negative
                          else (float(half), half + 1))
    c = _CellBuilder(prefix, 0, opset)
    amax = c.reduce("ReduceMax", x if non_negative else c.node("Abs", [x], "abs"), "amax")
    span = c.node("Max", [amax, c.const("tiny", np.array(_TINY_RANGE, np.float32))], "span")
    inv_scale = c.node("Div", [c.const("levels", np.array(levels, np.float32)), span], "inv_scale")
    zp = c.const("zero_point", np.array(zero_point, np.uint8))
    one = c.const("one", np.array(1.0, np.float32))
    # Round half to even and saturate, in one vectorised kernel.
    x_q = c.node("QuantizeLinear", [c.node("Mul", [x, inv_scale], "x_scaled"), one, zp], "x_q")
    # The row scale is span / levels: 1 / levels goes into the column scales.
    col = c.const("col_scale", (col_scale / np.float32(levels)).astype(np.float32))
    y_col = c.node(
        "MatMulIntegerToFloat",
        [x_q, c.const("w_q", q_w), one, col, zp],
        "y_col",
        domain=_MS_DOMAIN,
    )
    c.node("Mul", [y_col, span], "y", output=y)
    return c.nodes, c.initializers


def int8_graph(model: Any) -> Any:
    """Quantise every MatMul with a constant 2-D weight in ``model`` (the cell graph).

    Per-row activation scales make each session's output independent of its
    batch neighbours (see the module docstring and ``_row_quantized_matmul``).
    """
    import onnx
    from onnx import helper
    from onnx import numpy_helper as nh

    g = model.graph
    opset = _opset(model)
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    out_nodes: list[Any] = []
    extra: list[Any] = []
    for k, n in enumerate(g.node):
        w = inits.get(n.input[1]) if n.op_type == "MatMul" else None
        if w is None or len(w.dims) != 2:
            out_nodes.append(_copy_node(n))
            continue
        nodes, tensors = _row_quantized_matmul(
            n.input[0],
            nh.to_array(w).astype(np.float32),
            n.output[0],
            f"{n.name or n.output[0]}_q{k}/",
            opset,
            non_negative=_after_relu(n.input[0], producers),
        )
        out_nodes += nodes
        extra += tensors
    _replace_nodes(g, out_nodes, extra)
    if not any(o.domain == _MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))
    onnx.checker.check_model(model, full_check=True)
    return model


def _toposort(model: Any) -> Any:
    """Order nodes so every input is produced before use (the fp16 converter appends casts)."""
    g = model.graph
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending = [_copy_node(n) for n in g.node]
    ordered: list[Any] = []
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ModelError("fp16 graph has a cycle or a dangling input")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)
    return model


def float16_graph(model: Any) -> Any:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=["GRU"])
    converted = _toposort(converted)
    onnx.checker.check_model(converted, full_check=True)
    return converted


# --- writing ------------------------------------------------------------------------


def _atomic_write(dst: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file in the same directory so a crash leaves no half file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp makes 0600; served models are world-readable
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _save(model: Any, dst: Path) -> None:
    import onnx

    _atomic_write(dst, lambda p: onnx.save(model, str(p)))


def _save_optimized(src: Path, dst: Path, level: str) -> None:
    import onnxruntime as ort

    def write(p: Path) -> None:
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.optimized_model_filepath = str(p)
        so.log_severity_level = 3  # ORT warns that ALL-level graphs are hardware specific
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])

    _atomic_write(dst, write)


def _describe(rate: int, variant: str, hidden: int, bins: int) -> dict[str, Any]:
    return {
        "model": "nsnet2",
        "sample_rate": rate,
        "variant": variant,
        "hidden": hidden,
        "bins": bins,
        "frames_per_call": 1 if variant == "int8" else None,
        # ORT 1.32 segfaults applying ALL-level (layout) optimisations to the fp16 graph.
        "graph_optimization": "ORT_ENABLE_EXTENDED" if variant == "fp16" else "ORT_ENABLE_ALL",
    }


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime as ort

    return {"onnx": str(onnx.__version__), "onnxruntime": str(ort.__version__)}


def expected_sources() -> dict[str, str]:
    return {k: s.sha256 for k, s in files.SOURCES.items()}


def is_prepared(directory: Path) -> bool:
    """Whether ``directory`` holds a complete, intact model set from this recipe."""
    try:
        manifest = files.read_manifest(directory)
    except ModelError:
        return False
    if manifest.get("recipe") != RECIPE_VERSION or manifest.get("sources") != expected_sources():
        return False
    if manifest.get("versions") != _versions():
        return False
    try:
        for name, entry in manifest["files"].items():
            files.verify(directory / name, entry["sha256"])
    except (ModelError, KeyError, TypeError):
        return False
    return True


def prepare(directory: Path, *, force: bool = False, optimized: bool = True) -> bool:
    """Build the model set in ``directory``; return False when it was already there."""
    import onnx

    if not force and is_prepared(directory):
        return False
    directory.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, Any]] = {}
    for rate in NSNET2_RATES:
        src = files.source_path(f"nsnet2-{rate // 1000}k")
        fp32 = streaming_graph(onnx.load(str(src)))
        hidden = int(fp32.graph.input[1].type.tensor_type.shape.dim[2].dim_value)
        bins = int(fp32.graph.input[0].type.tensor_type.shape.dim[2].dim_value)
        paths = {v: directory / nsnet2_name(rate, v) for v in VARIANTS}
        _save(fp32, paths["fp32"])
        _save(int8_graph(gru_cells(onnx.load(str(paths["fp32"])))), paths["int8"])
        _save(float16_graph(onnx.load(str(paths["fp32"]))), paths["fp16"])
        for variant, path in paths.items():
            entries[path.name] = {
                "source": src.name,
                **_describe(rate, variant, hidden, bins),
            }
    silero_src = files.source_path("silero-vad")
    _atomic_write(directory / SILERO_NAME, lambda p: shutil.copyfile(silero_src, p))
    entries[SILERO_NAME] = {"source": silero_src.name, "model": "silero-vad"}
    if optimized:
        for name in list(entries):
            if not name.startswith("nsnet2"):
                continue
            opt_name = f"optimized/{name.removesuffix('.onnx')}.cpu.onnx"
            _save_optimized(
                directory / name, directory / opt_name, entries[name]["graph_optimization"]
            )
            entries[opt_name] = {"source": name, "inspection_only": True}
    for name, entry in entries.items():
        path = directory / name
        entry["sha256"] = files.sha256_file(path)
        entry["bytes"] = path.stat().st_size
    manifest = {
        "format": 1,
        "recipe": RECIPE_VERSION,
        "sources": expected_sources(),
        "versions": _versions(),
        "files": dict(sorted(entries.items())),
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / files.MANIFEST_NAME, lambda p: p.write_text(text))
    return True


# --- CLI ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-dir",
        default=None,
        help=f"where to write the models (default: ${files.MODEL_DIR_ENV} or "
        "<sys.prefix>/share/audiostream/models)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    parser.add_argument(
        "--no-optimized",
        dest="optimized",
        action="store_false",
        help="skip writing ORT-optimised graphs for inspection",
    )


def run(args: argparse.Namespace) -> int:
    directory = files.model_dir(getattr(args, "model_dir", None))
    started = time.perf_counter()
    try:
        built = prepare(
            directory,
            force=bool(getattr(args, "force", False)),
            optimized=bool(getattr(args, "optimized", True)),
        )
    except AudioStreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # onnx/onnxruntime failures while deriving
        print(
            f"error: {ErrorCode.MODEL_ERROR.name}: preparing models failed: {exc!r}",
            file=sys.stderr,
        )
        return 1
    took = time.perf_counter() - started
    verb = "prepared" if built else "already prepared"
    print(f"{verb}: {directory} ({took:.1f} s)")
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m audiostream.models.prepare`` until the CLI wires ``models prepare``."""
    parser = argparse.ArgumentParser(prog="audiostream models prepare")
    add_arguments(parser)
    return run(parser.parse_args(list(argv) if argv is not None else None))


if __name__ == "__main__":
    raise SystemExit(main())
