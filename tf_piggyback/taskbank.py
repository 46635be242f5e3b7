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
backbone and the working slots (`bankmodule.BankGraph`): a change retraces no backbone.

The same `tf.Module` is what `export_saved_model` saves for several tasks, so the Python API
and TensorFlow Serving run one implementation; an export keeps each task in files of its own
(`bankstore`) rather than in variables, so a loaded version's memory does not grow with its tasks.

The TensorFlow side, and how concurrent requests stay correct, is `bankmodule.BankModule`.

Reference: §3, last paragraph (only the thresholded masks are kept); §5 and Table 3 (one
backbone, many tasks at about 1 bit per parameter each).
"""

import concurrent.futures
import dataclasses
import os
import threading

import numpy as np
import tensorflow as tf

from tf_piggyback.bankgraph import MAX_UID, BankGraph, PackedLayout
from tf_piggyback.bankmodule import BankTask, BankVersion, own_and_head, pack_masks, served_alone
from tf_piggyback.bankstore import STORE, Exported, Plan, blob_name, write_blob
from tf_piggyback.files import file_stat, read_npz_manifest
from tf_piggyback.fingerprint import fingerprint
from tf_piggyback.surgery import HEAD_NAME, feature_model
from tf_piggyback.taskfile import FORMAT, VERSION, TaskFileError, TaskRecord, task_name

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
        self._feature_variables = {}  # feature_layer -> {path: variable}, built once each
        self._changing = threading.Lock()  # add / remove, one at a time
        self._reading = threading.Lock()  # add_all's threads build a feature model once; one BankGraph a layout

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
        masks and own weights to as it is read, keeping none of them in memory (`bankstore`): a
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
            plan = self._plan(paths, store, previous) if store is not None else None
            workers = workers or max(1, min(len(paths), os.cpu_count() or 1))
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                read = list(pool.map(lambda path: self._read(path, previous, plan), paths))
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
        with self._reading:  # a call's first build and a change's may ask at once: one graph a layout
            if self._graph[0] != key:
                self._graph = key, BankGraph(self.backbone, version.feature_layer, version.layout, version.own_paths,
                                             version.features, self.slots)
            return self._graph[1]

    def _plan(self, paths, store, previous):
        """The `bankstore.Plan` for `add_all`'s `store`: the kernels any task masks and the
        weights any owns, read from the files' manifests alone, or for a file `previous` recorded
        as it is now, from what `previous.claims` for it (nothing is read)."""
        masked, owned, layer = set(), set(), None
        for path in paths:
            entry = previous.entry(file_stat(path)) if previous is not None else None
            if entry is not None:
                layer = previous.feature_layer
                claimed = previous.claims(entry)
                masked.update(claimed[0])
                owned.update(claimed[1])
                continue
            manifest = read_npz_manifest(path, FORMAT, VERSION)
            if not served_alone(manifest):
                layer = manifest.get("options", {}).get("feature_layer")
                head = manifest.get("head_name", HEAD_NAME)
                masked.update(entry["name"] for entry in manifest["layers"])
                owned.update(w["name"] for w in manifest["weights"] if not w["name"].startswith(f"{head}/"))
        variables = self._feature_model_variables(layer)
        layout = PackedLayout(tuple((p, int(np.prod(v.shape))) for p, v in variables.items() if p in masked))
        own_paths = [p for p in variables if p in owned]
        return Plan(store, layout, own_paths, sum(int(np.prod(variables[p].shape)) for p in own_paths))

    def _read(self, path, previous=None, plan=None):
        """`(feature_layer, {path: variable} of its feature model, BankTask)` of a task file, not
        yet named or numbered (`add_all` runs this on several threads at once); from `previous`
        (an `Exported`) when it holds the file's task; into files when `plan` (`_plan`) says
        where. The file is read once: its SHA-256 is that of the bytes decoded (`TaskRecord.sha256`).
        Into files, a task file that is as `previous` recorded it (`_unchanged`) is not read."""
        stat = file_stat(path)  # before the read: a file changed after it is read again next time
        if plan is not None and previous is not None:
            unchanged = self._unchanged(path, stat, previous, plan)
            if unchanged:
                return unchanged
        record = TaskRecord(path, self.backbone, fingerprint=self.fingerprint)
        manifest = record.manifest
        feature_layer = manifest.get("options", {}).get("feature_layer")
        alone = served_alone(manifest)
        blob = None
        if alone:  # listed (a single-task export's listing), never served (see BankModule): nothing to lay out
            variables, kind, masks, own, head = None, "alone", {}, {}, None
        else:
            variables = self._feature_model_variables(feature_layer)
            own, head = own_and_head(record, variables)
            if plan is not None:
                blob, kind, masks, own, nbytes = self._store(record, variables, previous, plan, own, head)
            else:
                packed = previous.masks(record.sha256) if previous is not None and record.mask_names else None
                kind, masks = pack_masks(record, variables, packed)
        info = {"num_classes": int(manifest["num_classes"]), "class_names": manifest.get("class_names"),
                "method": manifest["method"], "mask_type": kind, "sparsity": float(manifest.get("sparsity", 0.0)),
                "image_size": manifest.get("image_size"),
                "packed_bytes": nbytes if blob else sum(m.size for m in masks.values()), "source_sha256": record.sha256,
                "source_stat": stat,
                **({"alone": alone} if alone else {"features": int(head[0].shape[0])})}
        return feature_layer, variables, BankTask(None, None, kind, masks, own, None if blob else head, info, blob)

    def _unchanged(self, path, stat, previous, plan):
        """`_read`'s result for a task file that the latest version recorded with the same path,
        size, modification and change times and inode (`source_stat`, what git's index compares),
        and whose files it holds: nothing is read (the latest version checked the file against
        this backbone: its fingerprint is this one's), its files are linked. None otherwise (the
        file is read)."""
        entry = previous.entry(stat)
        if entry is None or entry.get("image_size") != list(self.backbone.inputs[0].shape[1:]):
            return None
        variables = self._feature_model_variables(previous.feature_layer)
        name = blob_name(entry["source_sha256"], plan.layout, plan.own_paths)
        head_size = (entry["features"] + 1) * entry["num_classes"]
        if not previous.link(name, plan.folder, plan.sizes(entry["mask_type"], head_size)):
            return None
        info = {k: v for k, v in entry.items() if k not in ("name", "blob")}
        masks, own = _claimed(plan, entry["mask_type"])
        return previous.feature_layer, variables, BankTask(None, None, entry["mask_type"], masks, own, None, info, name)

    def _store(self, record, variables, previous, plan, own, head):
        """`(blob, kind, masks, own, packed bytes)` of a task whose files go to `plan`'s folder
        (`add_all`'s `store`): linked from `previous` when it holds them, else packed and written.
        `masks` and `own` name the paths only (`_claimed`; values None: they are in the files)."""
        folder, layout, own_paths, _ = plan
        if not set(record.mask_names) <= set(layout.paths) or not set(own) <= set(own_paths):
            raise TaskFileError(f"{record.path!r} changed while it was being exported; export again")
        name = blob_name(record.sha256, layout, own_paths)
        kind = record.manifest["options"].get("mask_type", "binary") if record.mask_names else "none"
        sizes = plan.sizes(kind, head[0].size + head[1].size)
        if previous is None or not previous.link(name, folder, sizes):
            _, masks = pack_masks(record, variables, previous.masks(record.sha256) if previous else None)
            defaults = {p: np.asarray(variables[p], np.float32) for p in own_paths if p not in own}
            write_blob(folder, name, layout.pack(masks, kind),
                       np.concatenate([own.get(p, defaults.get(p)).ravel() for p in own_paths]
                                      + [head[0].ravel(), head[1].ravel()]))
        return (name, kind, *_claimed(plan, kind), sizes[0])

    def _feature_model_variables(self, feature_layer):
        """`{path: variable}` of the feature model ending at `feature_layer`, built once."""
        with self._reading:
            if feature_layer not in self._feature_variables:
                self._feature_variables[feature_layer] = {
                    v.path: v for v in feature_model(self.backbone, feature_layer).variables}
            return self._feature_variables[feature_layer]

    @property
    def kernel_paths(self):
        """The kernels any task masks, in the backbone's order: the bank's flat slot layout."""
        return self._version.layout.paths

    @property
    def flat_size(self):
        """Floats in one slot's kernel layout (each kernel aligned), without the id entries."""
        return self._version.layout.flat_size

    def packed(self, task):
        """`task`'s masks over the bank's layout, packed (`PackedLayout.pack`)."""
        return self._version.layout.pack(task.masks, task.kind, task.uid)

    # ---- serving ----------------------------------------------------------------------------
    @property
    def module(self):
        """The current version's `BankModule`, its functions traced."""
        return self._version.module(self._graph_for)

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
        version = self._version  # one snapshot: its module and its indices agree
        module = version.module(self._graph_for)
        inputs = tf.nest.map_structure(lambda spec, value: tf.convert_to_tensor(value, spec.dtype),
                                       module.graph.input_spec(), inputs)
        if isinstance(task, (str, int, np.integer)):
            return module.forward(inputs, tf.constant(version.index(task), tf.int32)).numpy()
        indices = [version.index(t) for t in task]
        return module.mixed(inputs, tf.constant(indices, tf.int32))["logits"].numpy()

    def serving_module(self, per_task=True):
        """What an export saves: `(module, {name: tf.function}, spec)`. The signatures are one per
        task (unless `per_task` is False), `serving_default` (the first task), `tasks` (`image`,
        int32 `task` per example) and `tasks_by_name` (string `task`); `spec` is the module's
        `GraphSpec` with them, whose `key` says whether two exports trace the same graph. The
        module is not traced here: `tf.saved_model.save` traces it in its own context, so tracing
        it for calls first traced the backbone twice (10 ResNet-50 tasks at 128 px exported in
        7.0-9.2 s so, in 5.8-6.7 s now; BUILD.md).

        Every signature is a graph of its own to TensorFlow: `tf.saved_model.load` rebuilds
        each with a copy of the backbone's function (measured, ResNet-50 with 100 tasks: 1.7 s
        and +0.8 GB at load, against 0.55 s without per-task signatures), and the first call
        of each instantiates it (~0.7 s, ~12 MB). `tasks` serves every task from one graph.
        """
        version = self._version
        module = version.module(self._graph_for, traced=False)
        tasks = version.tasks if per_task else version.tasks[:1]
        entries = [(t.name, i, t.info["num_classes"]) for i, t in enumerate(tasks)]
        entries = [e for e in entries if per_task] + [("serving_default", *entries[0][1:])]
        spec = dataclasses.replace(module.spec, signatures=tuple(entries) + tuple(
            (name, None, None) for name in MIXED_SIGNATURES))
        inputs = module.graph.input_spec()
        signatures, by_task = {}, {}
        for name, index, classes in spec.signatures:  # what the signatures read while traced: the spec alone
            if index is not None:  # serving_default is the first task's function, not a copy of it
                signatures[name] = by_task.setdefault(index, _task_signature(module, index, classes, inputs, name))
        signatures["tasks"] = tf.function(
            lambda inputs, task: module.mixed(inputs, task), autograph=False,
            input_signature=[inputs, tf.TensorSpec([None], tf.int32, name="task")])
        signatures["tasks_by_name"] = tf.function(
            lambda inputs, task: module.mixed(inputs, module.lookup(task)), autograph=False,
            input_signature=[inputs, tf.TensorSpec([None], tf.string, name="task")])
        return module, signatures, spec

    def listing(self):
        """The JSON-ready description of the bank that exports store and `export/list_tasks.py` prints."""
        version = self._version
        listing = {"format": "tf_piggyback.bank", "version": 1, "backbone": {"name": self.backbone.name,
                   "fingerprint": self.fingerprint}, "slots": self.slots,
                   "tasks": [{"name": t.name, **t.info, **({"blob": t.blob} if t.blob else {})} for t in version.tasks]}
        if version.served:  # how masks are packed (`bankstore.Exported` reads them back)
            listing["kernels"] = [list(kernel) for kernel in version.layout.kernels]
        if any(t.blob for t in version.tasks):  # what `bankstore.Exported.claims` reads back
            listing.update(store=STORE, own=version.own_paths, feature_layer=version.feature_layer)
        return listing


def _claimed(plan, kind):
    """`(BankTask.masks, BankTask.own)` of a task in files: the plan's whole layout (none for a
    classifier-only task) and every owned weight, which its files are written over, so the
    version's layout is the plan's whatever each task masks (an unmasked kernel is all ones, an
    unowned weight the backbone's)."""
    return dict.fromkeys(plan.layout.paths if kind != "none" else []), dict.fromkeys(plan.own_paths)


def _warm_up(module, version):
    """Runs `module`'s functions once, so that TensorFlow instantiates them here and not in the
    next calls (ResNet-50 at 128 px: 2-4 s in all on 2 cores, after tracing): `forward` and
    `mixed` on one blank example of a task whose kernels a slot holds (no fill, no eviction)."""
    blank = tf.nest.map_structure(lambda spec: tf.zeros([1, *(d or 1 for d in spec.shape[1:])], spec.dtype),
                                  module.graph.input_spec())
    held = set(module.graph.slot_uids.numpy().tolist())
    for index, task in enumerate(version.tasks):
        if task.uid in held or task.kind == "none":
            module.forward(blank, tf.constant(index, tf.int32))
            module.mixed(blank, tf.constant([index], tf.int32))
            return


def _task_signature(module, index, num_classes, spec, name):
    def serve(inputs):
        logits = tf.ensure_shape(module.forward(inputs, tf.constant(index, tf.int32)), [None, num_classes])
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

    serve.__name__ = name
    return tf.function(serve, input_signature=[spec], autograph=False)
