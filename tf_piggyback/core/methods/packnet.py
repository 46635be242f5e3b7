"""PackNet (Mallya & Lazebnik, CVPR 2018), the baseline of Table 2 whose results depend on task order.

One network holds every task. Each kernel weight has an owner: the backbone (0), task k (k >= 1),
or nobody (`FREE`). Adding task k trains only the free weights (and a new head), then prunes a
fraction of them by magnitude back to free, and retrains the rest; task k then computes with the
weights owned by the backbone and tasks 1..k. Earlier tasks keep their outputs, but later tasks get
fewer free weights, so results depend on the order tasks arrive (Table 2's ↓ and ↑ rows).
Biases and BatchNormalization stay the backbone's, as in piggyback without `train_bn`.

As in §4 (Table 2's PackNet), the backbone starts 50% pruned and each task's weights are pruned by
75%, then retrained at a tenth of the learning rate. The paper's initial network was pruned and
retrained on ImageNet; this implementation prunes the backbone by magnitude without retraining
(ImageNet is not at hand), so the first task also relearns what the pruning removed. The pruning is written with NumPy: `tensorflow-model-optimization`
only works with legacy Keras 2 (BUILD.md).

Stored as one pickle-free `.npz` (`save` / `PackNet.load`): the network's kernels (float32), their
owners (int8) and each task's head, with the backbone's fingerprint and SHA-256 checksums.
"""

import dataclasses
import json
import os

import keras
import numpy as np

from tf_piggyback.core.files import TaskFileError, read_npz, sha256, write_atomic, write_npz
from tf_piggyback.core.fingerprint import backbone_entry, check_backbone
from tf_piggyback.core.methods.base import Method, momentum_sgd, register
from tf_piggyback.core.surgery import add_head, feature_model, head_name, iter_layers, kernel_weights

FREE = -1
DEFAULT_PRUNE = 0.75
DEFAULT_BACKBONE_PRUNE = 0.5
FORMAT = "tf_piggyback.packnet"
VERSION = 1


def _kernels(body):
    return [w for layer in iter_layers(body) for w in kernel_weights(layer)]


def validate_prune(prune):
    if isinstance(prune, bool) or not isinstance(prune, (int, float)) or not 0 < prune < 1:
        raise ValueError(f"prune must be a fraction strictly between 0 and 1. Received: prune={prune!r}")
    return float(prune)


class PackNet:
    """A backbone packed with tasks; `add_task` trains one more.

    Args:
        backbone: the pretrained backbone (not modified: the pack trains its own copy).
        prune: the fraction of each layer's weights a task frees after training, by magnitude
            (default 0.75, as in §4).
        backbone_prune: the fraction of the backbone's weights freed before the first task
            (default 0.5, as in §4).
        feature_layer: as for `piggyback`.

    Example:
    >>> import tf_piggyback as pb
    >>> from tf_piggyback.training.trainer import epoch_batches, train
    >>> pack = PackNet(pb.digits_backbone())
    >>> examples = pb.load_dataset("digits:upper").train.take(64)
    >>> def fit(model, phase):                       # phase "train", then "retrain"
    ...     config = pb.TrainConfig(method="packnet", epochs=1)
    ...     _ = train(model, epoch_batches(examples, 32), config, log=lambda line: None,
    ...               gradient_masks=pack.gradient_masks())
    >>> pack.add_task(fit, num_classes=5)            # trains, prunes, retrains
    1
    >>> model = pack.task_model(1)                   # a plain Keras model for task 1
    >>> model.output_shape
    (None, 5)
    """

    def __init__(self, backbone, prune=DEFAULT_PRUNE, *, backbone_prune=DEFAULT_BACKBONE_PRUNE, feature_layer=None,
                 _prune_backbone=True):
        self.prune, self.backbone_prune = validate_prune(prune), validate_prune(backbone_prune)
        self.backbone = backbone_entry(backbone)  # its name and fingerprints, as the saved pack records them
        self.feature_layer = feature_layer
        features = feature_model(backbone, feature_layer)
        self.body = keras.models.clone_model(features, recursive=True)
        self.body.set_weights(features.get_weights())
        self.kernels = _kernels(self.body)
        kernel_ids = {id(k) for k in self.kernels}
        for layer in iter_layers(self.body):
            layer.trainable = any(id(w) in kernel_ids for w in layer.weights) and \
                not isinstance(layer, keras.layers.BatchNormalization)
            for w in layer.weights:
                if id(w) not in kernel_ids:
                    w.trainable = False
        self.owners = [np.zeros(k.shape, np.int8) for k in self.kernels]
        # 1 where the current training phase may change a weight (read by the train step).
        self.trainable_masks = [keras.Variable(np.zeros(k.shape, np.float32), trainable=False) for k in self.kernels]
        self.tasks = []  # {"num_classes", "class_names", "metrics", "head": [arrays]}
        if _prune_backbone:
            self._prune(0, self.backbone_prune)

    def _prune(self, owner, fraction):
        """Frees `fraction` of `owner`'s weights, those with the smallest |w|, in every layer."""
        for kernel, owners in zip(self.kernels, self.owners):
            values = keras.ops.convert_to_numpy(kernel)
            owned = np.flatnonzero(owners == owner)
            count = int(round(fraction * owned.size))
            order = np.argsort(np.abs(values.reshape(-1)[owned]), kind="stable")
            freed = owned[order[:count]]
            owners.reshape(-1)[freed] = FREE
            values.reshape(-1)[freed] = 0.0
            kernel.assign(values)

    def _allow(self, owner):
        for mask, owners in zip(self.trainable_masks, self.owners):
            mask.assign((owners == owner).astype(np.float32))

    def gradient_masks(self):
        """`{id(kernel): 0/1 mask}` for `trainer.train(..., gradient_masks=...)`."""
        return {id(k): m for k, m in zip(self.kernels, self.trainable_masks)}

    def training_model(self, num_classes):
        """The shared network and a new head, trained in place by `add_task`."""
        return add_head(self.body, num_classes, name=f"packnet_{self.backbone['name']}_{len(self.tasks) + 1}")

    def add_task(self, fit, num_classes, class_names=None):
        """Learns task `len(tasks) + 1`: train the free weights, prune, retrain the kept ones.

        Args:
            fit: `fit(model, phase)` trains `model` (phase `"train"`, then `"retrain"`), e.g. with
                `trainer.train(..., gradient_masks=pack.gradient_masks())`.
            num_classes: classes of the new task.
            class_names: optional names, stored with the task.

        Returns:
            The new task's index k (>= 1), for `task_model(k)`.
        """
        k = len(self.tasks) + 1
        model = self.training_model(num_classes)
        self._allow(FREE)
        self._fit_owned_only(fit, model, "train", FREE)
        for owners in self.owners:
            owners[owners == FREE] = k
        self._prune(k, self.prune)
        self._allow(k)
        self._fit_owned_only(fit, model, "retrain", k)
        self._allow(None)
        head = model.get_layer(head_name(model))
        self.tasks.append({"num_classes": int(num_classes), "metrics": {},
                           "class_names": list(class_names or [str(i) for i in range(num_classes)]),
                           "head": [keras.ops.convert_to_numpy(w) for w in head.weights]})
        return k

    def _fit_owned_only(self, fit, model, phase, owner):
        """`fit(model, phase)`, refused in one line if it changed a weight `owner` does not own: a
        `fit` without `gradient_masks()` (Keras' `model.fit` applies none) would overwrite earlier
        tasks and the backbone."""
        before = [keras.ops.convert_to_numpy(kernel) for kernel in self.kernels]
        fit(model, phase)
        for kernel, owners, old in zip(self.kernels, self.owners, before):
            if not np.array_equal(keras.ops.convert_to_numpy(kernel)[owners != owner], old[owners != owner]):
                raise ValueError(
                    f"PackNet's fit changed {kernel.path}'s weights that earlier tasks or the backbone own: Keras' "
                    "model.fit cannot mask gradients; train with tf_piggyback.train(..., "
                    "gradient_masks=pack.gradient_masks()) (or scripts/train.py --method=packnet)")

    def task_model(self, k):
        """A plain Keras model for task k: the weights of the backbone and tasks 1..k, and k's head."""
        if not 1 <= k <= len(self.tasks):
            raise ValueError(f"this pack has tasks 1..{len(self.tasks)}. Received: k={k!r}")
        body = keras.models.clone_model(self.body, recursive=True)
        body.set_weights(self.body.get_weights())
        for kernel, source, owners in zip(_kernels(body), self.kernels, self.owners):
            kernel.assign(keras.ops.convert_to_numpy(source) * ((owners >= 0) & (owners <= k)))
        model = add_head(body, self.tasks[k - 1]["num_classes"], name=f"packnet_task{k}")
        model.get_layer(head_name(model)).set_weights(self.tasks[k - 1]["head"])
        return model

    def free_fraction(self):
        """The fraction of kernel weights no task owns: the room left for later tasks."""
        return float(sum(np.count_nonzero(o == FREE) for o in self.owners) / sum(o.size for o in self.owners))

    def save(self, path):
        """Writes the pack to `path` (`.npz`), atomically."""
        arrays = {}
        for i, (kernel, owners) in enumerate(zip(self.kernels, self.owners)):
            arrays[f"k{i}"], arrays[f"o{i}"] = keras.ops.convert_to_numpy(kernel), owners
        for t, task in enumerate(self.tasks):
            for j, w in enumerate(task["head"]):
                arrays[f"h{t}_{j}"] = w
        manifest = {
            "format": FORMAT, "version": VERSION, "prune": self.prune, "backbone_prune": self.backbone_prune,
            "feature_layer": self.feature_layer,
            "backbone": self.backbone,
            "kernels": [{"name": k.path, "shape": list(k.shape)} for k in self.kernels],
            "tasks": [{key: value for key, value in task.items() if key != "head"} | {"heads": len(task["head"])}
                      for task in self.tasks],
            "sha256": {name: sha256(array) for name, array in arrays.items()},
        }
        arrays = {"manifest": np.frombuffer(json.dumps(manifest).encode("utf-8"), np.uint8), **arrays}
        write_atomic(path, lambda f: write_npz(f, arrays))

    @classmethod
    def load(cls, path, backbone):
        """The pack saved at `path`, on `backbone` (checked by fingerprint); raises `TaskFileError`."""
        manifest, arrays = read_npz(path, FORMAT, VERSION)
        check_backbone(backbone, manifest, path, TaskFileError)
        pack = cls(backbone, manifest["prune"], backbone_prune=manifest["backbone_prune"],
                   feature_layer=manifest["feature_layer"], _prune_backbone=False)
        if len(manifest["kernels"]) != len(pack.kernels):
            raise TaskFileError(f"{path!r} has {len(manifest['kernels'])} kernels; the backbone has {len(pack.kernels)}")
        for i, kernel in enumerate(pack.kernels):
            if tuple(arrays[f"k{i}"].shape) != tuple(kernel.shape):
                raise TaskFileError(f"{path!r}: kernel {i} has shape {arrays[f'k{i}'].shape}, not {tuple(kernel.shape)}")
            kernel.assign(arrays[f"k{i}"])
            pack.owners[i] = arrays[f"o{i}"].astype(np.int8)
        for t, task in enumerate(manifest["tasks"]):
            heads = task.pop("heads")
            pack.tasks.append({**task, "head": [arrays[f"h{t}_{j}"] for j in range(heads)]})
        return pack


def retrain_epochs(epochs):
    """PackNet's retraining after pruning: half the epochs (at least 1), at a tenth of the lr."""
    return max(1, epochs // 2)


@register
class PackNetMethod(Method):
    """PackNet as `--method=packnet`: each run adds one task to the pack in `config.packnet_base`
    (a previous PackNet run's model_dir; empty: a new pack on the backbone) and writes the grown
    pack, every task so far, to `packnet.npz`."""

    name = "packnet"
    takes_head = False
    output = "packnet.npz"
    storage = "pack"
    learning_rates = ("finetune_lr",)

    def start(self, backbone, num_classes, config, head=None):
        if not config.packnet_base:
            return PackNet(backbone, config.prune, feature_layer=config.feature_layer)
        path = os.path.join(config.packnet_base, self.output)
        if not os.path.exists(path):
            raise ValueError(f"--packnet_base={config.packnet_base} holds no {self.output}; "
                             "pass the --model_dir of a finished PackNet run")
        return PackNet.load(path, backbone)

    def train(self, pack, config, fit, class_names):
        history = []

        def fit_phase(task_model, phase):
            # The retraining starts from trained weights and head: no warm-up (BUILD.md, "Training defaults").
            train_config = config.train if phase == "train" else dataclasses.replace(
                config.train, epochs=retrain_epochs(config.train.epochs), finetune_lr=config.train.finetune_lr * 0.1,
                warmup_epochs=0)
            history.extend(fit(task_model, train_config, phase, gradient_masks=pack.gradient_masks()))

        model = pack.task_model(pack.add_task(fit_phase, len(class_names), class_names))
        model.pack = pack
        return model, history

    def optimizers(self, model, config, steps_per_epoch):
        return momentum_sgd(model, config, steps_per_epoch)

    def summary(self, model):
        """`sparsity`: the room left for later tasks; `params`: the one network all tasks share."""
        pack = model.pack
        return {"sparsity": pack.free_fraction(), "params": int(sum(k.size for k in pack.owners)),
                "task_index": len(pack.tasks)}

    def save(self, model, path, *, class_names, metrics):
        model.pack.tasks[-1]["metrics"] = {k: metrics[k] for k in ("accuracy", "top1_error")}
        model.pack.save(path)
