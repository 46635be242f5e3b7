"""A multi-task SavedModel's tasks on disk, and what the latest version offers the next one.

An export of several tasks writes each task as two files in `assets/tf_piggyback_tasks/`
(BUILD.md, "Many tasks in one SavedModel"): `<blob>.masks`, its masks packed over the bank's
layout (`PackedLayout.pack`, without the id), and `<blob>.own`, its own weights (per-task
normalization, then the head's kernel and bias; float32, little-endian). The served graph reads
a task's `.masks` and `.own` only when it fills their slots (`tf.io.read_file`, a standard op that
TensorFlow Serving runs: `versions.BankModule`), so a loaded version holds the backbone, its
slots and a few numbers per task, whatever the number of tasks, and a warm call reads no file: a
deleted or overwritten version folder fails only its cold tasks.

A version's files never change, and a blob's name hashes everything its bytes depend on (the
task file's SHA-256, the layout, the own weights' layout), so a blob of that name in the latest
version is the same bytes: the next version links it (a hard link) instead of writing it.

Reference: §3, last paragraph (only the thresholded masks are kept).
"""

import hashlib
import json
import logging
import os
import shutil
import typing

import numpy as np
import tensorflow as tf

from tf_piggyback.serving.packing import KINDS, PackedLayout

STORE = "tf_piggyback_tasks"  # the folder in a SavedModel's assets/ that holds its tasks' files
LISTING = "tf_piggyback_tasks.json"  # in a SavedModel's assets/: `TaskBank.listing`, what `export/list_tasks.py` prints
_VARIABLE = "{}/.ATTRIBUTES/VARIABLE_VALUE"  # a `BankModule` variable's key in a SavedModel's checkpoint
_SUFFIXES = (".masks", ".own")


def blob_name(digest, layout, own_paths):
    """The name of a task's files: a hash of its task file's SHA-256 `digest`, the bank's
    `PackedLayout` and the paths of the weights its tasks own, in order."""
    return hashlib.sha256(json.dumps([digest, layout.kernels, list(own_paths)]).encode()).hexdigest()[:40]


def write_blob(folder, name, packed, own):
    """Writes a task's files into `folder` (an export's temporary version folder: the version is
    renamed into place whole, so each file needs no rename of its own). A blob another task of the
    version wrote already (the same task file twice: `blob_name`) is the same bytes and is kept;
    two such tasks read at the same time (`TaskBank.add_all`'s threads) write the same bytes."""
    for suffix, array in zip(_SUFFIXES, (np.asarray(packed, np.uint8), np.asarray(own, "<f4"))):
        if os.path.exists(os.path.join(folder, name + suffix)):
            continue
        with open(os.path.join(folder, name + suffix), "wb") as f:
            f.write(array.tobytes())


def packed_bytes(layout, kind):
    """The size of a task's `.masks` file."""
    return 0 if kind == "none" else layout.flat_size // (8 if kind == "binary" else 4)


def task_paths(folder, name):
    """The `(masks, own)` file paths of blob `name` in a store `folder` (tensors or strings)."""
    return [folder + name + suffix for suffix in _SUFFIXES]


def claims(layout, own_paths, kind):
    """`(masked, owned)`: the kernel and weight paths that a task kept in files counts as masking
    and owning, as `BankTask.masks` and `.own` name them (values None: they are in the files): the
    whole `layout` (none for a classifier-only task, `kind` "none") and every owned weight, which
    its files are written over, so a version's layout is its plan's whatever each task masks (an
    unmasked kernel is all ones, an unowned weight the backbone's)."""
    return dict.fromkeys([] if kind == "none" else layout.paths), dict.fromkeys(own_paths)


class Plan(typing.NamedTuple):
    """Where an export writes its tasks' files and what they are written over
    (`reader.TaskReader.plan`): the folder, the layout, the owned weights' paths and how many floats
    they hold (counted once: asking Keras for shapes per task cost seconds at 10,000 tasks)."""

    folder: str
    layout: PackedLayout
    own_paths: list
    own_size: int

    def sizes(self, kind, head_size):
        """The sizes in bytes of a task's `.masks` and `.own` files."""
        return packed_bytes(self.layout, kind), 4 * (self.own_size + head_size)

    def claims(self, kind):
        """What a task of `kind` written to this plan's files masks and owns (`claims`)."""
        return claims(self.layout, self.own_paths, kind)


class Exported:
    """The tasks that the latest multi-task SavedModel under a base path offers the next version
    (`TaskBank.add_all`'s `previous`): by their task file's SHA-256, a task's packed masks read back
    with the `PackedLayout` its listing records (`kernels`), and its files by blob name to link.

    Only a SavedModel of a bank over the same backbone (fingerprint) offers tasks; any other
    offers none, says why in one line (logged), and its files are decoded. A version written
    before tasks went to files (its masks in a `packed` variable) still offers its masks."""

    def __init__(self, path, fingerprint):
        listing_path = os.path.join(path, "assets", LISTING)
        if not os.path.isfile(listing_path):
            raise ValueError(f"{path} holds no assets/{LISTING}: not a SavedModel written by export_saved_model")
        self._folder = os.path.join(path, "assets", STORE)
        self._tasks, self._stats, self._arrays, why = {}, {}, None, None
        try:  # anything unreadable offers nothing (IndexError: truncated variables): the files are decoded
            with open(listing_path) as f:
                listing = json.load(f)
            reader = None if listing.get("store") == STORE else tf.train.load_checkpoint(
                os.path.join(path, "variables", "variables"))
            if listing.get("kernels") is None or reader and not reader.has_tensor(_VARIABLE.format("packed")):
                why = "it holds no packed masks (a single task's export)"
            elif listing["backbone"]["fingerprint"] != fingerprint:
                why = "it was exported for another backbone"
            else:
                self._layout = PackedLayout(tuple((p, int(size)) for p, size in listing["kernels"]))
                if reader:  # ~3 MB per ResNet-50 task, read now, while an error can still be handled
                    self._arrays = {n: reader.get_tensor(_VARIABLE.format(n)) for n in ("packed", "packed_offsets")}
                self._tasks = {t["source_sha256"]: (i, t) for i, t in enumerate(listing["tasks"])}
                if reader is None:
                    self._own, self.feature_layer = listing["own"], listing["feature_layer"]
                    self._stats = {json.dumps(t["source_stat"]): t for t in listing["tasks"] if t.get("blob")}
        except (ValueError, KeyError, TypeError, IndexError, tf.errors.OpError) as e:
            self._tasks, why = {}, f"it cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        if why:
            logging.warning("every task file is decoded: the latest version %s offers no tasks, since %s", path, why)

    def entry(self, stat):
        """The listing's entry of the task whose file had `stat` (`files.file_stat`) when this
        version read it, if it is in files; else None."""
        return self._stats.get(json.dumps(stat))

    def claims(self, entry):
        """What the unchanged task of listing `entry` masks and owns in this version's files
        (`claims`), which a new version's plan counts (`reader.TaskReader.plan`)."""
        return claims(self._layout, self._own, entry["mask_type"])

    def masks(self, digest):
        """`{kernel path: packed mask}` of the task whose file has SHA-256 `digest` (all kernels
        of the layout, those it does not mask all ones), or None if there is no such task."""
        if digest not in self._tasks:
            return None
        index, task = self._tasks[digest]
        kind = task["mask_type"]
        if kind not in KINDS or kind == "none":
            return None
        if self._arrays is None:
            try:
                packed = np.fromfile(task_paths(self._folder + os.sep, task["blob"])[0], np.uint8)
            except (KeyError, OSError):
                return None
            if packed.size != packed_bytes(self._layout, kind):  # a damaged file: decode the task file
                return None
        else:
            start, end = self._arrays["packed_offsets"][index:index + 2]
            packed = self._arrays["packed"][start:end]
        return self._layout.split(packed, kind)

    def link(self, name, folder, sizes):
        """Links blob `name`'s files into `folder` if the latest version has them with their
        `sizes` in bytes (then they are the same bytes: `blob_name`); a copy where links are not
        possible. Returns whether it did."""
        sources = task_paths(self._folder + os.sep, name)
        if not self._tasks or not all(os.path.isfile(s) and os.path.getsize(s) == n for s, n in zip(sources, sizes)):
            return False
        for source, target in zip(sources, task_paths(folder + os.sep, name)):
            if os.path.exists(target):  # another task of this version has the same blob (one task file twice)
                continue
            try:
                os.link(source, target)
            except FileExistsError:  # ... linked by another task read at the same time (`TaskBank.add_all`)
                continue
            except OSError:  # another file system, or one without links
                shutil.copyfile(source, target)
        return True
