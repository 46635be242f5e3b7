"""The part of a `TaskBank` that its versions share: the backbone traced once (`compute`,
stateless), its weights and the few working slots of masked kernels (`BankGraph`, its slots in
`slots.WorkingSlots`), and all that the traced functions depend on (`GraphSpec`). A graph
depends on the bank's layout (`packing.PackedLayout`), not on which tasks it holds, so every
version with that layout shares it: a new version neither retraces the backbone nor starts with
cold slots (`versions.BankModule` is one version; BUILD.md, "Many tasks in one SavedModel").

Reference: §3, last paragraph (only the thresholded masks are kept).
"""

import dataclasses
import functools
import hashlib
import json
import os

import keras
import numpy as np
import tensorflow as tf

from tf_piggyback.core.surgery import feature_model, pool_features
from tf_piggyback.serving.packing import ID_BITS, ID_WEIGHTS, aligned
from tf_piggyback.serving.signatures import input_spec
from tf_piggyback.serving.slots import WorkingSlots


@functools.lru_cache(maxsize=1)
def _code_digest():
    """SHA-256 of this package's source (`GraphSpec.runtime`: other code may trace another graph)."""
    digest = hashlib.sha256()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the whole package
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """Everything a bank's traced functions read when they are traced, and nothing else: what
    they do with it is fixed by `runtime` (this library's code, TensorFlow's and Keras' versions).
    Two banks with equal specs trace equal graphs, so an export may keep the last version's graph
    when the specs' `key`s agree (`saved_model.export_saved_model`); it is complete by construction,
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
        store: where the tasks are: None, in variables; `store.STORE`, in files in the
            SavedModel's assets (`versions.BankModule`).
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

        self.working = WorkingSlots(slots, self.spec.flat_size)

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

    def kernels(self, packed, kind, uid):
        """`[flat_size + ID_BITS]`: the masked kernels of task `uid` from a working slot, or the
        backbone's for a classifier-only task (`WorkingSlots.kernels`)."""
        return self.working.kernels(self.backbone_kernels, packed, kind, uid)

    def own(self, read, uid):
        """`[own + head]`: task `uid`'s own weights from a working slot (`WorkingSlots.own`)."""
        return self.working.own(read, uid)

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
