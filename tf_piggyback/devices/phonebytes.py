"""The bytes of a phone file (BUILD.md, "Many tasks in one phone file"): reading and writing a
TFLite flatbuffer through the schema `ai_edge_litert` ships (tensors, buffers, quantization
vectors, where each sits in the file) and the payload of packed masks (an int8 file's tasks:
`phoneint8`).

Reference: Mallya et al., ECCV 2018, §3 (`W ⊙ m`, 1 bit per parameter per task), §5.3 (per-task
BatchNormalization).
"""

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from tf_piggyback.core import coding

ALIGN = 16  # every buffer's data, as the TFLite converter aligns them
DTYPES = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.FLOAT16: np.float16,
          schema.TensorType.INT8: np.int8}
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


def locate(model, tensors, kernel, tolerance):
    """The tensor whose constant data is `kernel` in one of `LAYOUTS` (times a per-channel scale,
    where the converter folded a BatchNormalization): `(tensor index, layout)`, or None."""
    for layout in LAYOUTS.get(kernel.ndim, []) + [((tuple(range(kernel.ndim))), kernel.ndim - 1, "keras")]:
        candidate = in_layout(kernel, layout)
        for index, (_, shape, dtype, buffer) in enumerate(tensors):
            if shape != candidate.shape or dtype not in DTYPES:
                continue
            data = buffer_data(model, buffer)
            if data is None or data.size != candidate.nbytes // 4 * np.dtype(DTYPES[dtype]).itemsize:
                continue
            if holds(candidate, data.view(DTYPES[dtype]).reshape(shape), layout[1], tolerance):
                return index, layout
    return None


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


def editable(model):
    """`schema.ModelT` of a flatbuffer's model (`schema.Model`) whose buffers are `AlignedBuffer`s,
    so that packing it keeps every buffer's data aligned."""
    objects = schema.ModelT.InitFromObj(model)
    buffers = [AlignedBuffer() for _ in objects.buffers]
    for mine, theirs in zip(buffers, objects.buffers):
        mine.data = theirs.data
    objects.buffers = buffers
    return objects


def split_shared(objects, indices):
    """Gives each tensor of `indices` (in an `editable` model's first subgraph) whose buffer the
    converter shares between equal constants (a random backbone's zero biases) a copy of its own,
    so that writing one tensor's data leaves the others'."""
    graph = objects.subgraphs[0]
    users = np.bincount([t.buffer for g in objects.subgraphs for t in g.tensors], minlength=len(objects.buffers))
    for index in indices:
        if users[graph.tensors[index].buffer] > 1:
            copy = AlignedBuffer()
            copy.data = np.array(objects.buffers[graph.tensors[index].buffer].data)
            graph.tensors[index].buffer = len(objects.buffers)
            objects.buffers.append(copy)


def packed(objects, size):
    """The flatbuffer bytes of an `editable` model (`size`: about how many bytes it takes)."""
    builder = flatbuffers.Builder(size + 2 ** 20)
    builder.Finish(objects.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def vector_span(flatbuffer, index, field):
    """`{"offset", "bytes"}` of a tensor's quantization `scale`, `zero_point`, `min` or `max` vector."""
    quantization = schema.Model.GetRootAs(flatbuffer).Subgraphs(0).Tensors(index).Quantization()
    vector = {"scale": quantization.ScaleAsNumpy, "zero_point": quantization.ZeroPointAsNumpy,
              "min": quantization.MinAsNumpy, "max": quantization.MaxAsNumpy}[field]()
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
