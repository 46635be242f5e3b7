"""The part of a `TaskBank` that its versions share: the backbone traced once (`compute`,
stateless), its weights and the few working slots of masked kernels (`BankGraph`); how masks are
packed (`PackedLayout`); and all that the traced functions depend on (`GraphSpec`). A graph
depends on the bank's layout, not on which tasks it holds, so every version with that layout
shares it: a new version neither retraces the backbone nor starts with cold slots
(`bankmodule.BankModule` is one version; BUILD.md, "Many tasks in one SavedModel").

Concurrency (TensorFlow Serving runs requests in parallel): each slot is one variable whose
last entries are the id of the task whose kernels it holds. A TensorFlow variable read is a
snapshot (an assignment while a reader holds the buffer writes a new one), so a call that
reads a slot and finds its own task's id there uses kernels of that task only, without a
lock. A call that misses takes the bank's one fill lock (a TensorFlow mutex), looks again and
otherwise fills a slot: one unpack at a time, and N concurrent cold calls of one task unpack it
once (`BankGraph.refills` counts fills). Slots are tagged with a task's uid, which a bank never
reuses, so the versions that share a graph share its slots safely. A request still computing
with a slot's old copy keeps it alive until it finishes, so under load memory can briefly hold
one more copy per such request.

Reference: §3, last paragraph (only the thresholded masks are kept).
"""

import dataclasses
import functools
import hashlib
import json
import os
import typing
import uuid

import keras
import numpy as np
import tensorflow as tf

from tf_piggyback import coding
from tf_piggyback.signatures import input_spec
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


class _Pool(typing.NamedTuple):
    """One kind of working slots of a `BankGraph`: its slot variables, the hint of which task's uid
    each holds, when each was last used, and how a held value names its task (`uid_of`). Made
    at trace time from the graph's tracked variables (a tf.Module tracks its attributes, not a
    tuple's callable)."""

    slots: list
    uids: tf.Variable
    used: tf.Variable
    uid_of: typing.Callable


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
    """SHA-256 of this package's source (`GraphSpec.runtime`: other code may trace another graph)."""
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


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """How a bank packs a task's masks: each kernel of `kernels` (`(path, size)`, in the backbone's
    order) in turn, padded to a multiple of `ALIGN` values, then the task's uid in `ID_BITS`
    values; 8 values a byte for binary masks, 4 for ternary (`coding.pack`). The one description
    that `TaskBank` packs with, `BankModule` unpacks with and an export's listing records
    (`TaskBank.add_all(previous=...)` reads tasks back with it)."""

    kernels: tuple

    @property
    def paths(self):
        return [path for path, _ in self.kernels]

    @property
    def flat_size(self):
        """Floats in one slot's kernels (each aligned), without the id entries."""
        return sum(aligned(size) for _, size in self.kernels)

    def pack(self, masks, kind, uid=None):
        """`{kernel path: packed, aligned mask}` of a task (a kernel it does not mask is all ones)
        and its uid (None: without it, as a task's file holds it, `bankstore`) -> one uint8 array
        (empty for a classifier-only task, `kind` "none")."""
        if kind == "none":
            return np.zeros(0, np.uint8)
        segments = [masks[path] if path in masks else coding.pack(np.ones(aligned(size), np.int8), kind)
                    for path, size in self.kernels]
        return np.concatenate(segments + ([] if uid is None else [self.id_bytes(uid, kind)]))

    @staticmethod
    def id_bytes(uid, kind):
        """The packed id entries that end a task's packed masks (`ID_WEIGHTS`): 2 bytes for
        binary masks, 4 for ternary."""
        return coding.pack(np.unpackbits(np.array([uid], ">u2").view(np.uint8)).astype(np.int8), kind)

    def split(self, packed, kind):
        """Inverse of `pack`, less the uid: `{kernel path: packed, aligned mask}`."""
        per_byte = 8 if kind == "binary" else 4
        masks, offset = {}, 0
        for path, size in self.kernels:
            masks[path] = packed[offset:offset + aligned(size) // per_byte].copy()
            offset += aligned(size) // per_byte
        return masks


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """Everything a bank's traced functions read when they are traced, and nothing else: what
    they do with it is fixed by `runtime` (this library's code, TensorFlow's and Keras' versions).
    Two banks with equal specs trace equal graphs, so an export may keep the last version's graph
    when the specs' `key`s agree (`export.export_saved_model`); it is complete by construction,
    since `BankGraph`, `BankModule` and the signatures read these fields and no other state.

    Attributes:
        architecture: the feature model's Keras JSON (None: it has none, no graph is ever reused).
        kernels / shared / own: `(path, offset, shape)` of the masked kernels in a slot, of the
            other float32 weights in `shared`, of a task's own weights (per-task normalization)
            in its segment of `own`, which ends with its head.
        non_float32: `(path, dtype, shape)` of other weights (a seed state), one variable each.
        features: the head's input width.
        slots: working slots.
        inputs: `(name, shape, dtype)` of each input, without the batch axis: `image` (float32
            raw pixels), or each entry of a backbone that takes a dict (keras-hub's text
            backbones: `token_ids`, `padding_mask`, ...; `signatures.input_spec`).
        signatures: `(name, task index or None, classes or None)` of each exported signature
            (None: the signature takes the task per example); empty for the Python API.
        store: where the tasks are: None, in variables; `bankstore.STORE`, in files in the
            SavedModel's assets (`bankmodule.BankModule`).
        runtime: library code digest, TensorFlow and Keras versions.
    """

    architecture: str
    kernels: tuple
    shared: tuple
    own: tuple
    non_float32: tuple
    features: int
    slots: int
    inputs: tuple
    signatures: tuple = ()
    runtime: tuple = ()
    store: str = None

    @property
    def flat_size(self):
        return sum(aligned(int(np.prod(shape))) for _, _, shape in self.kernels)

    @property
    def head_offset(self):
        return sum(int(np.prod(shape)) for _, _, shape in self.own)

    def key(self):
        """Hex SHA-256 of the whole spec (None without an architecture: nothing to compare)."""
        if self.architecture is None:
            return None
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), default=str).encode()).hexdigest()


class BankGraph(tf.Module):
    """The part of a bank that every version with one layout shares: the backbone's weights (the
    masked kernels flat and aligned, then `ID_WEIGHTS`; the other weights), `compute` (the
    backbone and head over given weights, traced once) and the working slots with their fill lock.

    Args:
        backbone: the bank's backbone (its weights are copied into flat variables).
        feature_layer: the layer whose output feeds the heads (`surgery.feature_model`).
        layout: the `PackedLayout` of the masked kernels.
        own_paths: the paths of the weights tasks own (per-task normalization), in order.
        features: the head's input width.
        slots: working slots (>= 1).
    """

    def __init__(self, backbone, feature_layer, layout, own_paths, features, slots):
        super().__init__()
        template = feature_model(backbone, feature_layer)
        # Untracked (tf.Module tracks attributes): the template's Keras variables are never
        # read, every call passes their values (stateless_call).
        self.__dict__["_template"] = template
        by_path = {v.path: v for v in template.variables}
        values = {p: np.asarray(keras.ops.convert_to_numpy(v), np.float32) for p, v in by_path.items()}
        kernels, offset = [], 0
        for path, _ in layout.kernels:
            kernels.append((path, offset, values[path].shape))
            offset += aligned(values[path].size)
        masked = set(layout.paths)
        shared_paths = [p for p in by_path if p not in masked and p not in own_paths and by_path[p].dtype == "float32"]
        shared, offset = [], 0
        for path in shared_paths:
            shared.append((path, offset, values[path].shape))
            offset += values[path].size
        own, offset = [], 0
        for path in own_paths:
            own.append((path, offset, values[path].shape))
            offset += values[path].size
        others = [p for p in by_path if p not in masked and p not in own_paths and p not in shared_paths]
        try:
            architecture = template.to_json()
        except (NotImplementedError, TypeError, ValueError):
            architecture = None
        specs = input_spec(backbone)
        self.spec = GraphSpec(
            architecture=architecture, kernels=tuple(kernels), shared=tuple(shared), own=tuple(own),
            non_float32=tuple((p, by_path[p].dtype, tuple(by_path[p].shape)) for p in others),
            features=int(features), slots=int(slots),
            inputs=tuple((s.name, tuple(s.shape[1:]), s.dtype.name) for s in tf.nest.flatten(specs)),
            runtime=(_code_digest(), tf.__version__, keras.__version__))
        # Untracked: the backbone's value of each weight a task may own, for tasks that do not.
        self.__dict__["own_defaults"] = {path: values[path] for path in own_paths}

        weights = np.zeros(layout.flat_size + ID_BITS, np.float32)
        weights[-ID_BITS:] = ID_WEIGHTS
        for path, offset, _ in kernels:
            weights[offset:offset + values[path].size] = values[path].ravel()
        self.backbone_kernels = tf.Variable(weights, trainable=False, name="backbone_kernels")
        self.shared = tf.Variable(np.concatenate([values[p].ravel() for p in shared_paths] or [np.zeros(0, np.float32)]),
                                  trainable=False, name="shared")
        self.non_float32 = [tf.Variable(keras.ops.convert_to_numpy(by_path[p]), trainable=False) for p in others]

        # The working slots: saved holding one element (-1: no task's kernels), so the file keeps
        # 1 bit per parameter; filled on first use.
        self.slots = [tf.Variable([-1.0], shape=tf.TensorShape([None]), trainable=False, name=f"slot{i}")
                      for i in range(slots)]
        self.slot_uids = tf.Variable([-1.0] * slots, trainable=False)  # a hint; the slot's id entries decide
        self.slot_used = tf.Variable([0] * slots, trainable=False, dtype=tf.int64)
        # A task's own weights (per-task normalization, head) beside its kernels, its uid last: a
        # version whose tasks are in files reads a task's `.own` only to fill one, so a warm call
        # reads no file and a deleted or overwritten version folder costs only its cold tasks.
        self.own_slots = [tf.Variable([-1.0], shape=tf.TensorShape([None]), trainable=False, name=f"own_slot{i}")
                          for i in range(slots)]
        self.own_slot_uids = tf.Variable([-1.0] * slots, trainable=False)
        self.own_slot_used = tf.Variable([0] * slots, trainable=False, dtype=tf.int64)
        self.clock = tf.Variable(0, trainable=False, dtype=tf.int64)
        self.refills = tf.Variable(0, trainable=False, dtype=tf.int64)  # slots filled since loading
        # The fill lock (`_locked_fill`): a mutex resource that every call of this graph's
        # functions finds by this name, in the Python API and in a loaded SavedModel alike.
        self._lock_name = f"tf_piggyback_bank_fill_{uuid.uuid4().hex}"

        # autograph=False: control flow is written out (tf.cond, tf.switch_case, tf.while_loop).
        # `compute` is not inlined into its callers and is stateless (see `_compute`): every
        # signature of every version runs one instance of the backbone's graph, optimized once.
        vector = tf.TensorSpec([None], tf.float32)
        self.compute = tf.function(
            self._compute, autograph=False, experimental_attributes={"_noinline": True},
            input_signature=[self.input_spec(), vector, vector, vector, tf.TensorSpec([], tf.int32),
                             [tf.TensorSpec(shape, dtype) for _, dtype, shape in self.spec.non_float32]])

    def input_spec(self):
        """What the functions take: one `image` tensor, or a dict of the backbone's named inputs."""
        specs = {name: tf.TensorSpec([None, *shape], dtype, name=name) for name, shape, dtype in self.spec.inputs}
        return specs["image"] if list(specs) == ["image"] else specs

    # ---- masked kernels ------------------------------------------------------------------
    def kernels(self, packed, kind, uid):
        """`[flat_size + ID_BITS]`: the masked kernels of the task whose packed masks (flat,
        aligned, then its id) `packed()` gives (called only to fill a slot: it may read a file),
        then its id's entries.

        A hit reads a slot without a lock. A miss takes the fill lock, looks again (a request
        that waited may find its task filled by the one before it) and otherwise fills the
        least recently used slot, so concurrent cold calls of one task unpack it once.
        """
        def fill():
            # One multiplication, in place on the unpacked mask; its last ID_BITS entries are the id.
            weights, masks = self.backbone_kernels.read_value(), packed()
            return weights * tf.cond(tf.equal(kind, 1), lambda: unpack_binary(masks), lambda: unpack_ternary(masks))

        pool = self._kernel_pool()
        return tf.cond(tf.equal(kind, 0), self.backbone_kernels.read_value, lambda: self._from_pool(pool, fill, uid))

    def own(self, read, uid):
        """`[own + head]`: the own weights of task `uid` (per-task normalization, then its head)
        that `read()` gives (called only to fill an own slot: it reads the task's `.own` file),
        from its own slot; as `kernels`, a hit takes no lock and a miss fills the least recently
        used own slot under the fill lock."""
        pool = _Pool(self.own_slots, self.own_slot_uids, self.own_slot_used, lambda held: held[-1])
        return self._from_pool(pool, lambda: tf.concat([read(), [uid]], 0), uid)[:-1]

    def _kernel_pool(self):
        def uid_of(held):  # a slot holding no task's kernels (saved as [-1]) has no id entries
            return tf.cond(tf.equal(tf.size(held), self.spec.flat_size + ID_BITS),
                           lambda: tf.reduce_sum(held[-ID_BITS:]), lambda: tf.constant(-1.0))
        return _Pool(self.slots, self.slot_uids, self.slot_used, uid_of)

    def _from_pool(self, pool, fill, uid):
        hit, slot, held = self._slot_holding(pool, uid)
        return tf.cond(hit, lambda: self._used(pool, slot, held), lambda: self._locked_fill(pool, fill, uid))

    def _slot_holding(self, pool, uid):
        """`(hit, slot, value)`: whether the slot of `pool` the hint names for `uid` holds `uid`'s
        value (the hint may be stale; the value's own id decides) and, if so, a snapshot of it
        (else empty). No slot is read when none is hinted, so a refilled slot's old copy is freed
        as it is replaced."""
        hits = tf.where(tf.equal(pool.uids.read_value(), uid))[:, 0]

        def lookup():
            slot = tf.cast(hits[0], tf.int32)
            held = tf.switch_case(slot, [lambda s=s: s.read_value() for s in pool.slots])
            hit = tf.equal(pool.uid_of(held), uid)
            # A snapshot of another task's value is let go here, not kept through a refill.
            return hit, slot, tf.cond(hit, lambda: held, lambda: tf.zeros([0], tf.float32))

        return tf.cond(tf.size(hits) > 0, lookup,
                       lambda: (tf.constant(False), tf.constant(-1), tf.zeros([0], tf.float32)))

    def _locked_fill(self, pool, fill, uid):
        """The task's value from a slot of `pool` or a fill, with the fill lock held (see `kernels`).

        Only fills write slots, and every fill holds the lock, so the read that follows a
        slot's assignment is that assignment's value (an assignment and a read are two
        operations; without the lock, a racing fill in between gave another task's kernels).
        """
        lock = tf.raw_ops.MutexLock(mutex=tf.raw_ops.MutexV2(shared_name=self._lock_name))
        with tf.control_dependencies([lock]):
            hit, slot, held = self._slot_holding(pool, uid)
            value = tf.cond(hit, lambda: self._used(pool, slot, held), lambda: self._fill(pool, fill, uid))
            check = tf.debugging.assert_equal(pool.uid_of(value), uid,
                                              message="a working slot holds another task's kernels")
        with tf.control_dependencies([value, check]):
            release = tf.raw_ops.ConsumeMutexLock(mutex_lock=lock)
        with tf.control_dependencies([release]):
            return tf.identity(value)

    def _used(self, pool, slot, value):
        """`value`, read from `slot`, once the slot is marked as used now (least recently used
        first out; outside the lock two hits may tick in either order, which only orders them)."""
        with tf.control_dependencies([pool.used.scatter_nd_update([[slot]], [self.clock.assign_add(1)])]):
            return tf.identity(value)

    def _fill(self, pool, fill, uid):
        """Stores `fill()` (its id last) in the least recently used slot of `pool` (called with the
        fill lock held)."""
        tick = self.clock.assign_add(1)
        value = fill()
        slot = tf.cast(tf.argmin(pool.used.read_value()), tf.int32)
        pool.uids.scatter_nd_update([[slot]], [uid])
        pool.used.scatter_nd_update([[slot]], [tick])
        if pool.slots is self.slots:
            self.refills.assign_add(1)

        # The slot adopts `value`'s buffer (its only user is the assignment) and the call reads
        # it back: no copy. Measured: TensorFlow's CPU allocator keeps freed buffers resident,
        # so every transient 94 MB copy of ResNet-50's kernels would stay in RSS for good.
        def store(variable):
            return variable.assign(value, read_value=True)

        return tf.switch_case(slot, [lambda s=s: store(s) for s in pool.slots])

    # ---- the backbone ---------------------------------------------------------------------
    def _compute(self, inputs, flat, shared, own, classes, others):
        """The backbone and head over given weights. Stateless on purpose: TensorFlow gives
        every caller of a stateful function its own instance (`StatefulPartitionedCall`), so
        each task's signature would build and keep its own copy of the backbone's graph
        (measured: 0.9 s and ~100 MB per task on its first call); a stateless one is shared."""
        spec, values = self.spec, {}
        for layout, source in ((spec.kernels, flat), (spec.shared, shared), (spec.own, own)):
            for path, offset, shape in layout:
                values[path] = tf.reshape(source[offset:offset + int(np.prod(shape))], shape)
        values.update(zip([path for path, _, _ in spec.non_float32], others))
        template = self._template
        features, _ = template.stateless_call(
            [values[v.path] for v in template.trainable_variables],
            [values[v.path] for v in template.non_trainable_variables], inputs, training=False)
        # a token sequence is pooled over the tokens its padding mask marks, as the task's head does
        features = pool_features(features, inputs.get("padding_mask") if isinstance(inputs, dict) else None)
        head = own[spec.head_offset:]
        kernel = tf.reshape(head[:spec.features * classes], [spec.features, classes])
        return tf.matmul(features, kernel) + head[spec.features * classes:]
