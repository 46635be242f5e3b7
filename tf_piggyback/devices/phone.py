"""Many tasks in one phone file at single-task speed (BUILD.md, "Many tasks in one phone file").

LiteRT gives a convolution to XNNPACK only when its filter is a constant, so a task's masked
filters must be constants when it runs. The file is an ordinary TFLite model of the backbone,
every mask 1 (its filters `W`, as the converter stores them: OHWI, BatchNormalization folded in),
with the first task's own weights; a table in its metadata says where each masked filter and
each task-owned tensor sits in the bytes, and each task's packed masks, per-channel filter scales
(a per-task BatchNormalization folded into the filter) and own tensors follow the model in the
file (the payload: trailing bytes, which LiteRT ignores). Switching to a task writes `W ⊙ m` (and
its own tensors) into a copy of the model's bytes and builds a new interpreter from it
(`PhoneTasks`); calls then run at the single-task file's speed. An int8
file stores the backbone's filters quantized once and each task's own activation ranges
(`phoneint8`: one conversion for every task, then the file's tables).

Reference: Mallya et al., ECCV 2018, §3 (`W ⊙ m`, 1 bit per parameter per task), §5.3 (per-task
BatchNormalization).
"""

import hashlib
import json
import logging
import mmap
import os
import threading

import flatbuffers
import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema

from tf_piggyback.core import coding
from tf_piggyback.core.files import file_stat, sha256, write_atomic
from tf_piggyback.core.fingerprint import fingerprint
from tf_piggyback.core.surgery import bake_with_layers, masked_layers, task_weights
from tf_piggyback.core.taskfile import load_task, named_tasks
from tf_piggyback.devices.phonebytes import (ALIGN, DTYPES, AlignedBuffer, Payload, add_mask, buffer_data,
                                             buffer_spans, channel_scale, editable, locate, refused, split_shared,
                                             tensor_list, vector_span)
from tf_piggyback.devices.phoneint8 import int8_conversions, int8_tasks
from tf_piggyback.devices.tflite import model_flatbuffer

FORMAT, VERSION = "tf_piggyback.devices.phone", 2  # 2: the payload follows the model
METADATA = "tf_piggyback"  # the model metadata entry that holds the table (UTF-8 JSON)
SIGNATURE = "unmasked"  # the stored bytes are the backbone with every mask 1: run a task through the table
PAD_LOGIT = -1e9  # a task with fewer classes than the file's widest: its extra logits (exp() is 0)
QUANTIZE = ("none", "float16", "int8")
# int8: a filter channel whose task keeps fewer of the 127 levels (4 bits) is logged at export; the
# table's `levels` lists each task's fewest per filter (`phoneint8.int8_tasks`)
COARSE_LEVELS = 16
INT8_CACHE_FORMAT = 1  # `_int8_cache_keys`: a new way of making a task's int8 model bumps it


def _padded(model, classes, logit=PAD_LOGIT):
    """`model` with its last layer (a Dense or convolution head) widened to `classes` outputs:
    zero kernel columns, bias `logit` (`PAD_LOGIT`: its real classes' logits and probabilities are
    unchanged). Tasks of different class counts share one graph this way."""
    have = model.output_shape[-1]
    if have == classes:
        return model
    head = model.layers[-1]
    key = _width_key(head)
    if key is None:
        raise ValueError(f"tasks with different class counts in one phone file need a Dense or convolution head "
                         f"with a bias; {head.name!r} is a {type(head).__name__}: export them to separate files")
    wide = type(head).from_config({**head.get_config(), key: classes})
    result = keras.models.clone_model(model, clone_function=lambda layer: wide if layer is head else layer)
    wide.set_weights(_padded_head(model, classes, logit))
    return result


def _padded_head(model, classes, logit=PAD_LOGIT):
    """`[kernel, bias]` of `model`'s head widened to `classes` outputs, as `_padded` widens it."""
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in model.layers[-1].weights)
    extra = classes - kernel.shape[-1]
    return [np.pad(kernel, [(0, 0)] * (kernel.ndim - 1) + [(0, extra)]),
            np.pad(bias, (0, extra), constant_values=logit)]


def _width_key(head):
    """`units` or `filters` for a Dense or convolution head with a bias (which `_padded` widens), else None."""
    key = next((k for k in ("units", "filters") if k in head.get_config()), None)
    return key if key is not None and len(head.weights) == 2 else None


def _unmasked(model, keep_masks=False):
    """The task's baked model with every masked kernel back to the backbone's `W` (with
    `keep_masks`, `W ⊙ m` as baked), and its `_kernel_masks`."""
    baked, pairs = bake_with_layers(model)
    if not keep_masks:
        for wrapper, plain in pairs:
            sources = list(wrapper.layer.weights)
            for kernel in wrapper.kernels:
                index = next(i for i, w in enumerate(sources) if w is kernel)
                plain.weights[index].assign(keras.ops.convert_to_numpy(kernel))
    return baked, _kernel_masks(model)


def _owns_head_only(model):
    """Whether a task model owns no weight besides its head (no per-task BatchNormalization)."""
    head = {id(w) for w in model.layers[-1].weights}
    return all(id(w) in head for w in task_weights(model))


def _kernel_masks(model):
    """`{kernel path: (W, int8 mask, mask type)}` of a task model's masked kernels."""
    return {kernel.path: (keras.ops.convert_to_numpy(kernel), np.asarray(mask, np.int8), wrapper.mask_type)
            for wrapper in masked_layers(model) for kernel, mask in zip(wrapper.kernels, wrapper.thresholded_masks())}


def export_phone(backbone, task_paths, output_path, quantize="none", representative=None, int8_cache=None):
    """Writes a multi-task phone file (module docstring), atomically; returns its size.

    Args:
        backbone: the backbone the tasks were trained on.
        task_paths: task files, each `PATH` or `NAME=PATH`; tasks may differ in class count
            (a Dense or convolution head), mask type and per-task BatchNormalization.
        output_path: the `.tflite` file.
        quantize: `"none"` (float32), `"float16"` (float16 weights) or `"int8"` (full integer:
            the backbone's filters quantized once, per channel; each task's activation ranges
            measured on its own graph over `representative`, `phoneint8.int8_conversions`).
        representative: for int8, a NumPy array of raw images `[N, H, W, C]`.
        int8_cache: for int8, a folder that keeps each task's int8 model (`_int8_cache_keys`), so
            a file with one more task makes that task's alone.

    Returns:
        The file's size in bytes. Run it with `PhoneTasks(output_path).task(name)(image=x)`.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"a phone file is {', '.join(QUANTIZE[:-1])} or {QUANTIZE[-1]}. "
                         f"Received: quantize={quantize!r}")
    if int8_cache and quantize != "int8":
        raise ValueError(f"int8_cache keeps int8 tasks; this file is {quantize}. Received: int8_cache={int8_cache}")
    if quantize == "int8" and (representative is None or len(representative) == 0):
        raise ValueError("an int8 phone file calibrates each task's activations: pass a representative dataset "
                         "(--representative=DATASET_SPEC)")
    tolerance = {"none": 1e-5, "float16": 2e-3, "int8": 2e-2}[quantize]
    names, paths = named_tasks(task_paths)
    models = [load_task(path, backbone) for path in paths]
    classes = [int(m.output_shape[-1]) for m in models]
    if quantize == "int8":
        # each task's own activation ranges (`phoneint8.int8_conversions`); pad logits 0: inside
        # every calibrated range (which always holds 0); probabilities renormalized
        unmasked = [(None, _kernel_masks(m)) for m in models]
        heads = [_padded_head(m, max(classes), 0.0) if _owns_head_only(m) else None for m in models]
        keys = _int8_cache_keys(backbone, models, max(classes), representative) if int8_cache else [None] * len(models)
        cached = [_read_if_there(os.path.join(int8_cache, f"{key}.tflite")) if key else None for key in keys]
        files = int8_conversions(lambda: _padded(_unmasked(models[0])[0], max(classes), 0.0),
                                 [m for _, m in unmasked], heads,
                                 lambda t: _padded(_unmasked(models[t], keep_masks=True)[0], max(classes), 0.0),
                                 representative, cached)
        for key, file, hit in zip(keys, files, cached):
            if key and hit is None:
                write_atomic(os.path.join(int8_cache, f"{key}.tflite"), lambda f, file=file: f.write(file))
    else:
        unmasked = [_unmasked(m) for m in models]
        # One column more than the widest task where the heads allow it: a head bias of zeros (a new
        # task's) is left out by the converter, which would give that task another graph.
        width = max(classes) + all(_width_key(m.layers[-1]) for m in models)
        files = [model_flatbuffer(_padded(plain, width), quantize) for plain, _ in unmasked]
    converted = [schema.Model.GetRootAs(file) for file in files]
    tensors = tensor_list(converted[0])
    for name, other in zip(names[1:], converted[1:]):
        if [t[1:3] for t in tensor_list(other)] != [t[1:3] for t in tensors]:
            raise ValueError(f"the TFLite converter made another graph for task {name!r} than for {names[0]!r}; "
                             "export the tasks to separate files")
    kernels = {path: value for _, masks in unmasked for path, (value, _, _) in masks.items()}
    if quantize == "int8":
        base, filters, own, tasks, payload = int8_tasks(names, classes, [m for _, m in unmasked], converted,
                                                         kernels, tolerance)
        for task in tasks:
            coarse = [(levels, filters[f]["path"]) for f, levels in enumerate(task["levels"]) if levels < COARSE_LEVELS]
            if coarse:
                logging.warning("int8 phone file: task %r keeps fewer than %d of int8's 127 levels in %d filter(s), "
                                "fewest %d in %s: its mask zeroes their channels' largest weights, and the file "
                                "quantizes a filter once, at the backbone's scale (its own int8 file keeps 127)",
                                task["name"], COARSE_LEVELS, len(coarse), *min(coarse))
    else:
        base, (filters, own, tasks, payload) = converted[0], _float_tasks(
            names, classes, [m for _, m in unmasked], converted, kernels, tolerance)
    flatbuffer = _with_table(base, len(files[0]), tensors, filters, own, tasks, payload, quantize)
    write_atomic(output_path, lambda f: f.write(flatbuffer))
    return len(flatbuffer)


def _int8_cache_keys(backbone, models, classes, representative):
    """Per task, the SHA-256 of what its int8 model depends on: its manifest as loaded (which holds
    every array's SHA-256, checked at loading), the backbone's fingerprint, the file's class count
    (its padded head), the representative images' bytes, TensorFlow's version and
    `INT8_CACHE_FORMAT` (the way it is made)."""
    images = sha256(np.asarray(representative, np.float32))
    common = [INT8_CACHE_FORMAT, tf.__version__, fingerprint(backbone), int(classes), images]
    return [hashlib.sha256(json.dumps([*common, m.manifest], sort_keys=True).encode()).hexdigest() for m in models]


def _read_if_there(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _float_tasks(names, classes, task_masks, converted, kernels, tolerance):
    """Float32/float16: `(filters, own, tasks, payload)`, every task against the first's conversion."""
    base = converted[0]
    tensors = tensor_list(base)
    filters, where = [], {}
    for path, kernel in kernels.items():
        found = locate(base, tensors, kernel, tolerance)
        if found is None or found[0] in where:
            raise refused(path)
        where[found[0]] = len(filters)
        filters.append({"path": path, "tensor_index": found[0], "layout": found[1]})
    own = {}  # (tensor index, "data") -> own entry, for non-filter tensors some task changes
    payload, tasks = Payload(), []
    for name, count, masks, model in zip(names, classes, task_masks, converted):
        task = {"name": name, "classes": count, "mask_type": None, "masks": [], "scales": [], "own": []}
        for i, ((tensor_name, shape, dtype, buffer), (_, _, _, theirs)) in enumerate(zip(tensors, tensor_list(model))):
            mine, data = buffer_data(base, buffer), buffer_data(model, theirs)
            if mine is None or data is None:
                continue
            if i in where:
                entry = filters[where[i]]
                add_mask(task, payload, entry, where[i], masks)
                if not np.array_equal(mine, data):
                    q = channel_scale(mine.view(DTYPES[dtype]).reshape(shape), data.view(DTYPES[dtype]).reshape(shape),
                                       entry["layout"][1], tolerance)
                    if q is None:
                        raise ValueError(f"task {name!r} changes filter {tensor_name!r} beyond a per-channel scale")
                    task["scales"].append({"filter": where[i], "at": payload.add(q)})
            elif not np.array_equal(mine, data):
                own.setdefault((i, "data"), len(own))
                task["own"].append({"own": own[i, "data"], "at": payload.add(data)})
        tasks.append(task)
    return filters, own, tasks, payload


def _with_table(base, size, tensors, filters, own, tasks, payload, quantize):
    """The base model's flatbuffer with each patched tensor on a buffer of its own and the table
    (`METADATA`) as one more buffer, followed by the payload (aligned to `ALIGN`); every offset in
    the table is a file offset, and `model_bytes` is where the model ends (what a switch copies)."""
    model = editable(base)
    model.signatureDefs[0].signatureKey = SIGNATURE  # the converter names one function serving_default
    graph, buffers = model.subgraphs[0], model.buffers
    patched = [f["tensor_index"] for f in filters] + [i for i, field in own if field == "data"]
    split_shared(model, patched)
    table_buffer = AlignedBuffer()
    buffers.append(table_buffer)
    model.metadata = (model.metadata or []) + [schema.MetadataT()]
    model.metadata[-1].name, model.metadata[-1].buffer = METADATA, len(buffers) - 1

    def table(offsets):
        def at(span):
            return {"offset": offsets["payload"] + span[0], "bytes": span[1]}
        return {
            "format": FORMAT, "version": VERSION, "signature": SIGNATURE, "quantize": quantize,
            "model_bytes": offsets["model_bytes"],
            "filters": [{"tensor": tensors[f["tensor_index"]][0], **offsets[f["tensor_index"]],
                         "dtype": np.dtype(DTYPES[tensors[f["tensor_index"]][2]]).name,
                         "shape": [int(s) for s in tensors[f["tensor_index"]][1]], "layout": f["layout"][2],
                         "channel_axis": f["layout"][1], "keras_kernel": f["path"]} for f in filters],
            "own": [{"tensor": tensors[key[0]][0], "field": key[1], **offsets[key]} for key in own],
            "tasks": [{"name": t["name"], "classes": t["classes"], "mask_type": t["mask_type"] or "binary",
                       "masks": [{"filter": m["filter"], **at(m["at"])} for m in t["masks"]],
                       "scales": [{"filter": s["filter"], **at(s["at"])} for s in t["scales"]],
                       "own": [{"own": o["own"], **at(o["at"])} for o in t["own"]],
                       **({"levels": t["levels"]} if "levels" in t else {})} for t in tasks]}

    def pack(text):
        table_buffer.data = np.frombuffer(text, np.uint8)
        builder = flatbuffers.Builder(size + len(text) + 2 ** 20)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return builder.Output()

    # Offsets are known once packed: pack with a table as long as the final one can be, read the
    # offsets, then write the final table over it (space-padded JSON: the layout is unchanged).
    width = len(json.dumps(table({"payload": 10 ** 15, "model_bytes": 10 ** 15,
                                  **{key: {"offset": 10 ** 15, "bytes": 10 ** 15} for key in [*patched, *own]}})).encode())
    packed = bytearray(pack(b" " * width))
    offsets = buffer_spans(packed)
    spans = {i: {"offset": offsets[graph.tensors[i].buffer][0], "bytes": offsets[graph.tensors[i].buffer][1]}
             for i in patched}
    spans.update({key: spans[key[0]] if key[1] == "data" else vector_span(packed, *key) for key in own})
    start = -len(packed) % ALIGN + len(packed)
    text = json.dumps(table({"payload": start, "model_bytes": len(packed), **spans})).encode()
    packed[offsets[-1][0]:offsets[-1][0] + width] = text.ljust(width)
    return bytes(packed) + bytes(start - len(packed)) + payload.array().tobytes()


def read_table(content):
    """The table (a dict) of a phone file's bytes; raises ValueError for another file."""
    model = schema.Model.GetRootAs(content)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name().decode() == METADATA:
            table = json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
            if table.get("format") == FORMAT and table.get("version") == VERSION:
                return table
    raise ValueError(f"not a {FORMAT} file (version {VERSION}): export it with export/tflite.py --phone")


class PhoneTasks:
    """A multi-task phone file: `task(name)` returns a runner; a call on a task other than the
    active one first builds its interpreter from a patched copy of the file's bytes.

    Example:
    >>> import numpy as np, tf_piggyback as pb
    >>> for name, classes in (("upper", 10), ("inverted", 5)):
    ...     _ = pb.save_task(pb.piggyback(pb.digits_backbone(), classes), f"{name}.npz")
    >>> export_phone(pb.digits_backbone(), ["upper=upper.npz", "inverted=inverted.npz"], "tasks.tflite") > 0
    True
    >>> tasks = PhoneTasks("tasks.tflite")
    >>> tasks.task("inverted")(image=np.zeros((1, 32, 32, 1), "float32"))["logits"].shape
    (1, 5)
    """

    def __init__(self, path, num_threads=None):
        self.path = path
        self._stat = file_stat(path)  # before the mapping: a change after it is seen at the next switch
        with open(path, "rb") as f:
            self._bytes = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.table = read_table(self._bytes)
        self.names = [t["name"] for t in self.table["tasks"]]
        self._num_threads = num_threads
        self._lock = threading.RLock()
        self.active, self._runner = None, None

    def task(self, name):
        """A function `(**inputs) -> {"logits", "probabilities"}` for task `name`."""
        if name not in self.names:
            raise ValueError(f"no task {name!r} in this file; it holds {', '.join(self.names)}")
        classes = self.table["tasks"][self.names.index(name)]["classes"]

        def run(**inputs):
            with self._lock:
                if self.active != name:
                    self.switch(name)
                out = self._runner(**inputs)
            result = {key: value[..., :classes] for key, value in out.items()}
            if self.table["quantize"] == "int8" and out["probabilities"].shape[-1] > classes:
                # int8 pads with logits 0 (a logit of -1e9 would take the logits' whole range)
                total = result["probabilities"].sum(-1, keepdims=True)
                result["probabilities"] = result["probabilities"] / np.maximum(total, 1e-30)
            return result

        return run

    def switch(self, name):
        """Builds task `name`'s interpreter (the previous one is released first)."""
        from ai_edge_litert.interpreter import Interpreter

        with self._lock:
            self.active, self._runner = None, None
            self._check_unchanged()
            content = patched(self._bytes, self.table, name)
            interpreter = Interpreter(model_content=content, num_threads=self._num_threads)
            self._runner = interpreter.get_signature_runner(self.table["signature"])
            self.active = name
            if hasattr(mmap, "MADV_DONTNEED"):  # the file's pages are read again only at the next switch
                self._bytes.madvise(mmap.MADV_DONTNEED)


    def _check_unchanged(self):
        """Raises a one-line ValueError if the file was rewritten or replaced since it was opened:
        its mapped bytes would be read at stale offsets, or past a truncated end (SIGBUS)."""
        try:
            now = file_stat(self.path)
        except OSError:
            now = None
        if now != self._stat:
            raise ValueError(f"{self.path} changed since it was opened (rewritten, replaced or removed): open it "
                             "again, PhoneTasks(path), to serve the new file")


def patched(content, table, name):
    """The model's bytes (the file's up to `model_bytes`, without the payload) with task `name`
    written in: for each filter, its stored values (times the task's per-channel scale, if any)
    times its mask, and the task's own tensors."""
    task = next(t for t in table["tasks"] if t["name"] == name)
    filters = table["filters"]

    def span(entry, dtype=np.uint8):
        return np.frombuffer(content, dtype, entry["bytes"] // np.dtype(dtype).itemsize, entry["offset"])

    writes = {table["own"][o["own"]]["offset"]: span(o) for o in task["own"]}
    scales = {s["filter"]: span(s, np.float32) for s in task["scales"]}
    masks = {m["filter"]: m for m in task["masks"]}
    for index in sorted(set(scales) | set(masks)):
        entry = filters[index]
        values = span(entry, np.dtype(entry["dtype"])).reshape(entry["shape"])
        if index in scales:
            shape = [1] * len(entry["shape"])
            shape[entry["channel_axis"]] = -1
            values = (values * scales[index].reshape(shape)).astype(values.dtype)
        if index in masks:
            mask = coding.unpack(span(masks[index]), values.size, task["mask_type"]).reshape(values.shape)
            if values.dtype == np.float16:  # NumPy multiplies float16 in software: select and negate (exact)
                values = np.where(mask != 0, values, np.float16(0))
                values = np.where(mask < 0, -values, values) if task["mask_type"] == "ternary" else values
            else:
                values = values * mask
        writes[entry["offset"]] = values
    pieces, at = [], 0
    view = memoryview(content)[:table["model_bytes"]]
    for offset in sorted(writes):
        pieces += [view[at:offset], writes[offset]]
        at = offset + writes[offset].nbytes
    pieces.append(view[at:])
    return b"".join(pieces)
