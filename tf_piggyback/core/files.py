"""Files this library writes: atomic writes, and pickle-free `.npz` archives (task files, PackNet
packs) whose manifest names their format and version and holds each array's SHA-256."""

import hashlib
import io
import json
import os
import tempfile
import zipfile

import numpy as np


class TaskFileError(ValueError):
    """A task file that cannot be used: missing, corrupted, another format, another backbone."""


def write_npz(file, arrays):
    """`np.savez` with fixed zip timestamps, so the same task always gives the same bytes."""
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())


def write_atomic(path, write):
    """Calls `write(file)` on a temporary file beside `path`, then renames it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_directory(folder)  # the rename itself survives a power loss
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_stat(path):
    """What tells that a file changed (a new task bank version finds a task file unchanged,
    `TaskBank._unchanged`; a phone file is the one opened, `PhoneTasks`): its real path, size,
    modification and change times, and inode."""
    stat = os.stat(path)
    return [os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def sync_directory(path):
    """fsyncs the directory `path`: its entries (a file renamed or created in it) are on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path):
    """fsyncs every file and folder under `path` (deepest first) and `path` itself: a folder that
    is then renamed into place (an export's version) holds whole files after a power loss, never
    empty ones whose data was still in the page cache."""
    for folder, _, names in os.walk(path, topdown=False):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        sync_directory(folder)


def read_npz(path, file_format, version):
    """`(manifest, arrays)` of a file this library wrote (`file_format`, e.g. a task file or a
    PackNet pack), checked: readable without pickle, its format and version, its checksums."""
    manifest, arrays, _ = read_npz_digest(path, file_format, version)
    return manifest, arrays


def read_npz_digest(path, file_format, version):
    """`read_npz` and the SHA-256 of the bytes it decoded: the file is read once, so a file
    replaced meanwhile cannot pair one version's digest with another's contents."""
    kind = f"{file_format.rsplit('.', 1)[-1]} file"  # "task file", "packnet file"
    require_file(path, kind)
    try:
        with open(path, "rb") as f:
            data = f.read()
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        manifest = json.loads(arrays.pop("manifest").tobytes().decode("utf-8"))
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError, UnicodeDecodeError) as e:
        raise TaskFileError(
            f"{path!r} is not a readable tf_piggyback {kind} (truncated or corrupted: {e}); write it again"
        ) from None
    _check_format(manifest, path, file_format, version, kind)
    checksums = manifest.get("sha256") or {}
    if set(checksums) != set(arrays) or any(sha256(arrays[name]) != digest for name, digest in checksums.items()):
        raise TaskFileError(f"{path!r} is corrupted: its arrays do not match the manifest's SHA-256 checksums")
    return manifest, arrays, hashlib.sha256(data).hexdigest()


def read_npz_manifest(path, file_format, version):
    """The manifest of a file `read_npz` reads, reading only its manifest (an export plans a
    bank's layout from every task's manifest, then reads each file once: `TaskBank.add_all`).
    The arrays' checksums are checked when the file is read."""
    kind = f"{file_format.rsplit('.', 1)[-1]} file"
    try:
        with np.load(path, allow_pickle=False) as archive:
            manifest = json.loads(archive["manifest"].tobytes().decode("utf-8"))
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError, UnicodeDecodeError) as e:
        require_file(path, kind)
        raise TaskFileError(
            f"{path!r} is not a readable tf_piggyback {kind} (truncated or corrupted: {e}); write it again"
        ) from None
    _check_format(manifest, path, file_format, version, kind)
    return manifest


def require_file(path, kind="task file"):
    """Raises `TaskFileError` (one line) unless `path` is a file."""
    if not os.path.isfile(path):
        raise TaskFileError(f"{kind} {path!r} does not exist; pass the file that training wrote")


def _check_format(manifest, path, file_format, version, kind):
    if not isinstance(manifest, dict) or manifest.get("format") != file_format:
        raise TaskFileError(f"{path!r} is not a tf_piggyback {kind} (its manifest has no format {file_format!r})")
    if manifest.get("version") != version:
        raise TaskFileError(
            f"{path!r} has {kind} version {manifest.get('version')!r}; this tf_piggyback reads "
            f"version {version}: upgrade tf_piggyback or write the file again"
        )


def sha256(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
