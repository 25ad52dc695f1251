"""Graph work around INT8 quantization: exact rewrites before it, bias correction after it.

Before (:func:`prepare_graph`, every rewrite exact in FP32, checked numerically against the source):

- ONNX Runtime's pre-processing (shape inference, constant folding, BatchNorm folded into the convs);
- **Pad into Conv**: a zero-valued constant ``Pad`` of the spatial axes feeding a ``Conv`` (the TensorFlow
  "same" padding of EfficientNet-Lite0 exports as such a pair) becomes the conv's own asymmetric
  ``pads``. A separate ``Pad`` between a ``DequantizeLinear`` and a ``Conv`` costs an FP32 round trip
  and a second quantization of the same tensor;
- **AveragePool -> depthwise Conv**: an average pool that does not exclude padding (PDN's 2x2 / 2 pools)
  becomes a depthwise conv with weights ``1/k^2``, which ONNX Runtime runs as an INT8 ``QLinearConv`` in
  the same NHWC layout as its neighbours (its ``QLinearAveragePool`` is several times slower);
- **RGB convs widened to 4 channels** (a zero channel and zero weights), in the CPU form's graph only
  (:func:`widened`): ONNX Runtime's INT8 conv is about 3x slower on a 3-channel input.

After (:func:`correct_bias`): empirical bias correction. INT8 rounding of nearly constant activation
channels (common after ReLU6 in depthwise-separable networks) shifts the *mean* of the next layer's
output, and the shifts add up through the network. For every conv, in order of depth, the per-channel
mean of its output in the quantized graph is compared with the FP32 graph's on calibration images, and
the difference is taken out of its bias (the INT32 bias of a quantized conv, the float bias of one kept
in FP32). Convs at the same depth are corrected together; each step runs only the part of the graph
above the convs it measures. Means are measured on the graph's own Q/DQ arithmetic, not on the
quantizing CPU's fused integer kernels (those saturate on x86 CPUs without VNNI), and the correction is
kept only when it brings the outputs closer to FP32's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import RuntimeFailure

log = logging.getLogger(__name__)

CPUINFO = "/proc/cpuinfo"   # where cpu_int8_kernels reads the CPU's flags (Linux)


# --------------------------------------------------------------------------- small helpers
def _const_values(graph) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs of a graph, as arrays."""
    from onnx import numpy_helper

    vals = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            vals[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return vals


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _set_attr(node, name: str, value) -> None:
    from onnx import helper

    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def session(model, optimize: bool = True, threads: int = 0, exact: bool = False):
    """A CPU ONNX Runtime session on a path or a ModelProto.

    ``exact``: Q/DQ pairs are computed as the graph writes them (dequantized values in float), not fused
    into ONNX Runtime's integer kernels, which saturate on x86 CPUs without VNNI
    (:func:`edge_ad.runtime.backends.onnxruntime.session_options`). Measurements that are written into a
    graph (bias correction) or that choose what goes into it (the sensitivity search) use this, so the
    graph is the same whichever CPU made it."""
    import onnxruntime as ort

    from ..runtime.backends.onnxruntime import session_options

    so = session_options(threads, "all" if optimize else "none", exact=exact)
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- exact rewrites
def fuse_pads(model) -> int:
    """Zero constant ``Pad`` (spatial axes only, one consumer, a Conv) -> the conv's ``pads``. In place."""
    g = model.graph
    consts = _const_values(g)
    consumers: dict[str, list] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    outputs = {o.name for o in g.output}
    fused = set()
    for n in g.node:
        if n.op_type != "Pad" or n.output[0] in outputs:
            continue
        at = _attrs(n)
        if at.get("mode", b"constant") not in (b"constant", "constant"):
            continue
        if "pads" in at:  # opset < 11: pads and value are attributes
            pads, value = np.asarray(at["pads"]), float(at.get("value", 0.0))
        else:
            if len(n.input) < 2 or n.input[1] not in consts:
                continue
            pads = np.asarray(consts[n.input[1]])
            value = 0.0
            if len(n.input) > 2 and n.input[2]:
                if n.input[2] not in consts:
                    continue
                value = float(np.asarray(consts[n.input[2]]).ravel()[0])
            if len(n.input) > 3 and n.input[3]:  # axes
                continue
        cons = consumers.get(n.output[0], [])
        if value != 0.0 or len(cons) != 1 or cons[0].op_type != "Conv":
            continue
        pads = pads.astype(np.int64).ravel()
        if pads.size != 8 or (pads < 0).any() or pads[[0, 1, 4, 5]].any():
            continue
        conv = cons[0]
        cat = _attrs(conv)
        if cat.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b""):
            continue
        cp = list(cat.get("pads", [0, 0, 0, 0]))
        _set_attr(conv, "pads", [int(cp[0] + pads[2]), int(cp[1] + pads[3]), int(cp[2] + pads[6]),
                                 int(cp[3] + pads[7])])
        conv.input[0] = n.input[0]
        fused.add(id(n))
    if fused:
        keep = [n for n in g.node if id(n) not in fused]
        del g.node[:]
        g.node.extend(keep)
    return len(fused)


def pools_to_convs(model) -> int:
    """``AveragePool`` (2-D, no excluded padding, no ceil mode, known channels) -> depthwise ``Conv``
    with weights 1/(kh*kw). In place; needs shapes (run ONNX shape inference on the model first)."""
    from onnx import helper, numpy_helper

    g = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(g.value_info) + list(g.input)}
    names = {i.name for i in g.initializer}
    done = 0
    for n in g.node:
        if n.op_type != "AveragePool":
            continue
        at = _attrs(n)
        k = list(at.get("kernel_shape", []))
        pads = list(at.get("pads", [0] * 2 * len(k)))
        if len(k) != 2 or at.get("ceil_mode", 0) or at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        if any(pads) and not at.get("count_include_pad", 0):
            continue
        shape = shapes.get(n.input[0])
        if not shape or len(shape) != 4 or not shape[1]:
            continue
        c = int(shape[1])
        wname = f"{n.name or n.output[0]}_as_depthwise_w"
        while wname in names:
            wname += "_"
        names.add(wname)
        g.initializer.append(numpy_helper.from_array(
            np.full((c, 1, k[0], k[1]), 1.0 / (k[0] * k[1]), np.float32), wname))
        conv = helper.make_node("Conv", [n.input[0], wname], list(n.output), name=n.name, kernel_shape=k,
                                strides=list(at.get("strides", [1, 1])), pads=pads or [0, 0, 0, 0],
                                dilations=list(at.get("dilations", [1, 1])), group=c)
        n.CopyFrom(conv)
        done += 1
    return done


def widen_rgb_convs(model) -> int:
    """Convs reading 3 channels (group 1, weights an initializer) read them padded with a zero 4th
    channel, with a zero 4th weight channel: exact, and ONNX Runtime's INT8 conv runs a 4-channel input
    about 3x faster than a 3-channel one (PDN's first 4x4 conv on the full image). In place."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    users: dict[str, int] = {}
    for n in g.node:
        for t in n.input:
            users[t] = users.get(t, 0) + 1
    padded: dict[str, str] = {}
    nodes = []
    for n in g.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits and users[n.input[1]] == 1 \
                and _attrs(n).get("group", 1) == 1:
            w = numpy_helper.to_array(inits[n.input[1]])
            if w.ndim == 4 and w.shape[1] == 3:
                x = n.input[0]
                if x not in padded:
                    out = f"{x}_rgb0"
                    pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 1, 0, 0], np.int64), out + "_pads")
                    g.initializer.append(pads)
                    nodes.append(helper.make_node("Pad", [x, pads.name], [out], name=f"{out}_pad", mode="constant"))
                    padded[x] = out
                w4 = np.concatenate([w, np.zeros(w.shape[:1] + (1,) + w.shape[2:], w.dtype)], axis=1)
                inits[n.input[1]].CopyFrom(numpy_helper.from_array(w4, n.input[1]))
                n.input[0] = padded[x]
        nodes.append(n)
    if padded:
        del g.node[:]
        g.node.extend(nodes)
    return sum(1 for n in g.node if n.op_type == "Conv" and n.input[0] in set(padded.values()))


def prepare_graph(src: Path, dst: Path, check_batch: np.ndarray | None = None) -> tuple[Path, dict]:
    """ONNX Runtime pre-processing + the exact rewrites above, written to ``dst``; returns (path, what was
    done). With ``check_batch``, the rewritten graph must give the source's outputs (1e-4 of each
    output's largest magnitude) or :class:`RuntimeFailure` is raised."""
    import onnx
    from onnx import shape_inference

    done = {"pre_process": True}
    pre = dst.with_name(dst.stem + ".pre.onnx")
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    except Exception as exc:  # quantization works without it, only less fused
        log.warning("quantization pre-processing failed (%s); rewriting the graph as exported", exc)
        done["pre_process"] = False
        pre = src
    model = onnx.load(str(pre))
    done["pads_fused"] = fuse_pads(model)
    model = shape_inference.infer_shapes(model)
    done["pools_to_convs"] = pools_to_convs(model)
    used = {t for n in model.graph.node for t in n.input}
    unused = [i for i in model.graph.initializer if i.name not in used]
    for i in unused:  # left by constant folding; ONNX Runtime warns about each
        model.graph.initializer.remove(i)
    taken = {n.name for n in model.graph.node}
    for i, n in enumerate(model.graph.node):  # names: FP32 exclusions and bias correction go by them
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in taken:
                name += "_"
            n.name = name
            taken.add(name)
    onnx.save(model, str(dst))
    if pre != src:
        pre.unlink(missing_ok=True)
    if check_batch is not None:
        check_same(src, dst, check_batch)
    return dst, done


def widened(src: Path, dst: Path, check_batch: np.ndarray | None = None) -> tuple[Path, int]:
    """``src`` with its RGB convs widened (:func:`widen_rgb_convs`), for the CPU (u8) form only: the
    TensorRT form keeps the plain graph. Returns (dst, convs widened); ``dst`` is ``src`` when none."""
    import onnx

    model = onnx.load(str(src))
    n = widen_rgb_convs(model)
    if not n:
        return src, 0
    onnx.save(model, str(dst))
    if check_batch is not None:
        check_same(src, dst, check_batch)
    return dst, n


def check_same(src: Path, dst: Path, batch: np.ndarray, tol: float = 1e-4) -> None:
    """Raise :class:`RuntimeFailure` unless ``dst`` gives ``src``'s outputs (``tol`` of each output's max)."""
    a = session(src).run(None, {"image": batch})
    b = session(dst).run(None, {"image": batch})
    for x, y in zip(a, b):
        err = float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12))
        if not err <= tol:
            raise RuntimeFailure(f"the graph rewritten for quantization ({dst.name}) differs from {src.name} by "
                                 f"{err:.2e} of an output's maximum (a rewrite went wrong; please report it)")


# --------------------------------------------------------------------------- bias correction
def prune(model, outputs: Sequence[str]):
    """A copy of ``model`` that computes only ``outputs`` (the nodes and initializers they need)."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    need = set(outputs)
    keep = []
    for n in reversed(list(g.node)):
        if any(o in need for o in n.output):
            keep.append(n)
            need.update(t for t in n.input if t)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in need]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.output[:]
    g.output.extend(helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs)
    del g.value_info[:]
    return m


def conv_depths(model) -> dict[str, int]:
    """Conv node name -> number of convs on the longest path from the input to it (itself included)."""
    depth_of: dict[str, int] = {}
    out: dict[str, int] = {}
    for n in model.graph.node:  # topologically sorted
        d = max([depth_of.get(t, 0) for t in n.input if t] or [0])
        if n.op_type == "Conv":
            d += 1
            out[n.name] = d
        for t in n.output:
            depth_of[t] = d
    return out


def graph_outputs(model, batch: np.ndarray, chunk: int = 0, threads: int = 0, exact: bool = False) -> dict:
    """``model``'s outputs (a path or a ModelProto) on ``batch``, run ``chunk`` images at a time (0: all)."""
    sess = session(model, threads=threads, exact=exact)
    names = [o.name for o in sess.get_outputs()]
    step = chunk or len(batch)
    parts = [sess.run(names, {"image": batch[i:i + step]}) for i in range(0, len(batch), step)]
    return {k: np.concatenate([p[j] for p in parts]) for j, k in enumerate(names)}


def map_error(ref_out: dict[str, np.ndarray], model, batch: np.ndarray, chunk: int = 0, threads: int = 0,
              exact: bool = False) -> float:
    """:func:`output_error` of ``model`` (a path or a ModelProto) on ``batch``; ``ref_out``: the
    reference's outputs on it."""
    return output_error(ref_out, graph_outputs(model, batch, chunk, threads, exact))


def output_error(ref_out: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> float:
    """Mean over ``ref_out``'s outputs of ||q - r|| / ||r - mean(r)|| (0 = identical; 1 = as large as the
    signal), ``q`` the same output in ``out``: the relative map error."""
    errs = []
    for name, r in ref_out.items():
        r = r.astype(np.float64)
        errs.append(float(np.linalg.norm(out[name] - r) / (np.linalg.norm(r - r.mean()) + 1e-12)))
    return float(np.mean(errs))


def cpu_int8_kernels() -> tuple[bool, str]:
    """(whether ONNX Runtime's fused INT8 kernels may saturate on this CPU, the CPU in words).

    They may on x86 CPUs without VNNI (``avx512_vnni`` / ``avx_vnni`` not among /proc/cpuinfo's flags, or
    the flags unreadable): their u8 x s8 products go through VPMADDUBSW, whose 16-bit pair sums saturate
    (:func:`session`'s ``exact``). ARM CPUs and VNNI compute the graph's own arithmetic."""
    import platform

    from ..runtime.backends.base import is_x86

    machine = platform.machine() or "unknown CPU"
    if not is_x86():
        return False, machine
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is None:
        return True, f"{machine}, VNNI unknown (no CPU flags in /proc/cpuinfo)"
    vnni = [f for f in flags if f in ("avx512_vnni", "avx_vnni")]
    return (False, f"{machine} with VNNI ({', '.join(vnni)})") if vnni else (True, f"{machine} without VNNI")


def _channel_means(model, names: Sequence[str], batch: np.ndarray, chunk: int, threads: int) -> dict:
    """Per-channel means over images and positions of ``names`` (``[B, C, H, W]`` tensors), computed on
    the graph's own Q/DQ arithmetic (:func:`session`'s ``exact``)."""
    sess = session(prune(model, names), threads=threads, exact=True)
    acc = [np.zeros(0)] * len(names)
    n = 0
    for i in range(0, len(batch), chunk):
        outs = sess.run(list(names), {"image": batch[i:i + chunk]})
        for j, o in enumerate(outs):
            m = o.astype(np.float64).reshape(o.shape[0], o.shape[1], -1).mean(axis=2).sum(axis=0)
            acc[j] = m if acc[j].size == 0 else acc[j] + m
        n += len(batch[i:i + chunk])
    return {k: a / n for k, a in zip(names, acc)}


def _through_identity(t: str, producer: dict) -> tuple[str, list]:
    """The tensor ``t`` is a copy of through ``Identity`` nodes (an exporter's, for an initializer it
    deduplicated or that two modules share), and those nodes, nearest first."""
    chain = []
    while t in producer and producer[t].op_type == "Identity":
        chain.append(producer[t])
        t = producer[t].input[0]
    return t, chain


def _bias_source(conv, inits: dict, producer: dict):
    """Where a conv's constant bias comes from: (the initializer, its ``DequantizeLinear`` or None for a float
    bias, the nodes between the conv and the initializer), through any ``Identity`` nodes; None when the bias
    is not such a constant (computed, or a dequantization with a zero point other than 0)."""
    from onnx import numpy_helper

    b, chain = _through_identity(conv.input[2], producer)
    if b in inits:
        return b, None, chain
    dq = producer.get(b)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    x, more = _through_identity(dq.input[0], producer)
    scale = _through_identity(dq.input[1], producer)[0]
    zp = _through_identity(dq.input[2], producer)[0] if len(dq.input) > 2 and dq.input[2] else None
    if x not in inits or scale not in inits or (zp is not None and (
            zp not in inits or np.any(numpy_helper.to_array(inits[zp]) != 0))):
        return None
    return x, dq, chain + [dq] + more


def _bias_targets(q, convs: set[str]) -> tuple[dict, int]:
    """The convs of ``q`` named in ``convs`` whose bias is a constant (:func:`_bias_source`): conv name ->
    (its output, the bias initializer to correct, the bias scale or None for a float bias), and how many of
    them were given their own copy of the bias. In place: a bias initializer that other nodes read too (two
    convs sharing one, an exporter's deduplicated zeros behind ``Identity`` nodes) is copied for each conv
    that reads it, so each is corrected once and by its own error; the nodes and initializers the copies
    leave unread are removed. Exact: the copies hold the same values."""
    from onnx import helper, numpy_helper

    g = q.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {o.name: 1 for o in g.output}
    for n in g.node:
        for t in n.input:
            uses[t] = uses.get(t, 0) + 1
    names = set(inits) | set(producer) | {i.name for i in g.input}
    new_name = _namer(names)
    targets, before, copied = {}, {}, 0
    for n in list(g.node):
        if n.op_type != "Conv" or n.name not in convs or len(n.input) < 3 or not n.input[2]:
            continue
        found = _bias_source(n, inits, producer)
        if found is None:
            continue
        init, dq, chain = found
        scale = None if dq is None else \
            numpy_helper.to_array(inits[_through_identity(dq.input[1], producer)[0]]).astype(np.float64)
        if any(uses.get(t, 0) != 1 for t in [n.input[2], *(c.input[0] for c in chain)]):   # read elsewhere too
            uses[n.input[2]] -= 1   # (the conv reads its own copy: another one reading it may keep the original)
            own = g.initializer.add()
            own.CopyFrom(inits[init])
            own.name = new_name(f"{init}_{n.name}")
            if dq is None:
                n.input[2] = own.name
            else:
                node = helper.make_node("DequantizeLinear", [own.name, *dq.input[1:]], [new_name(f"{own.name}_dq")],
                                        name=new_name(f"{own.name}_dq"))
                node.attribute.extend(dq.attribute)    # (its axis)
                before[n.name] = node                   # placed just before the conv
                n.input[2] = node.output[0]
            init, copied = own.name, copied + 1
            inits[init] = own
        targets[n.name] = (n.output[0], init, scale)
    if copied:
        nodes = []
        for n in g.node:
            if n.op_type == "Conv" and n.name in before:
                nodes.append(before[n.name])
            nodes.append(n)
        del g.node[:]
        g.node.extend(nodes)
        _drop_unread(g)
    inits = {i.name: i for i in g.initializer}   # (after the changes: the initializers the graph holds now)
    return {k: (out, inits[init], scale) for k, (out, init, scale) in targets.items()}, copied


def _namer(taken: set[str]):
    """A function giving a name not in ``taken`` (``base``, else ``base_2``, ``base_3``, ...), taking it."""
    def name(base: str) -> str:
        out, i = base, 1
        while out in taken:
            i += 1
            out = f"{base}_{i}"
        taken.add(out)
        return out

    return name


def _drop_unread(g) -> None:
    """Remove the ``Identity`` and ``DequantizeLinear`` nodes whose outputs nothing reads (nor the graph
    outputs), then the initializers nothing reads (but those a graph input names). In place."""
    outputs = {o.name for o in g.output}
    while True:
        read = outputs | {t for n in g.node for t in n.input}
        dead = [n for n in g.node if n.op_type in ("Identity", "DequantizeLinear") and not read & set(n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    read = outputs | {t for n in g.node for t in n.input}
    for i in [i for i in g.initializer if i.name not in read | {x.name for x in g.input}]:
        g.initializer.remove(i)
    gone = {v.name for v in g.value_info} - read - {o for n in g.node for o in n.output}
    for v in [v for v in g.value_info if v.name in gone]:
        g.value_info.remove(v)


def correct_bias(ref_path: Path, q_path: Path, batch: np.ndarray, chunk: int = 8, threads: int = 0) -> dict:
    """Empirical bias correction of the Q/DQ graph ``q_path`` against the FP32 graph ``ref_path`` it was
    made from, on ``batch`` (calibration images). Returns a summary.

    Means are measured on the Q/DQ arithmetic the graph defines (:func:`session`'s ``exact``), what
    TensorRT and ONNX Runtime's integer kernels on ARM and VNNI CPUs compute, not on this machine's fused
    kernels: the corrected graph does not depend on the CPU that made it. ``q_path`` is rewritten only when
    the correction brings the outputs closer to FP32's on ``batch`` (:func:`map_error`, same arithmetic);
    otherwise it is left as it was and the summary says ``applied: false``. A bias read through ``Identity``
    nodes is followed to its constant, and one that other nodes read too is copied for the conv first
    (:func:`_bias_targets`; ``biases_copied`` in the summary)."""
    import onnx
    from onnx import numpy_helper

    t0 = time.perf_counter()
    ref = onnx.load(str(ref_path))
    q = onnx.load(str(q_path))
    ref_out = {n.name: n.output[0] for n in ref.graph.node if n.op_type == "Conv"}
    targets, copied = _bias_targets(q, set(ref_out))
    if not targets:
        return {"convs": 0, "levels": 0, "applied": False, "biases_copied": 0, "seconds": 0.0}
    names = list(targets)
    ref_means = _channel_means(ref, [ref_out[k] for k in names], batch, chunk, threads)
    by_depth: dict[int, list[str]] = {}
    depths = conv_depths(q)
    for k in names:
        by_depth.setdefault(depths[k], []).append(k)
    shifts = []
    for d in sorted(by_depth):
        ks = by_depth[d]
        q_means = _channel_means(q, [targets[k][0] for k in ks], batch, chunk, threads)
        for k in ks:
            out, init, scale = targets[k]
            err = q_means[out] - ref_means[ref_out[k]]
            shifts.append(float(np.max(np.abs(err))))
            bias = numpy_helper.to_array(init)
            if scale is None:
                new = (bias.astype(np.float64) - err).astype(bias.dtype)
            else:
                step = np.round(err / np.broadcast_to(scale, err.shape)).astype(np.int64)
                new = np.clip(bias.astype(np.int64) - step, -2 ** 31, 2 ** 31 - 1).astype(np.int32)
            init.CopyFrom(numpy_helper.from_array(new, init.name))
    # the per-channel means of every conv now match, but the maps are what counts: keep the correction
    # only where it brings them closer to FP32's (on a graph with few nearly constant channels it may not)
    ref_maps = graph_outputs(ref, batch, chunk, threads, exact=True)
    error = {"before": map_error(ref_maps, q_path, batch, chunk, threads, exact=True),
             "after": map_error(ref_maps, q, batch, chunk, threads, exact=True)}
    applied = error["after"] < error["before"]
    if applied:
        onnx.save(q, str(q_path))
    summary = {"convs": len(names), "levels": len(by_depth), "images": int(len(batch)),
               "largest_shift": max(shifts), "median_shift": float(np.median(shifts)),
               "map_error_before": error["before"], "map_error_after": error["after"], "applied": applied,
               "biases_copied": copied, "seconds": time.perf_counter() - t0}
    log.info("bias correction: %s", summary)
    return summary
