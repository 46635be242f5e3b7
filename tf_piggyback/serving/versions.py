"""One version of a `TaskBank`: its tasks (`BankTask`), in order, and their layout
(`BankVersion`), never changed once made; and the `BankModule` that serves them: the tasks as
variables (or files) over a shared `graph.BankGraph`, and the functions `forward` (one task)
and `mixed` (a task per example). What a multi-task SavedModel holds. And what a task file gives
a bank: `own_and_head`, `pack_masks`, and `served_alone` for tasks a bank cannot serve.

Reference: §3, last paragraph (only the thresholded masks are kept); §5 (a mask per task).
"""

import dataclasses
import threading

import numpy as np
import tensorflow as tf

from tf_piggyback.core import coding, methods
from tf_piggyback.core.surgery import HEAD_NAME
from tf_piggyback.core.taskfile import TaskFileError
from tf_piggyback.serving.packing import KINDS, PackedLayout, aligned
from tf_piggyback.serving.store import STORE, task_paths


@dataclasses.dataclass(frozen=True)
class BankTask:
    """One task in a bank: what its file holds, laid out for the bank.

    Attributes:
        name: signature / lookup name.
        uid: an id never reused in this bank (slots are tagged with it, `ID_WEIGHTS`).
        kind: "none" (classifier-only), "binary", "ternary" or "alone" (listed only, never served:
            `served_alone`).
        masks: `{backbone kernel path: its mask packed (`coding.pack`), padded to a multiple of
            `packing.ALIGN` values}` (`PackedLayout.pack` lays them out);
            a kernel the task does not mask (`mask_from`) is absent: all ones in the bank.
        own: `{backbone variable path: value}` for per-task BatchNormalization.
        head: `(kernel [F, C], bias [C])` (None for a task served alone, or in files).
        info: manifest summary for listings (classes, head input width `features`, sparsity,
            source file SHA-256).
        blob: the name of the task's files when they hold its masks and own weights
            (`serving.store`; `masks` and `own` then name what the files are written over, with
            values None), else None.
    """

    name: str
    uid: int
    kind: str
    masks: dict
    own: dict
    head: tuple
    info: dict
    blob: str = None


class BankVersion:
    """One state of a bank, never changed once made: its tasks in order, the layout their masks
    are packed with, and the `BankModule` that serves them (built once, on first use).

    Attributes:
        tasks: the `BankTask`s, in order (a tuple).
        feature_layer: the backbone layer whose output feeds every served task's head.
        variables: `{path: shape}` of the feature model's variables, in its order.
        layout: the `PackedLayout` of the kernels any task masks, in the backbone's order
            (the same set of tasks gives the same layout in any order).
    """

    def __init__(self, tasks=(), feature_layer=None, variables=None):
        self.tasks = tuple(tasks)
        self.feature_layer = feature_layer
        self.variables = dict(variables or {})
        masked = {p for t in self.tasks for p in t.masks}
        self.layout = PackedLayout(tuple((p, int(np.prod(shape))) for p, shape in self.variables.items() if p in masked))
        self._module = None
        self._traced = False
        self._building = threading.Lock()  # concurrent first calls build and trace one module, once

    @property
    def names(self):
        return [task.name for task in self.tasks]

    @property
    def served(self):
        """Whether any task is served from the bank (not listed only)."""
        return any(t.kind != "alone" for t in self.tasks)

    @property
    def features(self):
        """The heads' input width (0 if no task is served)."""
        return next((t.info["features"] for t in self.tasks if t.kind != "alone"), 0)

    @property
    def own_paths(self):
        """The weights some task owns (per-task normalization), in the feature model's order."""
        owned = {p for t in self.tasks for p in t.own}
        return [p for p in self.variables if p in owned]

    def packed(self, task):
        """`task`'s masks over this version's layout, with its uid (`PackedLayout.pack`)."""
        return self.layout.pack(task.masks, task.kind, task.uid)

    def index(self, name):
        """A task's index by name (or an index, checked)."""
        if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
            if not 0 <= name < len(self.tasks):
                raise ValueError(f"task index {name} is out of range; the bank has {len(self.tasks)} tasks")
            return int(name)
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"no task named {name!r}; the bank has {', '.join(self.names) or 'no tasks'}") from None

    @property
    def built(self):
        return self._module is not None

    def module(self, graph, traced=True):
        """The version's `BankModule` over `graph(version)` (a `BankGraph`), built once; its
        functions traced for calls when `traced` (a tf.function's concurrent first calls would
        each trace it; `saved_model.bank_signatures` leaves tracing to `tf.saved_model.save`)."""
        if not self.tasks:
            raise ValueError("the bank has no tasks; add a task file first")
        with self._building:
            if self._module is None:
                self._module = BankModule(graph(self), self.layout, self.tasks)
            if traced and not self._traced:
                self._module.forward.get_concrete_function()
                self._module.mixed.get_concrete_function()
                self._traced = True
            return self._module


class BankModule(tf.Module):
    """One version of a bank: its tasks as variables over a shared `BankGraph`, and the functions
    that serve them, `forward` (one task) and `mixed` (a task per example). Never changed once
    built: a bank with other tasks is another `BankModule` (`TaskBank` swaps them whole).

    The tasks are in variables, or, for an export, in files (`blob`, `store`): then filling a
    slot reads its task's packed masks and own weights from its files (`BankGraph.kernels`,
    `BankGraph.own`), so memory holds no task's masks whatever the number of tasks, and a warm
    call reads no file. The files are in the folder beside the asset
    `listing` (`assets/`), which `saved_model.export_saved_model` sets before it saves the module.

    It tracks raw `tf.Variable`s only, never Keras objects: a SavedModel that tracks Keras
    variables loads in TF2 but not in TF1-style loaders such as TensorFlow Serving.

    Args:
        graph: the `BankGraph` of the tasks' layout.
        layout: the `PackedLayout` the tasks' masks are packed with.
        tasks: the version's `BankTask`s, in order (none served alone).
    """

    def __init__(self, graph, layout, tasks):
        super().__init__()
        alone = [t for t in tasks if t.kind == "alone"]
        if alone:
            raise ValueError(f"task {alone[0].name!r} {alone[0].info['alone']}; export it on its own")
        self.graph = graph
        self.refills = graph.working.refills  # `loaded.refills`, as the serving bench reads it
        on_disk = any(t.blob for t in tasks)
        self.spec = dataclasses.replace(graph.spec, store=STORE if on_disk else None)

        # Shaped [None]: the traced functions do not depend on how many tasks there are or which
        # (a new version of the bank can keep the last one's graph: `saved_model.export_saved_model`).
        def per_task(value, dtype, name=None):
            return tf.Variable(tf.constant(value, dtype), shape=tf.TensorShape([None]), trainable=False, name=name)

        if on_disk:  # each task's file name, and its id's packed entries in 4 bytes (2 used for binary masks)
            self.blobs = per_task([t.blob for t in tasks], tf.string, "blobs")
            self.ids = per_task(np.concatenate([np.resize(layout.id_bytes(t.uid, t.kind if t.kind != "none" else "binary"), 4)
                                                for t in tasks]), tf.uint8, "ids")
        else:  # per task: own weights (per-task normalization, then the head) one segment each, packed masks
            values = graph.own_defaults
            segments = [np.concatenate([t.own.get(p, values[p]).ravel() for p, _, _ in self.spec.own]
                                       + [t.head[0].ravel(), t.head[1].ravel()]) for t in tasks]
            packed = [layout.pack(t.masks, t.kind, t.uid) for t in tasks]
            self.own = per_task(np.concatenate(segments), tf.float32, "own")
            self.own_offsets = per_task(np.cumsum([0] + [s.size for s in segments]), tf.int64)
            self.packed = per_task(np.concatenate(packed), tf.uint8, "packed")
            self.packed_offsets = per_task(np.cumsum([0] + [p.size for p in packed]), tf.int64)
        self.kinds = per_task([KINDS[t.kind] for t in tasks], tf.int32)
        self.uids = per_task([float(t.uid) for t in tasks], tf.float32)
        self.num_classes = per_task([t.info["num_classes"] for t in tasks], tf.int32)
        self.names = per_task([t.name for t in tasks], tf.string)

        inputs = graph.input_spec()
        self.forward = tf.function(self._forward, input_signature=[inputs, tf.TensorSpec([], tf.int32)], autograph=False)
        self.mixed = tf.function(self._mixed, input_signature=[inputs, tf.TensorSpec([None], tf.int32)], autograph=False)
        self.lookup = tf.function(self._lookup, input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)

    def _forward(self, inputs, task):
        """The task's logits for `inputs` (an image batch, or a dict of the backbone's inputs): its
        kernels from a slot (stateful), then `compute` (stateless)."""
        graph, kind = self.graph, self.kinds[task]
        if self.spec.store:  # the task's files, in the folder beside the listing asset
            folder = tf.strings.regex_replace(self.listing.asset_path, "[^/\\\\]*$", "") + self.spec.store + "/"
            masks, own_file = task_paths(folder, self.blobs[task])
            own = graph.own(lambda: tf.io.decode_raw(tf.io.read_file(own_file), tf.float32), self.uids[task])

            def packed():
                ids = self.ids[4 * task:4 * task + tf.where(tf.equal(kind, KINDS["binary"]), 2, 4)]
                return tf.concat([tf.io.decode_raw(tf.io.read_file(masks), tf.uint8), ids], 0)
        else:
            own = self.own[self.own_offsets[task]:self.own_offsets[task + 1]]

            def packed():
                return self.packed[self.packed_offsets[task]:self.packed_offsets[task + 1]]
        kernels = graph.kernels(packed, kind, self.uids[task])
        return graph.compute(inputs, kernels, graph.shared.read_value(), own, self.num_classes[task],
                             [variable.read_value() for variable in graph.non_float32])

    def _lookup(self, names):
        """Task names -> indices; an unknown name is an InvalidArgument error naming the tasks."""
        matches = tf.equal(names[:, None], self.names[None, :])
        check = tf.debugging.assert_equal(tf.reduce_all(tf.reduce_any(matches, axis=1)), True,
                                          message="unknown task name; the model's tasks are its signature names")
        with tf.control_dependencies([check]):
            return tf.cast(tf.argmax(tf.cast(matches, tf.int32), axis=1), tf.int32)

    def _mixed(self, inputs, task):
        """One task per example: examples are grouped by task, each group runs once."""
        check = tf.debugging.assert_equal(
            tf.reduce_all(tf.logical_and(task >= 0, task < tf.size(self.num_classes))), True,
            message="task index out of range")
        with tf.control_dependencies([check]):
            task = tf.identity(task)
        widest = tf.reduce_max(self.num_classes)
        batch = tf.shape(tf.nest.flatten(inputs)[0])[0]
        groups, group_of = tf.unique(task)

        def body(i, logits, probabilities):
            rows = tf.where(tf.equal(group_of, i))
            out = self.forward(tf.nest.map_structure(lambda t: tf.gather_nd(t, rows), inputs), groups[i])
            pad = [[0, 0], [0, widest - tf.shape(out)[1]]]
            logits = tf.tensor_scatter_nd_update(logits, rows, tf.pad(out, pad))
            probabilities = tf.tensor_scatter_nd_update(
                probabilities, rows, tf.pad(tf.nn.softmax(out, axis=-1), pad))
            return i + 1, logits, probabilities

        zeros = tf.zeros([batch, widest])
        _, logits, probabilities = tf.while_loop(
            lambda i, *_: i < tf.size(groups), body, (tf.constant(0), zeros, zeros),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([None, None]), tf.TensorShape([None, None])))
        return {"logits": logits, "probabilities": probabilities, "num_classes": tf.gather(self.num_classes, task)}


def own_and_head(record, variables):
    """`(BankTask.own, BankTask.head)` of a task file: its per-task backbone weights by path,
    and its Dense head's kernel and bias."""
    own, heads = {}, []
    head = record.manifest.get("head_name", HEAD_NAME)  # another name where the backbone has a "head"
    for name in record.weight_names:
        if name.startswith(f"{head}/"):
            heads.append(np.asarray(record.weight(name), np.float32))
        elif name not in variables:
            raise TaskFileError(f"{record.path!r}: task weight {name} does not fit this backbone")
        else:
            own[name] = np.asarray(record.weight(name, variables[name].shape), np.float32)
    num_classes = record.manifest["num_classes"]
    if len(heads) != 2 or heads[0].ndim != 2 or heads[0].shape[1] != num_classes:
        raise TaskFileError(f"{record.path!r} has no Dense head of {num_classes} classes")
    return own, (heads[0], heads[1])

def pack_masks(record, variables, packed=None):
    """`(kind, BankTask.masks)` of a task file's masks, by the path of the kernel each masks;
    taken from `packed` (`{path: packed mask}` of the same file, `store.Exported.masks`) when given,
    else decoded (most of what adding a task costs)."""
    if not record.mask_names:
        return "none", {}
    kind = record.manifest["options"].get("mask_type", "binary")
    masks = {}
    for name in record.mask_names:
        if name not in variables:
            raise TaskFileError(f"{record.path!r} masks {name}, which the backbone does not have (a bank "
                                "finds kernels by name: give the backbone's layers fixed names)")
        if packed is not None and name in packed:
            masks[name] = packed[name]
            continue
        mask = record.mask(name, variables[name].shape).ravel()
        if mask.size != aligned(mask.size):
            mask = np.pad(mask, (0, aligned(mask.size) - mask.size))
        masks[name] = coding.pack(mask, kind)
    return kind, masks


def served_alone(manifest):
    """Why a task cannot share a bank's one traced backbone and Dense heads (None if it can)."""
    reason = methods.get(manifest["method"]).served_alone(manifest)
    if reason:
        return reason
    if "head" in manifest.get("options", {}):
        return "has its own head layers (options.head), and a bank serves Dense heads over pooled features"
    return None
