"""Task files into a `TaskBank`'s tasks (BUILD.md, "Many tasks in one SavedModel"): each file read
once, its fingerprint checked, its masks decoded and packed over the bank's layout (`BankTask`), in
memory or into an export's files (`serving.store`), or taken from the latest version (`store.Exported`)
when it holds the file's task already.

Reference: §3, last paragraph (only the thresholded masks are kept).
"""

import threading

import numpy as np

from tf_piggyback.core.files import file_stat, read_npz_manifest
from tf_piggyback.core.surgery import HEAD_NAME, feature_model
from tf_piggyback.core.taskfile import FORMAT, VERSION, TaskFileError, TaskRecord
from tf_piggyback.serving.packing import PackedLayout
from tf_piggyback.serving.store import Plan, blob_name, write_blob
from tf_piggyback.serving.versions import BankTask, own_and_head, pack_masks, served_alone


class TaskReader:
    """Reads task files for a bank over `backbone` (whose weights' SHA-256 is `fingerprint`), on any
    number of threads at once: the feature models it needs are built once each.

    Reference: §3 (a task is its masks and its head, over one frozen backbone).
    """

    def __init__(self, backbone, fingerprint):
        self.backbone = backbone
        self.fingerprint = fingerprint
        self._feature_variables = {}  # feature_layer -> {path: variable}, built once each
        self._lock = threading.Lock()

    def plan(self, paths, store, previous):
        """The `store.Plan` for `TaskBank.add_all`'s `store`: the kernels any task masks and the
        weights any owns, read from the files' manifests alone, or for a file `previous` recorded
        as it is now, from what `previous.claims` for it (nothing is read)."""
        masked, owned, layer = set(), set(), None
        for path in paths:
            entry = previous.entry(file_stat(path)) if previous is not None else None
            if entry is not None:
                layer = previous.feature_layer
                claimed_masks, claimed_own = previous.claims(entry)
                masked.update(claimed_masks)
                owned.update(claimed_own)
                continue
            manifest = read_npz_manifest(path, FORMAT, VERSION)
            if not served_alone(manifest):
                layer = manifest.get("options", {}).get("feature_layer")
                head = manifest.get("head_name", HEAD_NAME)
                masked.update(entry["name"] for entry in manifest["layers"])
                owned.update(w["name"] for w in manifest["weights"] if not w["name"].startswith(f"{head}/"))
        variables = self.feature_variables(layer)
        layout = PackedLayout(tuple((p, int(np.prod(v.shape))) for p, v in variables.items() if p in masked))
        own_paths = [p for p in variables if p in owned]
        return Plan(store, layout, own_paths, sum(int(np.prod(variables[p].shape)) for p in own_paths))

    def read(self, path, previous=None, plan=None):
        """`(feature_layer, {path: variable} of its feature model, BankTask)` of a task file, not
        yet named or numbered (`TaskBank.add_all` runs this on several threads at once); from
        `previous` (an `Exported`) when it holds the file's task; into files when `plan` (a `Plan`
        from `plan`) says where. The file is read once: its SHA-256 is that of the bytes decoded (`TaskRecord.sha256`).
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
            variables = self.feature_variables(feature_layer)
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
        """`read`'s result for a task file that the latest version recorded with the same path,
        size, modification and change times and inode (`source_stat`, what git's index compares),
        and whose files it holds: nothing is read (the latest version checked the file against
        this backbone: its fingerprint is this one's), its files are linked. None otherwise (the
        file is read)."""
        entry = previous.entry(stat)
        if entry is None or entry.get("image_size") != list(self.backbone.inputs[0].shape[1:]):
            return None
        variables = self.feature_variables(previous.feature_layer)
        name = blob_name(entry["source_sha256"], plan.layout, plan.own_paths)
        head_size = (entry["features"] + 1) * entry["num_classes"]
        if not previous.link(name, plan.folder, plan.sizes(entry["mask_type"], head_size)):
            return None
        info = {k: v for k, v in entry.items() if k not in ("name", "blob")}
        masks, own = plan.claims(entry["mask_type"])
        return previous.feature_layer, variables, BankTask(None, None, entry["mask_type"], masks, own, None, info, name)

    def _store(self, record, variables, previous, plan, own, head):
        """`(blob, kind, masks, own, packed bytes)` of a task whose files go to `plan`'s folder
        (`TaskBank.add_all`'s `store`): linked from `previous` when it holds them, else packed and written.
        `masks` and `own` name the paths only (`Plan.claims`; values None: they are in the files)."""
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
        return (name, kind, *plan.claims(kind), sizes[0])

    def feature_variables(self, feature_layer):
        """`{path: variable}` of the feature model ending at `feature_layer`, built once."""
        with self._lock:
            if feature_layer not in self._feature_variables:
                self._feature_variables[feature_layer] = {
                    v.path: v for v in feature_model(self.backbone, feature_layer).variables}
            return self._feature_variables[feature_layer]
