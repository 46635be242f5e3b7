"""Many tasks over one backbone, served at the cost of their task files (BUILD.md, "Many tasks in one SavedModel").

A `TaskBank` holds one backbone and any number of task files. The backbone's graph is traced
once; a task is data, not a graph: its masks packed 1 bit per parameter (2 for ternary) and
its own weights (head, per-task BatchNormalization). A call for a task reads its masked
kernels `W ⊙ m` from a small, fixed set of working slots (least recently used first out);
a task not in a slot is unpacked with one table gather (tens of ms for ResNet-50's 23M
masked weights) into the slot that was used longest ago. So memory is the backbone, the
packed masks and `slots` float copies of the masked kernels (one more while a slot is being
refilled: its old copy lives until the new one replaces it), whatever the number of tasks.

A bank changes as TensorFlow Serving's models do: a `BankVersion` (the tasks in order, their
layout, the module that serves them) never changes once made; `add` and `remove` make the next
one and swap it in with one assignment, and a call takes one version and uses only it, so it
never pairs one task list with another's module. Versions with one layout share the traced
backbone and the working slots (`graph.BankGraph`): a change retraces no backbone.

The same `tf.Module` is what `export_saved_model` saves for several tasks, so the Python API
and TensorFlow Serving run one implementation; an export keeps each task in files of its own
(`serving.store`) rather than in variables, so a loaded version's memory does not grow with its tasks.

The bank keeps the registry: names, versions and their swap. Reading task files is
`reader.TaskReader`'s; the TensorFlow side is `versions.BankModule`, and how concurrent requests
stay correct is `slots.WorkingSlots`'; what an export saves is `saved_model.bank_signatures`.

Reference: §3, last paragraph (only the thresholded masks are kept); §5 and Table 3 (one
backbone, many tasks at about 1 bit per parameter each).
"""

import concurrent.futures
import dataclasses
import os
import threading

import numpy as np
import tensorflow as tf

from tf_piggyback.core.fingerprint import fingerprint
from tf_piggyback.core.taskfile import TaskFileError, task_name
from tf_piggyback.serving.graph import BankGraph
from tf_piggyback.serving.packing import MAX_UID
from tf_piggyback.serving.reader import TaskReader
from tf_piggyback.serving.store import STORE, Exported
from tf_piggyback.serving.versions import BankVersion

DEFAULT_SLOTS = 2
MIXED_SIGNATURES = ("tasks", "tasks_by_name")


class TaskBank:
    """One backbone, many task files, a bounded set of unpacked working copies.

    Safe to change while it answers from other threads: a call uses the `version` it started
    with; `add`, `add_all` and `remove` are serialized and swap in a new version whole. While
    the bank serves, the next version's module is built and traced before it is swapped in,
    so calls do not wait for it.

    Args:
        backbone: the backbone every task was trained on (fingerprints are checked against
            the one computed here: the bank takes the backbone as it is now, as frozen); an
            image backbone, or one that takes a dict (keras-hub's text backbones: the bank's
            functions then take its inputs by name).
        slots: how many tasks' masked kernels are kept unpacked (floats) at once; >= 1.

    Example:
    >>> import numpy as np, tf_piggyback as pb
    >>> manifest = pb.save_task(pb.piggyback(pb.digits_backbone(), num_classes=5), "upper/task.npz")
    >>> bank = TaskBank(pb.digits_backbone(), slots=2)
    >>> bank.add("upper/task.npz")
    'upper'
    >>> images = np.zeros((4, 32, 32, 1), np.float32)
    >>> bank.predict(images, task="upper").shape
    (4, 5)

    Reference: §3 and §5 (one backbone, a mask per task).
    """

    def __init__(self, backbone, slots=DEFAULT_SLOTS):
        if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1. Received: slots={slots!r}")
        self.backbone = backbone
        self.slots = int(slots)
        self.fingerprint = fingerprint(backbone)
        self._version = BankVersion()  # replaced whole, never changed: calls read it once
        self._next_uid = 0
        self._graph = (None, None)  # (layout key, BankGraph) of the latest version, shared by the next of that layout
        self._reader = TaskReader(backbone, self.fingerprint)  # task files -> BankTasks
        self._changing = threading.Lock()  # add / remove, one at a time
        self._building = threading.Lock()  # one BankGraph a layout

    # ---- the set of tasks -------------------------------------------------------------------
    @property
    def version(self):
        """The current `BankVersion`: a snapshot that later changes leave as it is."""
        return self._version

    @property
    def records(self):
        """The bank's `BankTask`s, in order."""
        return list(self._version.tasks)

    @property
    def feature_layer(self):
        """The backbone layer whose output feeds every served task's head (None: its output)."""
        return self._version.feature_layer

    @property
    def names(self):
        return self._version.names

    def index(self, name):
        return self._version.index(name)

    def tasks(self):
        """One dict per task, as `listing` lists them: `name`, `num_classes`, `class_names`,
        `method`, `mask_type`, `features` (the head's input width), `sparsity`, `image_size`,
        `packed_bytes`, `source_sha256` and `source_stat` (of the task file), `blob` (in files)."""
        return self.listing()["tasks"]

    def add(self, path, name=None):
        """Adds a task file; returns its name (default from the path, `taskfile.task_name`)."""
        return self.add_all([path], [name])[0]

    def add_all(self, paths, names=None, workers=None, previous=None, store=None):
        """Adds task files in order; returns their names (`add`'s defaults). If one cannot be
        added, none is.

        The files are read and their masks decoded and packed on `workers` threads (default one
        per CPU, at most one per file): NumPy releases the GIL there, and it is most of an export's time for many tasks
        (measured, 20 ResNet-50 task files on 2 cores: 1.7-2.2x faster than one after another).

        `previous`: a multi-task SavedModel folder that `export_saved_model` wrote. A file whose
        bytes (SHA-256) it lists for this backbone is taken from it, already packed, instead of
        being decoded again: a new version with one more task decodes one file.

        `store`: a folder (an export's `assets/tf_piggyback_tasks`) to write each task's packed
        masks and own weights to as it is read, keeping none of them in memory (`serving.store`): a
        task the latest version holds with the same bytes is linked from it, not written. The
        layout is planned from every file's manifest first, then each file is read once. Only an
        empty bank takes a store: its module is then for export, not for calls.
        """
        names = [name or task_name(path) for path, name in zip(paths, names or [None] * len(paths))]
        with self._changing:
            current = self._version
            if store is not None and current.tasks:
                raise ValueError("a bank whose tasks are in files is written whole: give every task to one add_all")
            taken = set(current.names)
            for name in names:
                if name in taken:
                    raise ValueError(f"a task named {name!r} is already in the bank; name it with NAME=PATH")
                if name in MIXED_SIGNATURES or name == "serving_default":
                    raise ValueError(f"{name!r} is a reserved signature name; name the task with NAME=PATH")
                taken.add(name)
            if self._next_uid + len(paths) - 1 > MAX_UID:
                raise ValueError(f"this bank would be given {self._next_uid + len(paths):,} tasks, more than its slot "
                                 f"ids tell apart ({MAX_UID + 1:,}); make a new TaskBank")
            previous = Exported(previous, self.fingerprint) if previous else None
            plan = self._reader.plan(paths, store, previous) if store is not None else None
            workers = workers or max(1, min(len(paths), os.cpu_count() or 1))
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                read = list(pool.map(lambda path: self._reader.read(path, previous, plan), paths))
            served, layer, variables = current.served, current.feature_layer, current.variables
            for path, (feature_layer, feature_variables, task) in zip(paths, read):
                if task.kind == "alone":
                    continue
                if served and feature_layer != layer:
                    raise TaskFileError(
                        f"{path!r} feeds its head from feature_layer={feature_layer!r}, the bank's tasks from "
                        f"{layer!r}; a bank holds tasks over one feature model")
                if not served:  # one feature model's shapes (per task, they took 67 of 78 s for 10,000 tasks)
                    variables = {p: tuple(v.shape) for p, v in feature_variables.items()}
                served, layer = True, feature_layer
            added = [dataclasses.replace(task, name=name, uid=self._next_uid + i)
                     for i, (name, (*_, task)) in enumerate(zip(names, read))]
            self._next_uid += len(added)
            self._swap(BankVersion(current.tasks + tuple(added), layer, variables))
        return names

    def remove(self, name):
        """Removes a task by name."""
        with self._changing:
            current = self._version
            index = current.index(name)
            self._swap(BankVersion(current.tasks[:index] + current.tasks[index + 1:], current.feature_layer,
                                   current.variables))

    def _swap(self, version):
        """Makes `version` the current one (with the change lock held). While the bank serves (its
        current module is built), the next module is built, traced and run once first (`_warm_up`):
        calls go on with the old version meanwhile, and never wait for the new one."""
        if self._version.built and version.tasks and not any(t.kind == "alone" for t in version.tasks):
            _warm_up(version.module(self._graph_for), version)
        self._version = version

    def _graph_for(self, version):
        """The `BankGraph` for `version`'s layout: the last one made, while the layout is its."""
        key = (version.feature_layer, version.layout, tuple(version.own_paths), version.features)
        with self._building:  # a call's first build and a change's may ask at once: one graph a layout
            if self._graph[0] != key:
                self._graph = key, BankGraph(self.backbone, version.feature_layer, version.layout, version.own_paths,
                                             version.features, self.slots)
            return self._graph[1]

    # ---- serving ----------------------------------------------------------------------------
    @property
    def module(self):
        """The current version's `BankModule`, its functions traced."""
        return self.snapshot()[1]

    def snapshot(self, traced=True):
        """`(version, module)`: the current `BankVersion` and its `BankModule`, which agree (a later
        change swaps in another pair). `traced=False` leaves the module's functions untraced, for
        `tf.saved_model.save` to trace in its own context (`saved_model.bank_signatures`)."""
        version = self._version
        return version, version.module(self._graph_for, traced=traced)

    def predict(self, inputs, task):
        """Logits for `inputs` under `task`: a name or index, or one per example (mixed).

        Args:
            inputs: a batch of images (raw pixels), or for a backbone that takes a dict (keras-hub's
                text backbones) a dict of its inputs (`token_ids`, `padding_mask`, ...) by name.
            task: a task's name or index, or a list of them, one per example.

        Returns:
            `[B, num_classes]` logits for one task; for one task per image, `[B, C_max]`
            logits padded with zeros past each task's class count.
        """
        version, module = self.snapshot()
        inputs = tf.nest.map_structure(lambda spec, value: tf.convert_to_tensor(value, spec.dtype),
                                       module.graph.input_spec(), inputs)
        if isinstance(task, (str, int, np.integer)):
            return module.forward(inputs, tf.constant(version.index(task), tf.int32)).numpy()
        indices = [version.index(t) for t in task]
        return module.mixed(inputs, tf.constant(indices, tf.int32))["logits"].numpy()

    def listing(self):
        """The JSON-ready description of the bank that exports store and `export/list_tasks.py` prints."""
        version = self._version
        listing = {"format": "tf_piggyback.bank", "version": 1, "backbone": {"name": self.backbone.name,
                   "fingerprint": self.fingerprint}, "slots": self.slots,
                   "tasks": [{"name": t.name, **t.info, **({"blob": t.blob} if t.blob else {})} for t in version.tasks]}
        if version.served:  # how masks are packed (`store.Exported` reads them back)
            listing["kernels"] = [list(kernel) for kernel in version.layout.kernels]
        if any(t.blob for t in version.tasks):  # what `store.Exported.claims` reads back
            listing.update(store=STORE, own=version.own_paths, feature_layer=version.feature_layer)
        return listing


def _warm_up(module, version):
    """Runs `module`'s functions once, so that TensorFlow instantiates them here and not in the
    next calls (ResNet-50 at 128 px: 2-4 s in all on 2 cores, after tracing): `forward` and
    `mixed` on one blank example of a task whose kernels a slot holds (no fill, no eviction)."""
    blank = tf.nest.map_structure(lambda spec: tf.zeros([1, *(d or 1 for d in spec.shape[1:])], spec.dtype),
                                  module.graph.input_spec())
    held = set(module.graph.working.slot_uids.numpy().tolist())
    for index, task in enumerate(version.tasks):
        if task.uid in held or task.kind == "none":
            module.forward(blank, tf.constant(index, tf.int32))
            module.mixed(blank, tf.constant([index], tf.int32))
            return
