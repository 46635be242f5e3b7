"""Many tasks over one backbone, served at the cost of their task files (DESIGN 3.5).

A `TaskBank` holds one backbone and any number of task files. The backbone's graph is traced
once; a task is data, not a graph: its masks packed 1 bit per parameter (2 for ternary) and
its own weights (head, per-task BatchNormalization). A call for a task reads its masked
kernels `W ⊙ m` from a small, fixed set of working slots (least recently used first out);
a task not in a slot is unpacked with one table gather (tens of ms for ResNet-50's 23M
masked weights) into the slot that was used longest ago. So memory is the backbone, the
packed masks and `slots` float copies of the masked kernels (one more while a slot is being
refilled: its old copy lives until the new one replaces it), whatever the number of tasks.

The same `tf.Module` is what `export_saved_model` saves for several tasks, so the Python API
and TensorFlow Serving run one implementation.

Concurrency (TensorFlow Serving runs requests in parallel): each slot is one variable whose
last entries are the id of the task whose kernels it holds. A TensorFlow variable read is a
snapshot (an assignment while a reader holds the buffer writes a new one), so a call that
reads a slot and finds its own task's id there uses kernels of that task only, without a
lock. A call that misses takes the bank's one fill lock (a TensorFlow mutex), looks again and
otherwise fills a slot: one unpack at a time, and N concurrent cold calls of one task unpack it
once (`BankModule.refills` counts fills). A request still computing with a slot's old copy
keeps it alive until it finishes, so under load memory can briefly hold one more copy per
such request.

Reference: §3, last paragraph (only the thresholded masks are kept); §5 and Table 3 (one
backbone, many tasks at about 1 bit per parameter each).
"""

import dataclasses
import hashlib
import threading
import uuid

import keras
import numpy as np
import tensorflow as tf

from tf_piggyback import coding
from tf_piggyback.fingerprint import check_backbone, fingerprint
from tf_piggyback.signatures import image_spec
from tf_piggyback.surgery import HEAD_NAME, feature_model, pool_features
from tf_piggyback.taskfile import TaskFileError, read_task, task_name

DEFAULT_SLOTS = 2
MIXED_SIGNATURES = ("tasks", "tasks_by_name")
KINDS = {"none": 0, "binary": 1, "ternary": 2}
# Each kernel starts at a multiple of 16 floats (64 bytes) in the flat slot, so slicing it out
# shares the slot's buffer instead of copying it (TensorFlow's aligned dim-0 slices).
ALIGN = 16
# A slot's last ALIGN entries say whose kernels it holds: there `W` is 2^15 ... 2^0 and each
# task's masks are the bits of its id, so the entries sum to the id (exact in float32). The fill
# is then one multiplication, done in place; writing the id afterwards would copy the slot.
ID_WEIGHTS = 2.0 ** np.arange(ALIGN - 1, -1, -1, dtype=np.float32)
MAX_UID = 2 ** ALIGN - 1


def _aligned(size):
    return -(-size // ALIGN) * ALIGN


# Every byte's 8 binary mask values, or 4 ternary ones (`coding.unpack`, the one bit order):
# unpacking is one gather straight to floats, with no byte-sized intermediates.
_BYTES = np.arange(256, dtype=np.uint8)[:, None]
_BITS = np.stack([coding.unpack(byte, 8, "binary") for byte in _BYTES]).astype(np.float32)
_TERNARY = np.stack([coding.unpack(byte, 4, "ternary") for byte in _BYTES]).astype(np.float32)


def unpack_binary(packed):
    """uint8 bytes -> float mask values in {0, 1}, 8 per byte (`coding.unpack` in TensorFlow)."""
    return tf.reshape(tf.gather(tf.constant(_BITS), tf.cast(packed, tf.int32)), [-1])


def unpack_ternary(packed):
    """uint8 bytes -> float mask values in {-1, 0, 1}, 4 per byte (`coding.unpack` in TensorFlow)."""
    return tf.reshape(tf.gather(tf.constant(_TERNARY), tf.cast(packed, tf.int32)), [-1])


@dataclasses.dataclass
class BankTask:
    """One task in a bank: what its file holds, laid out for the bank.

    Attributes:
        name: signature / lookup name.
        uid: an id never reused in this bank (slots are tagged with it, `ID_WEIGHTS`).
        kind: "none" (classifier-only), "binary", "ternary" or "alone" (listed only, never served:
            `_served_alone`).
        masks: `{backbone kernel path: its mask packed (`coding.pack`), padded to ALIGN values}`;
            a kernel the task does not mask (`mask_from`) is absent: all ones in the bank.
        own: `{backbone variable path: value}` for per-task BatchNormalization.
        head: `(kernel [F, C], bias [C])` (None for a task served alone).
        info: manifest summary for listings (classes, sparsity, source file SHA-256).
    """

    name: str
    uid: int
    kind: str
    masks: dict
    own: dict
    head: tuple
    info: dict


class TaskBank:
    """One backbone, many task files, a bounded set of unpacked working copies.

    Args:
        backbone: the backbone every task was trained on (fingerprints are checked against
            the one computed here: the bank takes the backbone as it is now, as frozen).
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
        self._tasks = []
        self._next_uid = 0
        self._feature_layer = None
        self._variables = {}  # path -> shape of the feature model's variables, in its order
        self._feature_variables = {}  # feature_layer -> {path: variable}, built once each
        self._module = None
        self._building = threading.Lock()

    # ---- the set of tasks -------------------------------------------------------------------
    @property
    def names(self):
        return [task.name for task in self._tasks]

    def tasks(self):
        """One dict per task: `name`, `num_classes`, `class_names`, `method`, `mask_type`,
        `sparsity`, `image_size`, `packed_bytes` (in memory), `source_sha256` (of the task file)."""
        return [{"name": t.name, **t.info} for t in self._tasks]

    def add(self, path, name=None):
        """Adds a task file; returns its name (default from the path, `taskfile.task_name`)."""
        name = name or task_name(path)
        if name in self.names:
            raise ValueError(f"a task named {name!r} is already in the bank; name it with NAME=PATH")
        if name in MIXED_SIGNATURES or name == "serving_default":
            raise ValueError(f"{name!r} is a reserved signature name; name the task with NAME=PATH")
        manifest, arrays = read_task(path)
        check_backbone(self.backbone, manifest, path, TaskFileError, actual=self.fingerprint)
        options = manifest.get("options", {})
        feature_layer = options.get("feature_layer")
        if self._next_uid > MAX_UID:
            raise ValueError(f"this bank has been given {MAX_UID + 1:,} tasks, as many as its slot ids tell apart; "
                             "make a new TaskBank")
        alone = _served_alone(manifest)
        if alone:  # listed (a single-task export's listing), never served (see BankModule): nothing to lay out
            kind, masks, own, head = "alone", {}, {}, None
        else:
            if any(t.kind != "alone" for t in self._tasks) and feature_layer != self._feature_layer:
                raise TaskFileError(
                    f"{path!r} feeds its head from feature_layer={feature_layer!r}, the bank's tasks from "
                    f"{self._feature_layer!r}; a bank holds tasks over one feature model")
            if feature_layer not in self._feature_variables:
                self._feature_variables[feature_layer] = {
                    v.path: v for v in feature_model(self.backbone, feature_layer).variables}
            variables = self._feature_variables[feature_layer]
            kind, masks = self._pack_masks(path, manifest, arrays, variables)
            own, head = self._own_and_head(path, manifest, arrays, variables)
            self._feature_layer = feature_layer
            self._variables = {p: tuple(v.shape) for p, v in variables.items()}
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        info = {"num_classes": int(manifest["num_classes"]), "class_names": manifest.get("class_names"),
                "method": manifest["method"], "mask_type": kind, "sparsity": float(manifest.get("sparsity", 0.0)),
                "image_size": manifest.get("image_size"), "packed_bytes": sum(m.size for m in masks.values()),
                "source_sha256": digest, **({"alone": alone} if alone else {})}
        self._tasks.append(BankTask(name, self._next_uid, kind, masks, own, head, info))
        self._next_uid += 1
        self._module = None
        return name

    def remove(self, name):
        """Removes a task by name."""
        index = self.index(name)
        del self._tasks[index]
        self._module = None

    def index(self, name):
        if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
            if not 0 <= name < len(self._tasks):
                raise ValueError(f"task index {name} is out of range; the bank has {len(self._tasks)} tasks")
            return int(name)
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"no task named {name!r}; the bank has {', '.join(self.names) or 'no tasks'}") from None

    @staticmethod
    def _own_and_head(path, manifest, arrays, variables):
        """`(BankTask.own, BankTask.head)` of a task file: its per-task backbone weights by path,
        and its Dense head's kernel and bias."""
        own, heads = {}, []
        for i, entry in enumerate(manifest["weights"]):
            value = np.asarray(arrays[f"w{i}"], np.float32)
            if entry["name"].startswith(f"{HEAD_NAME}/"):
                heads.append(value)
            elif entry["name"] not in variables or tuple(variables[entry["name"]].shape) != value.shape:
                raise TaskFileError(f"{path!r}: task weight {entry['name']} does not fit this backbone")
            else:
                own[entry["name"]] = value
        if len(heads) != 2 or heads[0].ndim != 2 or heads[0].shape[1] != manifest["num_classes"]:
            raise TaskFileError(f"{path!r} has no Dense head of {manifest['num_classes']} classes")
        return own, (heads[0], heads[1])

    def _pack_masks(self, path, manifest, arrays, variables):
        """`(kind, BankTask.masks)` of a task file's masks."""
        layers = manifest["layers"]
        if not layers:
            return "none", {}
        kind = manifest["options"].get("mask_type", "binary")
        masks = {}
        for entry in layers:
            if entry["name"] not in variables:
                raise TaskFileError(f"{path!r} masks {entry['name']}, which the backbone does not have")
            shape = tuple(variables[entry["name"]].shape)
            if tuple(entry["shape"]) != shape:
                raise TaskFileError(f"{path!r}: {entry['name']} has shape {tuple(entry['shape'])}, the backbone's {shape}")
            payload = arrays["masks"][entry["offset"]:entry["offset"] + entry["nbytes"]].tobytes()
            mask = coding.decode(payload, entry, shape).ravel()
            masks[entry["name"]] = coding.pack(np.pad(mask, (0, _aligned(mask.size) - mask.size)), kind)
        return kind, masks

    @property
    def kernel_paths(self):
        """The kernels any task masks, in the backbone's order: the bank's flat slot layout.
        The same set of tasks gives the same layout in any order."""
        masked = {p for t in self._tasks for p in t.masks}
        return [p for p in self._variables if p in masked]

    @property
    def flat_size(self):
        """Floats in one slot's kernel layout (each kernel aligned), without the id entries."""
        return sum(_aligned(int(np.prod(self._variables[p]))) for p in self.kernel_paths)

    def packed(self, task):
        """`task`'s masks over the bank's layout, packed: each kernel's (all ones where the task
        does not mask it), then the bits of its uid (the `ALIGN` entries at the end of a slot)."""
        if task.kind == "none":
            return np.zeros(0, np.uint8)
        segments = [task.masks[p] if p in task.masks else
                    coding.pack(np.ones(_aligned(int(np.prod(self._variables[p]))), np.int8), task.kind)
                    for p in self.kernel_paths]
        uid = np.unpackbits(np.array([task.uid], ">u2").view(np.uint8)).astype(np.int8)
        return np.concatenate(segments + [coding.pack(uid, task.kind)])

    # ---- serving ----------------------------------------------------------------------------
    @property
    def module(self):
        """The `BankModule` over the current tasks (rebuilt after `add` / `remove`), its
        functions traced (a tf.function's concurrent first calls would each trace it)."""
        if not self._tasks:
            raise ValueError("the bank has no tasks; add a task file first")
        with self._building:  # concurrent first calls build and trace one module, once
            if self._module is None:
                module = BankModule(self)
                module.forward.get_concrete_function()
                module.mixed.get_concrete_function()
                self._module = module
            return self._module

    def predict(self, images, task):
        """Logits for `images` under `task`: a name or index, or one per image (mixed).

        Returns:
            `[B, num_classes]` logits for one task; for one task per image, `[B, C_max]`
            logits padded with zeros past each task's class count.
        """
        images = tf.convert_to_tensor(images, tf.float32)
        if isinstance(task, (str, int, np.integer)):
            return self.module.forward(images, tf.constant(self.index(task), tf.int32)).numpy()
        indices = [self.index(t) for t in task]
        return self.module.mixed(images, tf.constant(indices, tf.int32))["logits"].numpy()

    def serving_signatures(self, per_task=True):
        """`{name: tf.function}`: one signature per task (unless `per_task` is False),
        `serving_default` (the first task), `tasks` (`image`, int32 `task` per example) and
        `tasks_by_name` (string `task`).

        Every signature is a graph of its own to TensorFlow: `tf.saved_model.load` rebuilds
        each with a copy of the backbone's function (measured, ResNet-50 with 100 tasks: 1.7 s
        and +0.8 GB at load, against 0.55 s without per-task signatures), and the first call
        of each instantiates it (~0.7 s, ~12 MB). `tasks` serves every task from one graph.
        """
        module = self.module
        spec = image_spec(self.backbone)
        signatures = {task.name: _task_signature(module, index, task.info["num_classes"], spec, task.name)
                      for index, task in enumerate(self._tasks[:len(self._tasks) if per_task else 1])}
        signatures["serving_default"] = signatures[self._tasks[0].name]
        if not per_task:
            del signatures[self._tasks[0].name]
        signatures["tasks"] = tf.function(
            lambda image, task: module.mixed(image, task), autograph=False,
            input_signature=[spec, tf.TensorSpec([None], tf.int32, name="task")])
        signatures["tasks_by_name"] = tf.function(
            lambda image, task: module.mixed(image, module.lookup(task)), autograph=False,
            input_signature=[spec, tf.TensorSpec([None], tf.string, name="task")])
        return signatures

    def listing(self):
        """The JSON-ready description of the bank that exports store and `export/list_tasks.py` prints."""
        return {"format": "tf_piggyback.bank", "version": 1, "backbone": {"name": self.backbone.name,
                "fingerprint": self.fingerprint}, "slots": self.slots, "tasks": self.tasks()}


def _served_alone(manifest):
    """Why a task cannot share a bank's one traced backbone and Dense heads (None if it can)."""
    if manifest["method"] == "lora":
        return "is a LoRA task: its adapters merge into full float kernels, a copy of their own"
    if "head" in manifest.get("options", {}):
        return "has its own head layers (options.head), and a bank serves Dense heads over pooled features"
    return None


def _task_signature(module, index, num_classes, spec, name):
    def serve(image):
        logits = tf.ensure_shape(module.forward(image, tf.constant(index, tf.int32)), [None, num_classes])
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

    serve.__name__ = name
    return tf.function(serve, input_signature=[spec], autograph=False)


class BankModule(tf.Module):
    """The bank as TensorFlow state and two functions, `forward` and `mixed`; see `TaskBank`.

    It tracks raw `tf.Variable`s only, never Keras objects: a SavedModel that tracks Keras
    variables loads in TF2 but not in TF1-style loaders such as TensorFlow Serving.
    """

    def __init__(self, bank):
        super().__init__()
        alone = [t for t in bank._tasks if t.kind == "alone"]
        if alone:
            raise ValueError(f"task {alone[0].name!r} {alone[0].info['alone']}; export it on its own")
        template = feature_model(bank.backbone, bank._feature_layer)
        # Untracked (tf.Module tracks attributes): the template's Keras variables are never
        # read, every call passes their values (stateless_call).
        self.__dict__["_template"] = template
        tasks = bank._tasks
        kernel_paths = bank.kernel_paths
        own_paths = sorted({p for t in tasks for p in t.own}, key=[v.path for v in template.variables].index)
        by_path = {v.path: v for v in template.variables}
        values = {p: np.asarray(keras.ops.convert_to_numpy(v), np.float32) for p, v in by_path.items()}

        # The masked kernels W, flat and aligned, then ID_WEIGHTS, where a slot keeps its task's id.
        self._kernel_layout = []
        weights = np.zeros(bank.flat_size + ALIGN, np.float32)
        weights[-ALIGN:] = ID_WEIGHTS
        offset = 0
        for p in kernel_paths:
            size = values[p].size
            weights[offset:offset + size] = values[p].ravel()
            self._kernel_layout.append((p, offset, values[p].shape))
            offset += _aligned(size)
        self.flat_size = offset
        self.weights = tf.Variable(weights, trainable=False, name="weights")

        # Everything else of the backbone that is float32 and no task owns: one flat variable.
        shared = [p for p in by_path if p not in kernel_paths and p not in own_paths
                  and by_path[p].dtype == "float32"]
        self._shared_layout, offset = [], 0
        for p in shared:
            self._shared_layout.append((p, offset, values[p].shape))
            offset += values[p].size
        self.shared = tf.Variable(np.concatenate([values[p].ravel() for p in shared] or [np.zeros(0, np.float32)]),
                                  trainable=False, name="shared")
        self.others = [tf.Variable(keras.ops.convert_to_numpy(by_path[p]), trainable=False)
                       for p in by_path if p not in kernel_paths and p not in own_paths and p not in shared]
        self._other_paths = [p for p in by_path if p not in kernel_paths and p not in own_paths and p not in shared]

        # Per task: own weights (per-task BN, then the head) one segment each, packed masks.
        self._own_layout, offset = [], 0
        for p in own_paths:
            self._own_layout.append((p, offset, values[p].shape))
            offset += values[p].size
        self._head_offset = offset
        self.features = int(tasks[0].head[0].shape[0])
        segments = [np.concatenate([t.own.get(p, values[p]).ravel() for p in own_paths]
                                   + [t.head[0].ravel(), t.head[1].ravel()]) for t in tasks]
        self.own = tf.Variable(np.concatenate(segments), trainable=False, name="own")
        self.own_offsets = tf.Variable(np.cumsum([0] + [s.size for s in segments]), trainable=False, dtype=tf.int64)
        packed = [bank.packed(t) for t in tasks]
        self.packed = tf.Variable(np.concatenate(packed), trainable=False, name="packed")
        self.packed_offsets = tf.Variable(np.cumsum([0] + [p.size for p in packed]), trainable=False,
                                          dtype=tf.int64)
        self.kinds = tf.Variable([KINDS[t.kind] for t in tasks], trainable=False, dtype=tf.int32)
        self.uids = tf.Variable([float(t.uid) for t in tasks], trainable=False, dtype=tf.float32)
        self.num_classes = tf.Variable([t.info["num_classes"] for t in tasks], trainable=False, dtype=tf.int32)
        self.names = tf.Variable([t.name for t in tasks], trainable=False, dtype=tf.string)

        # The working slots: saved holding one element (-1: no task's kernels), so the file keeps
        # 1 bit per parameter; filled on first use.
        self.slots = [tf.Variable([-1.0], shape=tf.TensorShape([None]), trainable=False, name=f"slot{i}")
                      for i in range(bank.slots)]
        self.slot_uids = tf.Variable([-1.0] * bank.slots, trainable=False)  # a hint; the slot's id entries decide
        self.slot_used = tf.Variable([0] * bank.slots, trainable=False, dtype=tf.int64)
        self.clock = tf.Variable(0, trainable=False, dtype=tf.int64)
        self.refills = tf.Variable(0, trainable=False, dtype=tf.int64)  # slots filled since loading
        # The fill lock (`_locked_fill`): a mutex resource that every call of this module's
        # functions finds by this name, in the Python API and in a loaded SavedModel alike.
        self._lock_name = f"tf_piggyback_bank_fill_{uuid.uuid4().hex}"

        spec = image_spec(bank.backbone)
        # autograph=False: control flow is written out (tf.cond, tf.switch_case, tf.while_loop).
        # `compute` is not inlined into its callers and is stateless (see `_compute`): every
        # signature runs one instance of the backbone's graph, optimized once.
        vector = tf.TensorSpec([None], tf.float32)
        self.compute = tf.function(
            self._compute, autograph=False, experimental_attributes={"_noinline": True},
            input_signature=[spec, vector, vector, vector, tf.TensorSpec([], tf.int32),
                             [tf.TensorSpec(v.shape, v.dtype) for v in self.others]])
        self.forward = tf.function(self._forward, input_signature=[spec, tf.TensorSpec([], tf.int32)], autograph=False)
        self.mixed = tf.function(self._mixed, input_signature=[spec, tf.TensorSpec([None], tf.int32)], autograph=False)
        self.lookup = tf.function(self._lookup, input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)

    # ---- masked kernels ------------------------------------------------------------------
    def _kernels(self, task):
        """`[flat_size + ALIGN]`: the task's masked kernels (flat, aligned), then its id's entries.

        A hit reads a slot without a lock. A miss takes the bank's fill lock, looks again (a
        request that waited may find its task filled by the one before it) and otherwise fills
        the least recently used slot, so concurrent cold calls of one task unpack it once.
        """
        uid = self.uids[task]
        kind = self.kinds[task]

        def from_slots():
            hit, slot, held = self._slot_holding(uid)
            return tf.cond(hit, lambda: self._used(slot, held), lambda: self._locked_fill(task, kind, uid))

        return tf.cond(tf.equal(kind, 0), self.weights.read_value, from_slots)

    def _slot_holding(self, uid):
        """`(hit, slot, kernels)`: whether the slot the hint names for `uid` holds `uid`'s kernels
        (the hint may be stale; the slot's id entries decide) and, if so, a snapshot of them (else
        empty). No slot is read when none is hinted, so a refilled slot's old copy is freed as
        it is replaced."""
        hits = tf.where(tf.equal(self.slot_uids.read_value(), uid))[:, 0]

        def lookup():
            slot = tf.cast(hits[0], tf.int32)
            held = tf.switch_case(slot, [lambda s=s: s.read_value() for s in self.slots])
            hit = tf.logical_and(tf.equal(tf.size(held), self.flat_size + ALIGN),
                                 tf.equal(tf.reduce_sum(held[-ALIGN:]), uid))
            # A snapshot of another task's kernels is let go here, not kept through a refill.
            return hit, slot, tf.cond(hit, lambda: held, lambda: tf.zeros([0], tf.float32))

        return tf.cond(tf.size(hits) > 0, lookup,
                       lambda: (tf.constant(False), tf.constant(-1), tf.zeros([0], tf.float32)))

    def _locked_fill(self, task, kind, uid):
        """The task's kernels from a slot or a fill, with the fill lock held (see `_kernels`).

        Only fills write slots, and every fill holds the lock, so the read that follows a
        slot's assignment is that assignment's value (an assignment and a read are two
        operations; without the lock, a racing fill in between gave another task's kernels).
        """
        lock = tf.raw_ops.MutexLock(mutex=tf.raw_ops.MutexV2(shared_name=self._lock_name))
        with tf.control_dependencies([lock]):
            hit, slot, held = self._slot_holding(uid)
            kernels = tf.cond(hit, lambda: self._used(slot, held), lambda: self._fill(task, kind))
            check = tf.debugging.assert_equal(tf.reduce_sum(kernels[-ALIGN:]), uid,
                                              message="a working slot holds another task's kernels")
        with tf.control_dependencies([kernels, check]):
            release = tf.raw_ops.ConsumeMutexLock(mutex_lock=lock)
        with tf.control_dependencies([release]):
            return tf.identity(kernels)

    def _used(self, slot, kernels):
        """`kernels`, read from `slot`, once the slot is marked as used now (least recently used
        first out; outside the lock two hits may tick in either order, which only orders them)."""
        with tf.control_dependencies([self.slot_used.scatter_nd_update([[slot]], [self.clock.assign_add(1)])]):
            return tf.identity(kernels)

    def _fill(self, task, kind):
        """Unpacks the task's masks into `W ⊙ m` and stores it in the least recently used slot
        (called with the fill lock held)."""
        tick = self.clock.assign_add(1)
        packed = self.packed[self.packed_offsets[task]:self.packed_offsets[task + 1]]
        weights = self.weights.read_value()
        # One multiplication, in place on the unpacked mask; its last ALIGN entries are the id.
        flat = weights * tf.cond(tf.equal(kind, 1), lambda: unpack_binary(packed), lambda: unpack_ternary(packed))
        slot = tf.cast(tf.argmin(self.slot_used.read_value()), tf.int32)
        self.slot_uids.scatter_nd_update([[slot]], [self.uids[task]])
        self.slot_used.scatter_nd_update([[slot]], [tick])
        self.refills.assign_add(1)

        # The slot adopts `flat`'s buffer (its only user is the assignment) and the call reads
        # it back: no copy. Measured: TensorFlow's CPU allocator keeps freed buffers resident,
        # so every transient 94 MB copy of ResNet-50's kernels would stay in RSS for good.
        def store(variable):
            return variable.assign(flat, read_value=True)

        return tf.switch_case(slot, [lambda s=s: store(s) for s in self.slots])

    # ---- forward passes -------------------------------------------------------------------
    def _forward(self, image, task):
        """The task's logits: its kernels from a slot (stateful), then `compute` (stateless)."""
        own = self.own[self.own_offsets[task]:self.own_offsets[task + 1]]
        return self.compute(image, self._kernels(task), self.shared.read_value(), own, self.num_classes[task],
                            [variable.read_value() for variable in self.others])

    def _compute(self, image, flat, shared, own, classes, others):
        """The backbone and head over given weights. Stateless on purpose: TensorFlow gives
        every caller of a stateful function its own instance (`StatefulPartitionedCall`), so
        each task's signature would build and keep its own copy of the backbone's graph
        (measured: 0.9 s and ~100 MB per task on its first call); a stateless one is shared."""
        values = {}
        for path, offset, shape in self._kernel_layout:
            values[path] = tf.reshape(flat[offset:offset + int(np.prod(shape))], shape)
        for path, offset, shape in self._shared_layout:
            values[path] = tf.reshape(shared[offset:offset + int(np.prod(shape))], shape)
        for path, offset, shape in self._own_layout:
            values[path] = tf.reshape(own[offset:offset + int(np.prod(shape))], shape)
        values.update(zip(self._other_paths, others))
        template = self._template
        features, _ = template.stateless_call(
            [values[v.path] for v in template.trainable_variables],
            [values[v.path] for v in template.non_trainable_variables], image, training=False)
        features = pool_features(features)
        head = own[self._head_offset:]
        kernel = tf.reshape(head[:self.features * classes], [self.features, classes])
        return tf.matmul(features, kernel) + head[self.features * classes:]

    def _lookup(self, names):
        """Task names -> indices; an unknown name is an InvalidArgument error naming the tasks."""
        matches = tf.equal(names[:, None], self.names[None, :])
        check = tf.debugging.assert_equal(tf.reduce_all(tf.reduce_any(matches, axis=1)), True,
                                          message="unknown task name; the model's tasks are its signature names")
        with tf.control_dependencies([check]):
            return tf.cast(tf.argmax(tf.cast(matches, tf.int32), axis=1), tf.int32)

    def _mixed(self, image, task):
        """One task per example: examples are grouped by task, each group runs once."""
        check = tf.debugging.assert_equal(
            tf.reduce_all(tf.logical_and(task >= 0, task < tf.size(self.num_classes))), True,
            message="task index out of range")
        with tf.control_dependencies([check]):
            task = tf.identity(task)
        widest = tf.reduce_max(self.num_classes)
        batch = tf.shape(image)[0]
        groups, group_of = tf.unique(task)

        def body(i, logits, probabilities):
            rows = tf.where(tf.equal(group_of, i))
            out = self.forward(tf.gather_nd(image, rows), groups[i])
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
