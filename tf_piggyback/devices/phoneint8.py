"""int8 phone files (BUILD.md, "Many tasks in one phone file"): each task's own int8 model, from one
conversion of the backbone (`int8_conversions`), and the file's tables from them (`int8_tasks`):
the backbone's filters quantized once, each task's masks written into them exactly and its own
activation ranges.

Reference: Mallya et al., ECCV 2018, §3 (`W ⊙ m`, 1 bit per parameter per task), §5.3 (per-task
BatchNormalization).
"""

import os

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from tf_piggyback.devices.phonebytes import (LAYOUTS, Payload, add_mask, buffer_data, buffer_spans, editable,
                                             fitted_scale, holds, in_layout, locate, packed, refused, split_shared,
                                             tensor_list, vector_span)
from tf_piggyback.devices.tflite import REPRESENTATIVE_SAMPLES, int8_quantizer, model_flatbuffer

RANGE_BATCH = 10  # images per LiteRT call when measuring a task's activation ranges (`_ranges`)
# the ops whose filter (input 1) is quantized per channel, with their input (0) and bias (2)
FILTER_OPS = (schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D,
              schema.BuiltinOperator.FULLY_CONNECTED)


def int8_conversions(base, masks, heads, whole, representative, cached=None):
    """Each task's full-int8 flatbuffer, as the converter quantizes it from that task's activation
    ranges over `representative`, with the converter run once (`tflite.int8_quantizer`; issue 41).

    The float graph the converter quantizes is made once, from `base`. A task that owns no weight
    besides its head has the same graph with other constants: its masked filters `W ⊙ m` (each
    filter located by value, `phonebytes.locate`; a mask commutes with the BatchNormalization the
    converter folds in, §3) and its head. Those are written into copies of the float graph's
    bytes: one with every observed tensor an output, which LiteRT runs (XNNPACK) over the images
    in batches of `RANGE_BATCH` for each tensor's minimum and maximum; one calibrated with those,
    which the converter's int8 step quantizes. The ranges are the float32 ones: TensorFlow's
    calibrator runs without XNNPACK, 2x the time at 224 px, and logs a tensor that an in-place
    ADD or SUB overwrote as its result (measured on ResNet-50: 17 of 78 ranges, each convolution
    before a residual ADD and the input image before the preprocessing's SUB). A task that owns
    other weights (per-task BatchNormalization, §5.3, folded into its filters and biases) is
    converted whole, as is every task where a filter or the head is not found.

    Args:
        base: `() ->` the first task's baked model with every mask 1, its head as wide as the file's.
        masks: per task, `{kernel path: (W, int8 mask, mask type)}`.
        heads: per task, its head's `(kernel, bias)` as wide as the file's, or None for a task
            that owns other weights.
        whole: `task index -> its baked model, head as wide` (for those).
        representative: raw images.
        cached: per task, its int8 flatbuffer from an earlier export, or None: only the others
            are made (none converts anything when every task is cached).
    """
    cached = cached or [None] * len(masks)
    if all(c is not None for c in cached):
        return list(cached)
    base = base()
    template, quantize = int8_quantizer(base, representative)
    graph = schema.Model.GetRootAs(template)
    tensors = tensor_list(graph)
    kernel, bias = (np.asarray(w, np.float32) for w in base.layers[-1].get_weights())
    kernels = {path: value for task_masks in masks for path, (value, _, _) in task_masks.items()}
    targets = {path: locate(graph, tensors, value, 1e-5) for path, value in kernels.items()}
    targets.update(head=locate(graph, tensors, kernel, 1e-6), head_bias=_holding(graph, tensors, bias))
    if any(t is None for t in targets.values()) or len({t[0] for t in targets.values()}) < len(targets):
        return [c or model_flatbuffer(whole(t), "int8", representative) for t, c in enumerate(cached)]
    template = _own_buffers(template, [index for index, _ in targets.values()])
    graph = schema.Model.GetRootAs(template)
    observed = [i for i in range(graph.Subgraphs(0).TensorsLength())
                if (q := graph.Subgraphs(0).Tensors(i).Quantization()) is not None and q.MinLength() == 1]
    probe = _with_outputs(template, observed)
    # where each target's data and each observed tensor's range sit: the same for every task
    at_template, at_probe = _spans(template, targets), _spans(probe, targets)
    limits = [[vector_span(template, i, field)["offset"] for i in observed] for field in ("min", "max")]
    stored = {path: np.frombuffer(template, np.float32, size // 4, offset)
              for path, (offset, size) in at_template.items() if path in kernels}
    images = np.asarray(representative, np.float32)[:REPRESENTATIVE_SAMPLES]  # as many as the converter takes
    files = []
    for t, (task_masks, head) in enumerate(zip(masks, heads)):
        if cached[t] is not None:
            files.append(cached[t])
            continue
        if head is None:
            files.append(model_flatbuffer(whole(t), "int8", representative))
            continue
        values = {"head": in_layout(head[0], targets["head"][1]), "head_bias": head[1]}
        values.update({path: stored[path] * in_layout(mask, targets[path][1]).ravel()
                       for path, (_, mask, _) in task_masks.items()})
        low, high = _ranges(_written(probe, at_probe, values), observed, images)
        calibrated = _written(template, at_template, values)
        for offsets, vector in zip(limits, (low, high)):
            for offset, value in zip(offsets, vector):
                calibrated[offset:offset + 4] = np.float32(value).tobytes()
        files.append(quantize(bytes(calibrated)))
    return files


def _spans(content, targets):
    """`{target: (offset, bytes)}` of each target tensor's data in flatbuffer `content`."""
    tensors, spans = tensor_list(schema.Model.GetRootAs(content)), buffer_spans(content)
    return {key: spans[tensors[index][3]] for key, (index, _) in targets.items()}


def _written(content, spans, values):
    """A copy of flatbuffer `content` with `values[target]` (float32) as that target's data."""
    copy = bytearray(content)
    for key, value in values.items():
        offset, size = spans[key]
        copy[offset:offset + size] = np.ascontiguousarray(value, np.float32).tobytes()
    return copy


def _with_outputs(content, indices):
    """Flatbuffer `content` with the tensors of `indices` among its outputs, so LiteRT keeps their
    values (XNNPACK included)."""
    objects = editable(schema.Model.GetRootAs(content))
    graph = objects.subgraphs[0]
    graph.outputs = list(graph.outputs) + [i for i in indices if i not in set(graph.outputs)]
    return packed(objects, len(content))


def _ranges(probe, indices, images):
    """`(minima, maxima)` of the tensors of `indices` over `images` (LiteRT, batches of `RANGE_BATCH`)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=bytes(probe), num_threads=os.cpu_count())
    index, shape = interpreter.get_input_details()[0]["index"], None
    low, high = np.full(len(indices), np.inf), np.full(len(indices), -np.inf)
    for start in range(0, len(images), RANGE_BATCH):
        batch = images[start:start + RANGE_BATCH]
        if batch.shape != shape:
            interpreter.resize_tensor_input(index, batch.shape)
            interpreter.allocate_tensors()
            shape = batch.shape
        interpreter.set_tensor(index, batch)
        interpreter.invoke()
        for k, i in enumerate(indices):
            value = interpreter.tensor(i)()  # a view of LiteRT's buffer, not a copy
            low[k], high[k] = min(low[k], float(value.min())), max(high[k], float(value.max()))
            del value  # LiteRT refuses to run again while a view is held
    return low, high


def _holding(graph, tensors, vector):
    """`(index, layout)` of the float32 tensor whose data is `vector`, exactly (a bias: any vector
    of its length is one times a per-channel scale, so `locate` cannot tell), or None."""
    for index, (_, shape, _, buffer) in enumerate(tensors):
        data = buffer_data(graph, buffer)
        if shape == vector.shape and data is not None and data.size == vector.nbytes and np.array_equal(
                data.view(np.float32), vector.astype(np.float32)):
            return index, ((0,), 0, "keras")
    return None


def _own_buffers(flatbuffer, indices):
    """`flatbuffer` with each tensor of `indices` on a buffer of its own (the converter shares a
    buffer between equal constants, such as zero biases); as it is where none is shared."""
    model = schema.Model.GetRootAs(flatbuffer)
    graph = model.Subgraphs(0)
    users = np.bincount([graph.Tensors(i).Buffer() for i in range(graph.TensorsLength())],
                        minlength=model.BuffersLength())
    if all(users[graph.Tensors(i).Buffer()] == 1 for i in indices):
        return bytes(flatbuffer)
    objects = editable(model)
    split_shared(objects, indices)
    return packed(objects, len(flatbuffer))


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
