"""The bytes of a phone file (BUILD.md, "Many tasks in one phone file"): reading and writing a
TFLite flatbuffer through the schema `ai_edge_litert` ships (tensors, buffers, quantization
vectors, where each sits in the file), the payload of packed masks, and the int8 file's tasks.

Reference: Mallya et al., ECCV 2018, §3 (`W ⊙ m`, 1 bit per parameter per task), §5.3 (per-task
BatchNormalization).
"""

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from tf_piggyback import coding

ALIGN = 16  # every buffer's data, as the TFLite converter aligns them
DTYPES = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.FLOAT16: np.float16,
          schema.TensorType.INT8: np.int8}
# int8: the ops whose filter (input 1) is quantized per channel, with their input (0) and bias (2)
FILTER_OPS = (schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D,
              schema.BuiltinOperator.FULLY_CONNECTED)
# Keras kernel -> TFLite filter: (axes of the transpose, channel axis in the TFLite layout, name),
# the layouts LiteRT's ops take: CONV_2D OHWI, DEPTHWISE_CONV_2D 1HW(I*M), TRANSPOSE_CONV
# (Keras H,W,O,I) OHWI, FULLY_CONNECTED (O, I); an EinsumDense kernel of 3 axes (attention's
# query, key, value: I,H,K; its output: H,K,O) is a FULLY_CONNECTED matrix, its input axis first
# ("I,*") or its output axis last ("*,O") merged; else the Keras layout.
LAYOUTS = {4: [((3, 0, 1, 2), 0, "OHWI"), (None, 3, "1HW(IM)"), ((2, 0, 1, 3), 0, "OHWI")],
           3: [(("I,*", (1, 0)), 0, "OI"), (("*,O", (1, 0)), 0, "OI"), (("I,*", (0, 1)), 1, "IO"),
               (("*,O", (0, 1)), 1, "IO")],
           2: [((1, 0), 0, "OI"), ((0, 1), 1, "IO")]}


def in_layout(kernel, layout):
    """A Keras kernel (or its mask) in one of `LAYOUTS`, as the TFLite file stores it."""
    axes, _, name = layout
    if axes is None:  # depthwise (H, W, I, M) -> (1, H, W, I*M)
        return kernel.reshape(1, *kernel.shape[:2], -1)
    if isinstance(axes[0], str):  # an EinsumDense kernel as a matrix, then transposed
        merge, axes = axes
        kernel = kernel.reshape(kernel.shape[0], -1) if merge == "I,*" else kernel.reshape(-1, kernel.shape[-1])
    return np.ascontiguousarray(np.transpose(kernel, axes))


def tensor_list(model):
    """`[(name, shape, dtype, buffer index)]` of a flatbuffer's first subgraph."""
    graph = model.Subgraphs(0)
    return [(t.Name().decode(), tuple(t.ShapeAsNumpy()) if t.ShapeLength() else (), t.Type(), t.Buffer())
            for t in (graph.Tensors(i) for i in range(graph.TensorsLength()))]


def buffer_data(model, buffer):
    data = model.Buffers(buffer).DataAsNumpy()
    return None if isinstance(data, int) else data


def fitted_scale(base, other, axis):
    """`(q, error, largest)`, one each per index of `axis`: the least-squares `q` of
    `base * q ~ other`, its largest absolute error and the channel's largest absolute value."""
    moved_b, moved_o = (np.moveaxis(a.astype(np.float64), axis, 0).reshape(a.shape[axis], -1) for a in (base, other))
    norm = (moved_b * moved_b).sum(axis=1)
    q = np.divide((moved_b * moved_o).sum(axis=1), norm, out=np.zeros_like(norm), where=norm != 0)
    error = np.abs(moved_b * q[:, None] - moved_o).max(axis=1)
    return q, error, np.maximum(np.abs(moved_b).max(axis=1), np.abs(moved_o).max(axis=1))


def channel_scale(base, other, axis, tolerance):
    """`q` (float32, one per index of `axis`) with `base * q == other` within `tolerance`
    (relative to each channel's largest value), or None. `q` is the least-squares fit."""
    q, error, largest = fitted_scale(base, other, axis)
    return q.astype(np.float32) if np.all(error <= tolerance * np.maximum(largest, 1e-30)) else None


def holds(kernel, data, axis, tolerance):
    """Whether tensor `data` holds `kernel` (both in one layout) up to a per-channel scale along
    `axis` (`channel_scale`): how an export finds each masked filter in the converted model. A
    scale of 0 where the kernel's channel is not all 0 holds nothing of it: an all-zero tensor
    of the right shape would match every kernel (issue 39)."""
    scale = channel_scale(kernel, data, axis, tolerance)
    nonzero = np.moveaxis(kernel, axis, 0).reshape(kernel.shape[axis], -1).any(axis=1)
    return scale is not None and not np.any((scale == 0) & nonzero)


class Payload:
    """The bytes a file carries after its model: each task's masks, scales and own tensors."""

    def __init__(self):
        self.parts, self.size = [], 0

    def add(self, data):
        data = np.ascontiguousarray(data).view(np.uint8).ravel()
        start = self.size
        self.parts.append(data)
        self.size += len(data)
        if self.size % ALIGN:
            self.parts.append(np.zeros(ALIGN - self.size % ALIGN, np.uint8))
            self.size += ALIGN - self.size % ALIGN
        return [start, len(data)]  # offset within the payload (the file offset once written)

    def array(self):
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.uint8)


def refused(path):
    """The one-line error for a masked kernel that is no filter of the converted model."""
    return ValueError(f"kernel {path!r} is not one constant filter of the TFLite model; export the tasks "
                      "with export_tflite instead")


def add_mask(task, payload, entry, index, masks):
    """Adds the task's mask of filter `index` (packed in the filter's TFLite order) to `task`."""
    if entry["path"] in masks:
        _, mask, mask_type = masks[entry["path"]]
        task["mask_type"] = mask_type
        if np.any(mask != 1):
            task["masks"].append({"filter": index, "at": payload.add(coding.pack(in_layout(mask, entry["layout"]),
                                                                                  mask_type))})


def quantization_of(model, index):
    """`({"scale": float32 array, "zero_point": int64 array}, quantized dimension)` of a tensor."""
    q = model.Subgraphs(0).Tensors(index).Quantization()
    if q is None:
        return {}, 0
    fields = {"scale": q.ScaleAsNumpy(), "zero_point": q.ZeroPointAsNumpy()}
    return {k: v for k, v in fields.items() if not isinstance(v, int)}, q.QuantizedDimension()


def filter_ops(model):
    """`{filter tensor index: (input tensor index, bias tensor index or -1)}` of `FILTER_OPS`."""
    codes = [max(model.OperatorCodes(i).BuiltinCode(), model.OperatorCodes(i).DeprecatedBuiltinCode())
             for i in range(model.OperatorCodesLength())]
    graph, ops = model.Subgraphs(0), {}
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        if codes[op.OpcodeIndex()] in FILTER_OPS:
            inputs = [int(x) for x in op.InputsAsNumpy()]
            ops[inputs[1]] = (inputs[0], inputs[2] if len(inputs) > 2 else -1)
    return ops


def dequantized(model, tensors, index):
    """An int8 tensor's values times its (per-channel) scale, float64."""
    _, shape, _, buffer = tensors[index]
    quantization, axis = quantization_of(model, index)
    values = buffer_data(model, buffer).view(np.int8).reshape(shape).astype(np.float64)
    scale = np.asarray(quantization["scale"], np.float64)
    return values * (scale.reshape([-1 if a == axis else 1 for a in range(len(shape))]) if scale.size > 1 else scale)


def int8_tasks(names, classes, task_masks, converted, kernels, tolerance):
    """int8: `(base model, filters, own, tasks, payload)`.

    Each task's own baked model was converted to int8 (its activation ranges, calibrated on the
    representative images). The file stores each masked filter once, `Q = round(W / s)` with the
    backbone's per-channel scale `s = max|W| / 127`, so a task's filter `Q ⊙ m` is masked exactly
    (a zeroed value stays 0, a ternary -1 negates, within ±127); the task's filter scale is the
    least-squares fit of its own quantized filter on `Q ⊙ m` (a per-task BatchNormalization folded
    in: a negative one is a sign, stored as a `scales` entry of ±1), and its biases are requantized
    to it. Every other difference from the first task (activation scales and zero points, biases,
    head) is an `own` entry: a tensor's data, or its quantization's `scale` or `zero_point` vector.

    A channel whose mask zeroes its largest weights keeps fewer levels than its own int8 file would
    (`max |Q ⊙ m|` of 127, e.g. 13 where every weight above a tenth of the largest is off): the
    task still exports, each filter's fewest levels in its `levels` (issue 39). A task whose
    filter differs from `Q ⊙ m` times a scale by more than twice the two roundings (half the
    backbone's step times the scale, half the task's own step) changed the backbone: refused.
    """
    base = converted[0]
    tensors = tensor_list(base)
    ops = filter_ops(base)
    filters, stored = [], {}
    for path, kernel in kernels.items():
        mask = task_masks[0][path][1] if path in task_masks[0] else 1
        found = None
        for index in ops:
            _, axis = quantization_of(base, index)
            if tensors[index][2] != schema.TensorType.INT8 or index in stored:
                continue
            for layout in LAYOUTS.get(kernel.ndim, []):
                candidate = in_layout(kernel * mask, layout)
                if candidate.shape == tensors[index][1] and layout[1] == axis and holds(
                        candidate, dequantized(base, tensors, index), axis, tolerance):
                    found = (index, layout)
                    break
            if found:
                break
        if found is None:
            raise refused(path)
        values = in_layout(kernel, found[1]).astype(np.float64)
        moved = np.moveaxis(np.abs(values), found[1][1], 0).reshape(values.shape[found[1][1]], -1)
        scale = moved.max(axis=1) / 127
        scale[scale == 0] = 1
        shape = [-1 if a == found[1][1] else 1 for a in range(values.ndim)]
        stored[found[0]] = (np.clip(np.round(values / scale.reshape(shape)), -127, 127).astype(np.int8), scale, shape)
        filters.append({"path": path, "tensor_index": found[0], "layout": found[1]})
    # each task's values of every patchable part: (tensor index, "data" | "scale" | "zero_point") -> array
    payload, tasks, values = Payload(), [], []
    for name, count, masks, model in zip(names, classes, task_masks, converted):
        task = {"name": name, "classes": count, "mask_type": None, "masks": [], "scales": [], "own": [], "levels": []}
        mine = {}
        for i, (_, _, _, buffer) in enumerate(tensors):
            data = buffer_data(model, buffer)
            if data is not None and i not in stored:
                mine[i, "data"] = data
            for field, vector in quantization_of(model, i)[0].items():
                mine[i, field] = vector
        for f, entry in enumerate(filters):
            index = entry["tensor_index"]
            q, backbone_scale, shape = stored[index]
            add_mask(task, payload, entry, f, masks)
            mask = in_layout(masks[entry["path"]][1], entry["layout"]) if entry["path"] in masks else 1
            axis, masked = entry["layout"][1], q * mask.astype(np.float64)
            fit, error, largest = fitted_scale(masked * backbone_scale.reshape(shape),
                                               dequantized(model, tensors, index), axis)
            # each side rounds once, by half a step: the backbone's (times the fit) and the task's own;
            # twice that is allowed, as the least-squares fit is near the folded scale, not on it
            if np.any(error > np.maximum(3 / 127 * largest, np.abs(fit) * backbone_scale + mine[index, "scale"])):
                raise ValueError(f"task {name!r} changes filter {tensors[index][0]!r} beyond a per-channel scale")
            levels = np.abs(np.moveaxis(masked, axis, 0).reshape(masked.shape[axis], -1)).max(axis=1)
            task["levels"].append(int(levels[levels > 0].min(initial=127)))
            if np.any(fit < 0):
                task["scales"].append({"filter": f, "at": payload.add(np.where(fit < 0, -1, 1).astype(np.float32))})
            scale = (backbone_scale * np.where(fit == 0, 1, np.abs(fit))).astype(np.float32)
            inputs, bias = ops[index]
            if bias >= 0:  # requantized to the new filter scale: bias scale = input scale x filter scale
                old = mine[index, "scale"].astype(np.float64)
                ints = mine[bias, "data"].view(np.int32).astype(np.float64)
                mine[bias, "data"] = np.clip(np.round(ints * old / scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
                mine[bias, "scale"] = (mine[inputs, "scale"][0] * scale).astype(np.float32)
            mine[index, "scale"] = scale
        tasks.append(task)
        values.append({key: np.ascontiguousarray(v).view(np.uint8).ravel() for key, v in mine.items()})
    own = {}
    for task, mine in zip(tasks, values):
        for key, data in mine.items():
            if data.nbytes != values[0][key].nbytes:
                raise ValueError(f"task {task['name']!r} quantizes tensor {tensors[key[0]][0]!r} differently "
                                 f"from {names[0]!r}; export the tasks to separate files")
            if not np.array_equal(data, values[0][key]):
                own.setdefault(key, len(own))
                task["own"].append({"own": own[key], "at": payload.add(data)})
    # the base: the first task's values, every filter unmasked (`Q`); a shared buffer is split
    model = schema.ModelT.InitFromObj(base)
    graph = model.subgraphs[0]
    users = np.bincount([t.buffer for g in model.subgraphs for t in g.tensors], minlength=len(model.buffers))
    writes = {i: data for (i, field), data in values[0].items() if field == "data"}
    writes.update({i: stored[i][0].view(np.uint8).ravel() for i in stored})
    for i, data in writes.items():
        tensor = graph.tensors[i]
        if np.array_equal(np.asarray(model.buffers[tensor.buffer].data, np.uint8), data):
            continue
        if users[tensor.buffer] > 1:
            users[tensor.buffer] -= 1
            tensor.buffer = len(model.buffers)
            model.buffers.append(schema.BufferT())
        model.buffers[tensor.buffer].data = np.array(data, np.uint8)
    for (i, field), data in values[0].items():
        if field != "data":
            vector = data.view(np.float32 if field == "scale" else np.int64)
            setattr(graph.tensors[i].quantization, "scale" if field == "scale" else "zeroPoint", vector)
    builder = flatbuffers.Builder(2 ** 20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return schema.Model.GetRootAs(builder.Output()), filters, own, tasks, payload


class AlignedBuffer(schema.BufferT):
    """A buffer whose data the builder aligns to `ALIGN` bytes (the object API aligns to 1)."""

    def Pack(self, builder):
        data = None
        if self.data is not None and len(self.data):
            payload = np.asarray(self.data, np.uint8).tobytes()
            builder.StartVector(1, len(payload), ALIGN)
            builder.head -= len(payload)
            builder.Bytes[builder.head:builder.head + len(payload)] = payload
            data = builder.EndVector(len(payload))
        schema.BufferStart(builder)
        if data is not None:
            schema.BufferAddData(builder, data)
        return schema.BufferEnd(builder)


def vector_span(flatbuffer, index, field):
    """`{"offset", "bytes"}` of a tensor's quantization `scale` or `zero_point` vector."""
    quantization = schema.Model.GetRootAs(flatbuffer).Subgraphs(0).Tensors(index).Quantization()
    vector = quantization.ScaleAsNumpy() if field == "scale" else quantization.ZeroPointAsNumpy()
    origin = np.frombuffer(flatbuffer, np.uint8).ctypes.data
    return {"offset": vector.ctypes.data - origin, "bytes": vector.nbytes}


def buffer_spans(flatbuffer):
    """`[(file offset, length)]` of every buffer's data."""
    model = schema.Model.GetRootAs(flatbuffer)
    origin = np.frombuffer(flatbuffer, np.uint8).ctypes.data
    spans = []
    for i in range(model.BuffersLength()):
        data = model.Buffers(i).DataAsNumpy()
        spans.append((0, 0) if isinstance(data, int) else (data.ctypes.data - origin, data.size))
    return spans
