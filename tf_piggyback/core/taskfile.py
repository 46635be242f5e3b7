"""Task files: one task's masks (1 bit per parameter or less) and head in a pickle-free `.npz`.

Layout (BUILD.md, "Task file format"), readable with `numpy.load(path, allow_pickle=False)`:
- `manifest`: UTF-8 JSON as uint8 — format and version, the backbone's name and SHA-256
  fingerprint, the options the task model was built with, per-layer names, shapes, sparsity
  and coding, the class names, image size and metrics.
- `masks`: uint8, every layer's mask payload one after another (see `tf_piggyback.core.coding`).
- `w0`, `w1`, ...: the task's own weights (the head and, with `train_bn`, BatchNormalization).

Reference: §3, last paragraph: only the thresholded masks are kept, 1 bit per parameter.
"""

import json
import os
import re

import keras
import numpy as np

from tf_piggyback.core import coding, methods
from tf_piggyback.core.files import TaskFileError, read_npz, read_npz_digest, sha256, write_atomic, write_npz
from tf_piggyback.core.fingerprint import check_backbone
from tf_piggyback.core.surgery import head_name, mask_sparsity, masked_layers, task_weights

FORMAT = "tf_piggyback.task"
VERSION = 1


def save_task(model, path, *, class_names=None, metrics=None):
    """Writes `model`'s task to `path` (a `.npz`), atomically.

    Args:
        model: a model made by a method that writes task files (`piggyback`, `classifier_only`,
            `lora`; see `tf_piggyback.core.methods`), or returned by `load_task`.
        path: destination; written to a temporary file in the same folder, then renamed.
        class_names: optional list of `num_classes` strings.
        metrics: optional JSON-serializable dict, e.g. `{"accuracy": 0.93}`.

    Returns:
        The manifest dict that was written.

    Example:
    >>> import tf_piggyback as pb
    >>> model = pb.piggyback(pb.digits_backbone(), num_classes=3)
    >>> manifest = save_task(model, "birds/task.npz", class_names=["jay", "owl", "wren"],
    ...                      metrics={"accuracy": 0.93})
    >>> manifest["class_names"]
    ['jay', 'owl', 'wren']
    """
    spec = getattr(model, "task_spec", None)
    if spec is None:
        raise ValueError(
            f"model {model.name!r} was not made by tf_piggyback.piggyback, classifier_only or lora (a model "
            "read back from a .keras file is not: make the task model again, model.load_weights(...) the "
            "checkpoint into it, then save_task); finetuned models are saved with model.save('model.keras')"
        )
    if class_names is not None and len(class_names) != spec.num_classes:
        raise ValueError(
            f"class_names has {len(class_names)} names but the model has {spec.num_classes} classes"
        )
    weights = task_weights(model)
    own = [keras.ops.convert_to_numpy(w) for w in weights]  # read once: checked here, stored below
    broken = [m.path for layer in masked_layers(model) for m in layer.masks
              if not bool(keras.ops.all(keras.ops.isfinite(m)))]
    broken += [w.path for w, value in zip(weights, own) if not np.all(np.isfinite(value))]
    if broken:  # a NaN m_r would threshold to 0 and be stored as a silent "off"
        raise ValueError(f"cannot save the task: {len(broken)} of its weights hold NaN or inf "
                         f"({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}); the training diverged: "
                         "lower the learning rate and train again")
    layers, payloads, masks, offset = [], [], [], 0
    for layer in masked_layers(model):
        for kernel, mask in zip(layer.kernels, layer.thresholded_masks()):
            masks.append(mask)
            payload, info = coding.encode(mask, layer.mask_type)
            layers.append({
                "name": kernel.path,
                "shape": list(mask.shape),
                "sparsity": mask_sparsity([mask]),
                "offset": offset,
                "nbytes": len(payload),
                **info,
            })
            payloads.append(payload)
            offset += len(payload)
    input_shape = model.inputs[0].shape
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "method": spec.method,
        "backbone": spec.backbone,
        "num_classes": spec.num_classes,
        # The head's layer: "head" unless the backbone has a layer of that name (files without
        # this key were all "head"); a reader of its weights (the task bank) matches this prefix.
        "head_name": head_name(model),
        "options": spec.options,
        "class_names": list(class_names) if class_names is not None else [str(i) for i in range(spec.num_classes)],
        "image_size": list(input_shape[1:]),
        "params": int(sum(m.size for m in masks)),
        "sparsity": mask_sparsity(masks),
        "layers": layers,
        "weights": [{"name": w.path, "shape": list(w.shape)} for w in weights],
        "metrics": metrics or {},
    }
    arrays = {"masks": np.frombuffer(b"".join(payloads), dtype=np.uint8), **{f"w{i}": value for i, value in enumerate(own)}}
    manifest["sha256"] = {name: sha256(array) for name, array in arrays.items()}
    arrays = {"manifest": np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8), **arrays}
    write_atomic(path, lambda f: write_npz(f, arrays))
    return manifest


def read_task(path):
    """Returns `(manifest, arrays)` of a task file, checked; raises `TaskFileError`."""
    return read_npz(path, FORMAT, VERSION)


def read_manifest(path):
    """The manifest dict of a task file (checked like `load_task` does)."""
    return read_task(path)[0]


class TaskRecord:
    """A task file read once and checked against its backbone: the manifest, and each mask and
    task weight by the path of the variable it belongs to (`load_task` and `TaskBank.add` both
    read files through it).

    Attributes:
        path: the file.
        manifest: its manifest (see the module docstring).
        mask_names: the paths of the kernels it masks, in the order the task model had them.
        weight_names: the paths of its own weights (head, per-task normalization), likewise.
        sha256: hex SHA-256 of the bytes read (the file is read once).
    """

    def __init__(self, path, backbone, fingerprint=None):
        self.path = path
        self.manifest, self._arrays, self.sha256 = read_npz_digest(path, FORMAT, VERSION)
        check_backbone(backbone, self.manifest, path, TaskFileError, actual=fingerprint)
        self._masks = {entry["name"]: entry for entry in self.manifest["layers"]}
        self._weights = {entry["name"]: (i, entry) for i, entry in enumerate(self.manifest["weights"])}
        self.mask_names, self.weight_names = list(self._masks), list(self._weights)

    def mask(self, name, shape):
        """The int8 mask of kernel `name`, checked to have `shape`."""
        entry = self._masks[name]
        _check_shape(self.path, entry, shape)
        payload = self._arrays["masks"][entry["offset"]:entry["offset"] + entry["nbytes"]].tobytes()
        return coding.decode(payload, entry, tuple(shape))

    def weight(self, name, shape=None):
        """The value of task weight `name`, checked to have `shape` (when given)."""
        index, entry = self._weights[name]
        if shape is not None:
            _check_shape(self.path, entry, shape)
        return self._arrays[f"w{index}"]

    def matched(self, names, paths, what):
        """This file's names for the model's variables `paths` (`names`: `mask_names` or
        `weight_names`): by path; where the paths differ but the counts agree, in order (the
        fingerprint has shown the backbone's weights are these, in this order; only a layer's
        auto-generated name, `dense_3`, differs from process to process)."""
        if len(names) != len(paths):
            raise TaskFileError(f"{self.path!r} holds {len(names)} {what}; the model has {len(paths)}")
        return list(paths) if set(paths) == set(names) else list(names)


def load_task(path, backbone):
    """Rebuilds a task model from a task file and the backbone it was trained on.

    Args:
        path: a file written by `save_task`.
        backbone: the same backbone (weights are checked by SHA-256 fingerprint).

    Returns:
        The task model with `model.task_spec` set and `model.manifest` holding the manifest.
        Its masks are the stored ones, so its outputs equal the saved model's.

    Raises:
        TaskFileError: missing, truncated, corrupted or foreign file, or another backbone.

    Example:
    >>> import tf_piggyback as pb
    >>> manifest = save_task(pb.piggyback(pb.digits_backbone(), num_classes=3), "birds/task.npz")
    >>> model = load_task("birds/task.npz", pb.digits_backbone())
    >>> model.output_shape
    (None, 3)
    """
    record = TaskRecord(path, backbone)
    manifest = record.manifest
    try:
        model = methods.get(manifest["method"]).load(backbone, manifest)
        masked = [(layer, mask, kernel) for layer in masked_layers(model)
                  for mask, kernel in zip(layer.masks, layer.kernels)]
        names = record.matched(record.mask_names, [kernel.path for _, _, kernel in masked], "masks")
        for (layer, mask, _), name in zip(masked, names):
            mask.assign(layer.mask_value(record.mask(name, mask.shape)))
        weights = task_weights(model)
        names = record.matched(record.weight_names, [w.path for w in weights], "task weights")
        for weight, name in zip(weights, names):
            weight.assign(record.weight(name, weight.shape))
    except (KeyError, ValueError, TypeError) as e:
        if isinstance(e, TaskFileError):
            raise
        raise TaskFileError(f"{path!r} does not fit this backbone or is corrupted: {e}") from None
    model.manifest = manifest
    return model


def _check_shape(path, entry, shape):
    if tuple(entry["shape"]) != tuple(shape):
        raise TaskFileError(
            f"{path!r}: {entry['name']} has shape {tuple(entry['shape'])} but the backbone's is {tuple(shape)}"
        )


def parse_task(spec):
    """`NAME=PATH` or `PATH` -> `(signature name, path)`; see `task_name` for the default name."""
    name, sep, path = spec.partition("=")
    if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return name, path
    return task_name(spec), spec


def task_name(path):
    """A signature name for a task file: its folder's name for `.../NAME/task.npz`, else its stem."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) if stem == "task" else stem
    name = re.sub(r"[^A-Za-z0-9_]", "_", name) or "task"
    return name if not name[0].isdigit() else f"task_{name}"


def named_tasks(task_paths):
    """`--task` values (`PATH` or `NAME=PATH`) -> `(names, paths)`; names must differ."""
    if not task_paths:
        raise ValueError("give at least one --task")
    names, paths = zip(*[parse_task(p) for p in task_paths])
    if len(set(names)) != len(names):
        raise ValueError(f"task names must differ; got {list(names)}: name them with --task=NAME=PATH")
    return names, paths
