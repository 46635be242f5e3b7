"""The TensorFlow side of a `TaskBank`: its tasks as variables, a few working slots of masked
kernels, and the functions that serve them (`forward`, `mixed`); what a multi-task SavedModel holds.

Concurrency (TensorFlow Serving runs requests in parallel): each slot is one variable whose
last entries are the id of the task whose kernels it holds. A TensorFlow variable read is a
snapshot (an assignment while a reader holds the buffer writes a new one), so a call that
reads a slot and finds its own task's id there uses kernels of that task only, without a
lock. A call that misses takes the bank's one fill lock (a TensorFlow mutex), looks again and
otherwise fills a slot: one unpack at a time, and N concurrent cold calls of one task unpack it
once (`BankModule.refills` counts fills). A request still computing with a slot's old copy
keeps it alive until it finishes, so under load memory can briefly hold one more copy per
such request.

Reference: §3, last paragraph (only the thresholded masks are kept).
"""

import functools
import hashlib
import json
import os
import uuid

import keras
import numpy as np
import tensorflow as tf

from tf_piggyback import coding
from tf_piggyback.signatures import image_spec
from tf_piggyback.surgery import feature_model, pool_features

KINDS = {"none": 0, "binary": 1, "ternary": 2}
# Each kernel starts at a multiple of 16 floats (64 bytes) in the flat slot, so slicing it out
# shares the slot's buffer instead of copying it (TensorFlow's aligned dim-0 slices).
ALIGN = 16
# A slot's last ID_BITS entries say whose kernels it holds: there `W` is 2^15 ... 2^0 and each
# task's masks are the bits of its id, so the entries sum to the id (exact in float32). The fill
# is then one multiplication, done in place; writing the id afterwards would copy the slot.
# ID_BITS = ALIGN keeps the kernels after them aligned.
ID_BITS = ALIGN
ID_WEIGHTS = 2.0 ** np.arange(ID_BITS - 1, -1, -1, dtype=np.float32)
MAX_UID = 2 ** ID_BITS - 1


def aligned(size):
    """`size` rounded up to a multiple of ALIGN."""
    return -(-size // ALIGN) * ALIGN


# Every byte's 8 binary mask values, or 4 ternary ones (`coding.unpack`, the one bit order):
# unpacking is one gather straight to floats, with no byte-sized intermediates.
_BYTES = np.arange(256, dtype=np.uint8)[:, None]
_BITS = np.stack([coding.unpack(byte, 8, "binary") for byte in _BYTES]).astype(np.float32)
_TERNARY = np.stack([coding.unpack(byte, 4, "ternary") for byte in _BYTES]).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _code_digest():
    """SHA-256 of this package's source (`BankModule.graph_key`: other code may trace another graph)."""
    digest = hashlib.sha256()
    root = os.path.dirname(os.path.abspath(__file__))
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


def unpack_binary(packed):
    """uint8 bytes -> float mask values in {0, 1}, 8 per byte (`coding.unpack` in TensorFlow)."""
    return tf.reshape(tf.gather(tf.constant(_BITS), tf.cast(packed, tf.int32)), [-1])


def unpack_ternary(packed):
    """uint8 bytes -> float mask values in {-1, 0, 1}, 4 per byte (`coding.unpack` in TensorFlow)."""
    return tf.reshape(tf.gather(tf.constant(_TERNARY), tf.cast(packed, tf.int32)), [-1])


class BankModule(tf.Module):
    """The bank as TensorFlow state and two functions, `forward` and `mixed`; see `TaskBank`.

    It tracks raw `tf.Variable`s only, never Keras objects: a SavedModel that tracks Keras
    variables loads in TF2 but not in TF1-style loaders such as TensorFlow Serving.
    """

    def __init__(self, bank):
        super().__init__()
        alone = [t for t in bank.records if t.kind == "alone"]
        if alone:
            raise ValueError(f"task {alone[0].name!r} {alone[0].info['alone']}; export it on its own")
        template = feature_model(bank.backbone, bank.feature_layer)
        # Untracked (tf.Module tracks attributes): the template's Keras variables are never
        # read, every call passes their values (stateless_call).
        self.__dict__["_template"] = template
        tasks = bank.records
        kernel_paths = bank.kernel_paths
        own_paths = sorted({p for t in tasks for p in t.own}, key=[v.path for v in template.variables].index)
        by_path = {v.path: v for v in template.variables}
        values = {p: np.asarray(keras.ops.convert_to_numpy(v), np.float32) for p, v in by_path.items()}

        # The backbone's kernels W that tasks mask, flat and aligned, then ID_WEIGHTS, where a
        # slot keeps its task's id: a slot is this times the task's unpacked masks.
        self._kernel_layout = []
        weights = np.zeros(bank.flat_size + ID_BITS, np.float32)
        weights[-ID_BITS:] = ID_WEIGHTS
        offset = 0
        for p in kernel_paths:
            size = values[p].size
            weights[offset:offset + size] = values[p].ravel()
            self._kernel_layout.append((p, offset, values[p].shape))
            offset += aligned(size)
        self.flat_size = offset
        self.backbone_kernels = tf.Variable(weights, trainable=False, name="backbone_kernels")

        # Everything else of the backbone that is float32 and no task owns: one flat variable.
        shared = [p for p in by_path if p not in kernel_paths and p not in own_paths
                  and by_path[p].dtype == "float32"]
        self._shared_layout, offset = [], 0
        for p in shared:
            self._shared_layout.append((p, offset, values[p].shape))
            offset += values[p].size
        self.shared = tf.Variable(np.concatenate([values[p].ravel() for p in shared] or [np.zeros(0, np.float32)]),
                                  trainable=False, name="shared")
        # Variables of other dtypes (an int seed state, say) as they are, one each.
        self._non_float32_paths = [p for p in by_path
                                   if p not in kernel_paths and p not in own_paths and p not in shared]
        self.non_float32 = [tf.Variable(keras.ops.convert_to_numpy(by_path[p]), trainable=False)
                            for p in self._non_float32_paths]

        # Per task: own weights (per-task BN, then the head) one segment each, packed masks.
        self._own_layout, offset = [], 0
        for p in own_paths:
            self._own_layout.append((p, offset, values[p].shape))
            offset += values[p].size
        self._head_offset = offset
        self.features = int(tasks[0].head[0].shape[0])
        segments = [np.concatenate([t.own.get(p, values[p]).ravel() for p in own_paths]
                                   + [t.head[0].ravel(), t.head[1].ravel()]) for t in tasks]
        # Shaped [None]: the traced functions do not depend on how many tasks there are or which
        # (a new version of the bank can keep the last one's graph: `export.export_saved_model`).
        def per_task(value, dtype, name=None):
            return tf.Variable(tf.constant(value, dtype), shape=tf.TensorShape([None]), trainable=False, name=name)

        self.own = per_task(np.concatenate(segments), tf.float32, "own")
        self.own_offsets = per_task(np.cumsum([0] + [s.size for s in segments]), tf.int64)
        packed = [bank.packed(t) for t in tasks]
        self.packed = per_task(np.concatenate(packed), tf.uint8, "packed")
        self.packed_offsets = per_task(np.cumsum([0] + [p.size for p in packed]), tf.int64)
        self.kinds = per_task([KINDS[t.kind] for t in tasks], tf.int32)
        self.uids = per_task([float(t.uid) for t in tasks], tf.float32)
        self.num_classes = per_task([t.info["num_classes"] for t in tasks], tf.int32)
        self.names = per_task([t.name for t in tasks], tf.string)

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

        spec = self._spec = image_spec(bank.backbone)
        # autograph=False: control flow is written out (tf.cond, tf.switch_case, tf.while_loop).
        # `compute` is not inlined into its callers and is stateless (see `_compute`): every
        # signature runs one instance of the backbone's graph, optimized once.
        vector = tf.TensorSpec([None], tf.float32)
        self.compute = tf.function(
            self._compute, autograph=False, experimental_attributes={"_noinline": True},
            input_signature=[spec, vector, vector, vector, tf.TensorSpec([], tf.int32),
                             [tf.TensorSpec(v.shape, v.dtype) for v in self.non_float32]])
        self.forward = tf.function(self._forward, input_signature=[spec, tf.TensorSpec([], tf.int32)], autograph=False)
        self.mixed = tf.function(self._mixed, input_signature=[spec, tf.TensorSpec([None], tf.int32)], autograph=False)
        self.lookup = tf.function(self._lookup, input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)

    def graph_key(self):
        """A SHA-256 of all that this module's traced functions depend on besides its variables'
        values: the backbone's architecture, the layouts of kernels and own weights, the number of
        slots, the input, this library's code and TensorFlow's and Keras' versions; None when the
        architecture has no config. Two modules with one key trace the same graph (unless per-task
        signatures are added), so a new version of a bank may keep the last one's."""
        try:
            architecture = self._template.to_json()
        except (NotImplementedError, TypeError, ValueError):
            return None
        parts = [architecture, self._kernel_layout, self._shared_layout, self._own_layout, self.features,
                 self._non_float32_paths, [(v.dtype.name, v.shape.as_list()) for v in self.non_float32],
                 len(self.slots), self._spec.shape.as_list(), self._spec.dtype.name, tf.__version__, keras.__version__,
                 _code_digest()]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()

    # ---- masked kernels ------------------------------------------------------------------
    def _kernels(self, task):
        """`[flat_size + ID_BITS]`: the task's masked kernels (flat, aligned), then its id's entries.

        A hit reads a slot without a lock. A miss takes the bank's fill lock, looks again (a
        request that waited may find its task filled by the one before it) and otherwise fills
        the least recently used slot, so concurrent cold calls of one task unpack it once.
        """
        uid = self.uids[task]
        kind = self.kinds[task]

        def from_slots():
            hit, slot, held = self._slot_holding(uid)
            return tf.cond(hit, lambda: self._used(slot, held), lambda: self._locked_fill(task, kind, uid))

        return tf.cond(tf.equal(kind, 0), self.backbone_kernels.read_value, from_slots)

    def _slot_holding(self, uid):
        """`(hit, slot, kernels)`: whether the slot the hint names for `uid` holds `uid`'s kernels
        (the hint may be stale; the slot's id entries decide) and, if so, a snapshot of them (else
        empty). No slot is read when none is hinted, so a refilled slot's old copy is freed as
        it is replaced."""
        hits = tf.where(tf.equal(self.slot_uids.read_value(), uid))[:, 0]

        def lookup():
            slot = tf.cast(hits[0], tf.int32)
            held = tf.switch_case(slot, [lambda s=s: s.read_value() for s in self.slots])
            hit = tf.logical_and(tf.equal(tf.size(held), self.flat_size + ID_BITS),
                                 tf.equal(tf.reduce_sum(held[-ID_BITS:]), uid))
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
            check = tf.debugging.assert_equal(tf.reduce_sum(kernels[-ID_BITS:]), uid,
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
        weights = self.backbone_kernels.read_value()
        # One multiplication, in place on the unpacked mask; its last ID_BITS entries are the id.
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
                            [variable.read_value() for variable in self.non_float32])

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
        values.update(zip(self._non_float32_paths, others))
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
