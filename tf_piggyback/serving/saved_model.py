"""Task files -> SavedModels in TensorFlow Serving's layout (BUILD.md, "Interfaces"); TFLite / LiteRT
files are the `devices` wing's (`devices.tflite`).

Every exported signature is as `signatures` says.
- One task: the mask is baked into ordinary layers (`bake`), so the graph is the plain backbone's.
- Several tasks: a `TaskBank` (one traced backbone; each task is data: masks packed 1 bit per
  parameter and its head; a bounded set of unpacked working copies), one signature per task,
  `serving_default` being the first, and `tasks` / `tasks_by_name` for requests that mix tasks.
"""

import dataclasses
import json
import logging
import os
import shutil
import tempfile

import tensorflow as tf

from tf_piggyback.core.files import require_file, sync_directory, sync_tree
from tf_piggyback.core.surgery import bake
from tf_piggyback.core.taskfile import load_task, named_tasks, parse_task, task_name
from tf_piggyback.data.text import preprocess
from tf_piggyback.serving.signatures import input_spec, save, signature, with_outputs
from tf_piggyback.serving.store import LISTING, STORE
from tf_piggyback.serving.taskbank import DEFAULT_SLOTS, MIXED_SIGNATURES, TaskBank

# Task-path parsing is the task file's (`core.taskfile`), importable from here as before.
__all__ = ["LISTING", "bank_signatures", "build_serving_module", "export_saved_model", "list_tasks", "next_version",
           "parse_task", "task_name"]


def build_serving_module(backbone, task_paths, slots=DEFAULT_SLOTS, per_task_signatures=True, previous=None,
                         store=None, preprocessor=None):
    """A `tf.Module` and `{name: tf.function}`: the signatures of a SavedModel (BUILD.md, "Interfaces").

    One task: its baked model (`bake`), signature `serving_default` and the task's name.
    Several: a `TaskBank` module (one traced backbone, packed masks, `slots` unpacked working
    copies) with one signature per task, `serving_default` (the first), `tasks` and
    `tasks_by_name` (a task per example); with `per_task_signatures=False` only the last
    three (see `bank_signatures` for what each signature costs). The third value is the tasks' listing
    (`TaskBank.listing`), which exports store as `assets/{LISTING}`; for several tasks its `graph`
    is the key of all the traced functions depend on (`graph.GraphSpec.key`), when the
    backbone has a Keras config. Tasks that the multi-task
    SavedModel `previous` holds are taken from it, not decoded again (`TaskBank.add_all`).
    With `store` (the `assets/tf_piggyback_tasks` folder of the SavedModel being written) the
    tasks go to files there, not to variables (`serving.store`); the module must then be given the
    listing as its `listing` asset before it is saved. With a text preset's `preprocessor`, the
    module also takes strings (`text_signatures`).

    The module tracks the raw `tf.Variable`s behind the Keras variables, never a Keras model or
    Keras variable: those save a SavedModel that TF2 loads but TF1-style loaders (TensorFlow
    Serving, `saved_model_cli run`) cannot restore ("Could not find variable ..."), and
    `keras.export.ExportArchive` avoids that only by saving every variable twice.
    """
    names, paths = named_tasks(task_paths)
    bank = TaskBank(backbone, slots=slots)
    if len(paths) > 1 and store is not None:
        os.makedirs(store, exist_ok=True)
    bank.add_all(paths, names, previous=previous, store=store if len(paths) > 1 else None)
    if len(paths) > 1:
        module, signatures, spec = bank_signatures(bank, per_task_signatures)
        listing, key = bank.listing(), spec.key()
        if key and preprocessor is None:  # the string signatures are traced with the preprocessor: never reused
            listing["graph"] = key
    else:
        spec = input_spec(backbone)
        model = bake(load_task(paths[0], backbone))
        module = tf.Module()
        module.variables_ = [v.value for v in model.variables]
        serve = signature(with_outputs(lambda image: model(image, training=False)), spec, names[0])
        signatures, listing = {names[0]: serve, "serving_default": serve}, bank.listing()
    if preprocessor is not None:
        signatures.update(text_signatures(module, signatures, preprocessor, input_spec(backbone)))
    return module, signatures, listing


def bank_signatures(bank, per_task=True):
    """What an export of `bank` (a `TaskBank`) saves: `(module, {name: tf.function}, spec)`. The
    signatures are one per task (unless `per_task` is False), `serving_default` (the first task),
    `tasks` (`image`, int32 `task` per example) and `tasks_by_name` (string `task`); `spec` is the
    module's `GraphSpec` with them, whose `key` says whether two exports trace the same graph. The
    module is not traced here: `tf.saved_model.save` traces it in its own context, so tracing
    it for calls first traced the backbone twice (10 ResNet-50 tasks at 128 px exported in
    7.0-9.2 s so, in 5.8-6.7 s now; BUILD.md).

    Every signature is a graph of its own to TensorFlow: `tf.saved_model.load` rebuilds
    each with a copy of the backbone's function (measured, ResNet-50 with 100 tasks: 1.7 s
    and +0.8 GB at load, against 0.55 s without per-task signatures), and the first call
    of each instantiates it (~0.7 s, ~12 MB). `tasks` serves every task from one graph.
    """
    version, module = bank.snapshot(traced=False)
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


def _task_signature(module, index, num_classes, spec, name):
    def serve(inputs):
        logits = tf.ensure_shape(module.forward(inputs, tf.constant(index, tf.int32)), [None, num_classes])
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

    serve.__name__ = name
    return tf.function(serve, input_signature=[spec], autograph=False)


def text_signatures(module, signatures, preprocessor, spec):
    """Signatures that take strings (issue 40), the preset's preprocessor inside (tokenizer and
    packer, `text.preprocess`): `text` (string `text`, `serving_default`'s task) and, for
    several tasks, `tasks_text` (string `text` and `task`, a name per example, as
    `tasks_by_name`). Each equals its token-id signature on the preprocessor's tokens. Their
    graph holds TF Text's ops: a process loads the SavedModel after `import tensorflow_text`."""
    if not isinstance(spec, dict):
        raise ValueError("string signatures take text: the backbone takes an image")
    import tensorflow_text  # noqa: F401 (registers the tokenizer's ops while tracing)

    module.preprocessor = preprocessor  # its vocabulary and tokenizer model go to the SavedModel's assets
    text = tf.TensorSpec([None], tf.string, name="text")

    def tokens(strings):
        out = preprocess(preprocessor, strings)
        return {name: tf.cast(out[name], s.dtype) for name, s in spec.items()}

    default = signatures["serving_default"]
    out = {"text": tf.function(lambda text: default(tokens(text)), input_signature=[text])}
    if "tasks_by_name" in signatures:
        by_name = signatures["tasks_by_name"]
        out["tasks_text"] = tf.function(lambda text, task: by_name(tokens(text), task),
                                        input_signature=[text, tf.TensorSpec([None], tf.string, name="task")])
    return out


def _versions(output_dir):
    """The integer versions under a TF Serving model directory, in order."""
    return sorted(int(d) for d in os.listdir(output_dir) if d.isdigit()) if os.path.isdir(output_dir) else []


def next_version(output_dir):
    """The next free integer version under a TF Serving model directory."""
    return max(_versions(output_dir), default=0) + 1


def export_saved_model(backbone, task_paths, output_dir, version=None, overwrite=False, slots=DEFAULT_SLOTS,
                       per_task_signatures=True, preprocessor=None):
    """Writes `output_dir/<version>/` atomically; returns its path.

    Args:
        backbone: the backbone the tasks were trained on (fingerprints are checked).
        task_paths: one task file (mask baked in) or several (shared backbone, packed masks),
            each `PATH` or `NAME=PATH` (the signature's name; default from the path, `task_name`).
        output_dir: the TF Serving model base path.
        version: integer version; default the next free one.
        overwrite: replace an existing version instead of refusing.
        slots: with several tasks, how many tasks' masked kernels are kept unpacked at once
            (each a float copy of the masked kernels); others are unpacked when called.
        per_task_signatures: with several tasks, one signature per task besides
            `serving_default`, `tasks` and `tasks_by_name`; off, the model loads as fast as a
            single task's whatever the number of tasks (`bank_signatures`).
        preprocessor: a text preset's preprocessor (`text.load_preset`): signatures that take
            strings besides the token ids (`text_signatures`; loading then needs
            `import tensorflow_text`).

    A task that the latest version under `output_dir` already holds (the same task file's bytes,
    the same backbone) is read from that version's variables instead of being decoded again, so
    a new version with one more task decodes one task file. A new version whose graph would be
    the latest one's (equal `graph.GraphSpec.key`: the same layout, slots, input and
    signatures; without per-task signatures, any tasks whose first one has as many classes)
    keeps that graph and writes only its variables: nothing is traced.
    """
    if version is None:
        version = next_version(output_dir)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be an integer >= 0. Received: version={version!r}")
    final = os.path.join(output_dir, str(version))
    if os.path.exists(final) and not overwrite:
        raise ValueError(f"{final} exists; pick another --version, omit it for the next free one, or pass --overwrite")
    if os.path.exists(final):
        logging.warning(
            "overwriting %s in place: TensorFlow Serving never reloads a version number it has loaded, so a server "
            "serving it keeps the old graph until it unloads that version, and its cold tasks (those not in a "
            "working slot) read task files this replaces (their calls fail); export the next version instead "
            "(omit --version)", final)
    previous = [os.path.join(output_dir, str(v)) for v in _versions(output_dir)
                if os.path.isfile(os.path.join(output_dir, str(v), "assets", LISTING))]
    for path in named_tasks(task_paths)[1]:  # before anything is written
        require_file(path)
    created = not os.path.isdir(output_dir)  # removed again if nothing is exported
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=output_dir)
    try:
        module, signatures, listing = build_serving_module(backbone, task_paths, slots, per_task_signatures,
                                                           previous[-1] if previous else None,
                                                           store=os.path.join(tmp, "assets", STORE),
                                                           preprocessor=preprocessor)
        key = listing.get("graph")
        same_graph = previous and key and _graph_key(previous[-1]) == key
        with tempfile.TemporaryDirectory() as scratch:
            listing_path = os.path.join(scratch, LISTING)
            with open(listing_path, "w") as f:
                json.dump(listing, f, indent=1)
            module.listing = tf.saved_model.Asset(listing_path)  # copied to assets/
            if same_graph:  # what tf.saved_model.save would write, without tracing the backbone
                shutil.copy(os.path.join(previous[-1], "saved_model.pb"), tmp)
                os.makedirs(os.path.join(tmp, "assets"), exist_ok=True)
                shutil.copy(listing_path, os.path.join(tmp, "assets", LISTING))
                tf.train.Checkpoint(root=module).write(os.path.join(tmp, "variables", "variables"))
            else:
                save(module, tmp, signatures, type(backbone).__name__)
        sync_tree(tmp)  # whole on disk before its number appears
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        sync_directory(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not os.listdir(output_dir):
            os.rmdir(output_dir)
        raise
    return final


def _graph_key(path):
    """The `graph` key of an export's listing (None if it has none or cannot be read)."""
    try:
        return list_tasks(path).get("graph")
    except ValueError:  # includes unreadable JSON
        return None


def list_tasks(path):
    """What a multi-task (or single-task) export holds: a SavedModel folder's listing (names,
    classes, sparsity, source task files' SHA-256; `TaskBank.listing`), or for a `.tflite`
    file its signatures and their class counts, read with the LiteRT interpreter."""
    if os.path.isdir(path):
        listing = os.path.join(path, "assets", LISTING)
        if not os.path.isfile(listing):
            raise ValueError(f"{path} holds no {LISTING}: not a SavedModel written by export/saved_model.py")
        with open(listing) as f:
            return json.load(f)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; pass a SavedModel version folder or a .tflite file")
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=path)
    except ValueError as e:
        raise ValueError(f"{path} is not a TFLite file ({e})") from None
    tasks = []
    for name, io in interpreter.get_signature_list().items():
        runner = interpreter.get_signature_runner(name)
        tasks.append({"name": name, "num_classes": int(runner.get_output_details()["logits"]["shape"][-1])})
    return {"format": "tflite", "tasks": tasks}
