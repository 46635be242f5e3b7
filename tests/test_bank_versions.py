"""A bank whose tasks change while it answers, and exported versions of it: every answer is
the asked task's own (TF Serving's model: a version never changes, the next one is swapped in
whole). The stateful test drives every operation a user has, in any order."""

import os
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import tf_piggyback as pb
from conftest import digits_task_files
from tf_piggyback.serving.saved_model import export_saved_model, list_tasks
from tf_piggyback.serving.taskbank import TaskBank

KINDS = ("bin", "ter", "bn", "cls")


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """Random-mask digits tasks of each kind a bank serves (binary, ternary, per-task BN,
    classifier-only) with 3, 4, 5 and 6 classes, and each one's baked answers."""
    return digits_task_files(tmp_path_factory.mktemp("versions"), classifier_classes=6, count=6)


def test_tasks_added_and_removed_while_the_bank_answers(task_files):
    """Four threads ask for `ter` and `bn` (alone and mixed) while a fifth removes `bin` and adds
    it back every few milliseconds, so the other tasks' indices move under them: every answer is
    the asked task's, and no call fails. (Before versions were swapped whole, a call could pair
    one task list's index with another's module: about 1% wrong answers, and errors.)"""
    paths, images, expected = task_files
    bank = TaskBank(pb.digits_backbone(), slots=2)
    bank.add_all([paths["bin"], paths["ter"], paths["bn"]])
    bank.predict(images, task="ter")
    stop, failures, answers = threading.Event(), [], [0]

    def ask(worker):
        rng = np.random.default_rng(worker)
        while not stop.is_set():
            try:
                if worker % 2:
                    order = [("ter", "bn")[i] for i in rng.integers(0, 2, len(images))]
                    out = bank.predict(images, task=order)
                    for row, name in enumerate(order):
                        width = expected[name].shape[1]
                        np.testing.assert_allclose(out[row, :width], expected[name][row], atol=1e-5)
                else:
                    name = ("ter", "bn")[int(rng.integers(0, 2))]
                    np.testing.assert_allclose(bank.predict(images, task=name), expected[name], atol=1e-5)
                answers[0] += 1
            except Exception as e:  # noqa: BLE001 -- every failure is counted and shown
                failures.append(f"{type(e).__name__}: {str(e)[:200]}")

    def change():
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and len(failures) < 20:
            bank.remove("bin")
            time.sleep(0.002)
            bank.add(paths["bin"])
            time.sleep(0.002)
        stop.set()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)] + [threading.Thread(target=change)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, f"{len(failures)} of {answers[0] + len(failures)} calls failed: {failures[:3]}"
    assert answers[0] > 20
    assert bank.names == ["ter", "bn", "bin"]


def test_a_reordered_version_keeps_serving_default_the_first_task(task_files, tmp_path):
    """`[bin (3 classes), ter (4)]`, then the same files as `[ter, bin]`, without per-task
    signatures: version 2's `serving_default` is `ter`'s (before, version 2 kept version 1's
    graph, whose first task's class count was baked in, and every request to it failed)."""
    paths, images, expected = task_files
    backbone = pb.digits_backbone()
    base = str(tmp_path / "model")
    export_saved_model(backbone, [paths["bin"], paths["ter"]], base, per_task_signatures=False)
    latest = export_saved_model(backbone, [paths["ter"], paths["bin"]], base, per_task_signatures=False)
    loaded = tf.saved_model.load(latest)
    np.testing.assert_allclose(loaded.signatures["serving_default"](image=tf.constant(images))["logits"],
                               expected["ter"], atol=1e-5)
    out = loaded.signatures["tasks_by_name"](image=tf.constant(images), task=tf.constant(["bin"] * len(images)))
    np.testing.assert_allclose(out["logits"][:, :3], expected["bin"], atol=1e-5)
    assert [t["name"] for t in list_tasks(latest)["tasks"]] == ["ter", "bin"]


class BankVersions(RuleBasedStateMachine):
    """Every operation a user has, in any order: add and remove tasks while threads call the
    bank, export a new version of its tasks in any order (with and without per-task
    signatures; the last graph kept where it can be), load it and call every signature. The
    invariant: every answer equals the asked task's own baked model."""

    files = None  # (paths, images, expected), set by the test
    root = None

    @initialize()
    def start(self):
        self.paths, self.images, self.expected = self.files
        self.bank = TaskBank(pb.digits_backbone(), slots=1)
        self.names = []
        self.base = os.path.join(self.root, f"model{len(os.listdir(self.root))}")
        self.loaded = None  # (loaded SavedModel, its task names in order, per-task signatures)

    def check(self, name, logits):
        np.testing.assert_allclose(np.asarray(logits)[..., :self.expected[name].shape[1]], self.expected[name],
                                   atol=1e-5, err_msg=f"task {name}")

    def while_called(self, changed, change):
        """Runs `change` (of task `changed`) while two threads call the tasks it leaves in place."""
        stable = [n for n in self.names if n != changed]
        stop, failures = threading.Event(), []

        def call():
            while not stop.is_set() and stable:
                try:
                    name = stable[threading.get_ident() % len(stable)]
                    self.check(name, self.bank.predict(self.images, task=name))
                except Exception as e:  # noqa: BLE001
                    failures.append(e)

        threads = [threading.Thread(target=call) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            change()
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert not failures, failures[:2]

    @rule(name=st.sampled_from(KINDS))
    def add(self, name):
        if name not in self.names:
            self.while_called(name, lambda: self.bank.add(self.paths[name]))
            self.names.append(name)

    @precondition(lambda self: self.names)
    @rule(data=st.data())
    def remove(self, data):
        name = data.draw(st.sampled_from(self.names))
        self.while_called(name, lambda: self.bank.remove(name))
        self.names.remove(name)

    @precondition(lambda self: self.names)
    @rule(data=st.data())
    def call_mixed(self, data):
        order = data.draw(st.lists(st.sampled_from(self.names), min_size=len(self.images), max_size=len(self.images)))
        out = self.bank.predict(self.images, task=order)
        for row, name in enumerate(order):
            np.testing.assert_allclose(out[row, :self.expected[name].shape[1]], self.expected[name][row], atol=1e-5)

    @precondition(lambda self: len(self.names) >= 2)
    @rule(data=st.data(), per_task=st.booleans())
    def export_version(self, data, per_task):
        order = data.draw(st.permutations(self.names))
        path = export_saved_model(pb.digits_backbone(), [self.paths[n] for n in order], self.base,
                                  per_task_signatures=per_task)
        self.loaded = tf.saved_model.load(path), list(order), per_task

    @precondition(lambda self: self.loaded is not None)
    @rule()
    def call_loaded(self):
        loaded, order, per_task = self.loaded
        images = tf.constant(self.images)
        self.check(order[0], loaded.signatures["serving_default"](image=images)["logits"])
        for name in order if per_task else ():
            self.check(name, loaded.signatures[name](image=images)["logits"])
        by_name = [order[i % len(order)] for i in range(len(self.images))]
        out = loaded.signatures["tasks_by_name"](image=images, task=tf.constant(by_name))["logits"].numpy()
        for row, name in enumerate(by_name):
            np.testing.assert_allclose(out[row, :self.expected[name].shape[1]], self.expected[name][row], atol=1e-5)

    @invariant()
    def lists_its_tasks(self):
        assert self.bank.names == self.names


def _run_machine(task_files, tmp_path, examples, steps):
    BankVersions.files, BankVersions.root = task_files, str(tmp_path)
    machine = BankVersions.TestCase
    machine.settings = settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                                suppress_health_check=list(HealthCheck), database=None)
    machine().runTest()


def test_any_sequence_of_changes_versions_and_calls(task_files, tmp_path):
    """A short profile of `BankVersions` (the longer one is marked slow)."""
    _run_machine(task_files, tmp_path, examples=3, steps=8)


@pytest.mark.slow
def test_any_sequence_of_changes_versions_and_calls_long(task_files, tmp_path):
    _run_machine(task_files, tmp_path, examples=30, steps=20)


def test_the_same_task_twice_exports_every_version(task_files, tmp_path):
    """Issue 39, 1: one task file under two names, or two byte-identical copies, share one blob
    name; version 1 exported, and every later one failed (`shutil.SameFileError`: the second link
    of the blob fell back to copying the file onto itself)."""
    import shutil

    paths, images, expected = task_files
    copy = str(tmp_path / "copy.npz")
    shutil.copyfile(paths["bin"], copy)
    # Eight names for one file: `add_all` reads tasks in threads, so two of them link one blob at once.
    tasks = [f"{name}={paths['bin']}" for name in "abdefghi"] + [f"c={copy}", f"t={paths['ter']}"]
    base = str(tmp_path / "model")
    for version in (1, 2, 3):
        latest = export_saved_model(pb.digits_backbone(), tasks, base)
        assert latest.endswith(os.sep + str(version))
    loaded = tf.saved_model.load(latest)
    for name, task in (("a", "bin"), ("i", "bin"), ("c", "bin"), ("t", "ter")):
        np.testing.assert_allclose(loaded.signatures[name](image=tf.constant(images))["logits"], expected[task],
                                   atol=1e-5)


def test_a_version_is_on_disk_before_its_number_appears(task_files, tmp_path, monkeypatch):
    """Issue 39, 3: nothing was fsynced before the rename, so after a power loss a numbered
    version could hold empty files. Every file and folder of the version is synced before its
    folder is renamed to its number, and the base path's entry after."""
    paths, _, _ = task_files
    base = str(tmp_path / "model")
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recording_replace(source, target):
        events.append(("rename", str(source), str(target)))
        return replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    latest = export_saved_model(pb.digits_backbone(), [paths["bin"], paths["ter"]], base)
    [rename] = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == latest]
    tmp = events[rename][1]
    synced = {e[1] for e in events[:rename] if e[0] == "sync"}
    written = {os.path.join(folder, name).replace(latest, tmp, 1) for folder, dirs, names in os.walk(latest)
               for name in names + dirs} | {tmp}
    assert len(written) > 10 and written <= synced, sorted(written - synced)[:5]
    assert ("sync", base) in events[rename:]


@pytest.mark.parametrize("operator", ["delete", "overwrite"])
def test_a_loaded_versions_warm_tasks_outlive_its_folder(task_files, tmp_path, operator):
    """Issue 39, 2: a served version read each task's `.own` file on every call, so when a
    retention job deleted its folder, or `--overwrite` replaced it, every request failed, warm
    tasks included. A task's own weights now live in its slot: the warm tasks (a masked one and a
    classifier-only one, 2 slots) still answer, and only a cold task fails, naming its file."""
    import shutil

    paths, images, expected = task_files
    base = str(tmp_path / "model")
    backbone = pb.digits_backbone()
    version = export_saved_model(backbone, [paths["bin"], paths["cls"], paths["ter"]], base, slots=2)
    loaded = tf.saved_model.load(version)
    x = tf.constant(images)
    for name in ("bin", "cls"):
        np.testing.assert_allclose(loaded.signatures[name](image=x)["logits"], expected[name], atol=1e-5)
    if operator == "delete":
        shutil.rmtree(version)
    else:
        export_saved_model(backbone, [paths["ter"], paths["bn"]], base, version=1, overwrite=True)
    for name in ("bin", "cls", "bin"):
        np.testing.assert_allclose(loaded.signatures[name](image=x)["logits"], expected[name], atol=1e-5)
    with pytest.raises(tf.errors.NotFoundError, match=r"tf_piggyback_tasks/[0-9a-f]+\.(own|masks); No such file"):
        loaded.signatures["ter"](image=x)


class OperatorActions(RuleBasedStateMachine):
    """Issue 39: what operators do to files while loaded versions answer. Rules: export a version
    of any task list (duplicate names of one file, byte-identical copies, hard links), delete a
    version's folder, overwrite a version in place, copy or link a task file, call a loaded
    version's tasks. The invariants: an answer is always the task's own; a call fails only with
    `NotFoundError` and only where its version's folder was deleted or overwritten; the task a
    loaded version answered last always answers again (it is warm: it reads no file)."""

    files = None  # (paths, images, expected), set by the test
    root = None

    @initialize()
    def start(self):
        self.paths, self.images, self.expected = self.files
        self.root_now = os.path.join(self.root, f"run{len(os.listdir(self.root))}")
        os.makedirs(self.root_now)
        self.base = os.path.join(self.root_now, "model")
        self.sources = {kind: [self.paths[kind]] for kind in KINDS}  # each kind's task files: copies, links
        self.loaded = []  # [version number, loaded SavedModel, {name: kind}, folder intact, last answered]

    @rule(kind=st.sampled_from(KINDS), link=st.booleans())
    def copy_task_file(self, kind, link):
        import shutil

        target = os.path.join(self.root_now, f"{kind}{len(self.sources[kind])}.npz")
        (os.link if link else shutil.copyfile)(self.sources[kind][0], target)
        self.sources[kind].append(target)

    @rule(data=st.data())
    def export_version(self, data):
        kinds = data.draw(st.lists(st.sampled_from(KINDS), min_size=2, max_size=5))
        named = {f"t{i}": kind for i, kind in enumerate(kinds)}
        specs = [f"{name}={data.draw(st.sampled_from(self.sources[kind]))}" for name, kind in named.items()]
        path = export_saved_model(pb.digits_backbone(), specs, self.base, slots=2)
        self.loaded = self.loaded[-1:] + [[int(os.path.basename(path)), tf.saved_model.load(path), named, True, None]]

    @precondition(lambda self: self.loaded)
    @rule(data=st.data(), overwrite=st.booleans())
    def delete_or_overwrite(self, data, overwrite):
        import shutil

        entry = data.draw(st.sampled_from(self.loaded))
        folder = os.path.join(self.base, str(entry[0]))
        if overwrite:
            export_saved_model(pb.digits_backbone(), [self.paths["ter"], self.paths["cls"]], self.base,
                               version=entry[0], overwrite=True, slots=2)
        elif os.path.isdir(folder):
            shutil.rmtree(folder)
        for other in self.loaded:  # a loaded version of that number, however many times it was replaced
            if other[0] == entry[0]:
                other[3] = False

    @precondition(lambda self: self.loaded)
    @rule(data=st.data())
    def call(self, data):
        entry = data.draw(st.sampled_from(self.loaded))
        _, loaded, named, intact, last = entry
        name = data.draw(st.sampled_from(sorted(named)))
        try:
            logits = loaded.signatures[name](image=tf.constant(self.images))["logits"]
        except tf.errors.NotFoundError:
            assert not intact and name != last, (name, last, intact)
            return
        np.testing.assert_allclose(logits, self.expected[named[name]], atol=1e-5, err_msg=name)
        entry[4] = name
        again = loaded.signatures[name](image=tf.constant(self.images))["logits"]  # warm: reads no file
        np.testing.assert_allclose(again, self.expected[named[name]], atol=1e-5, err_msg=name)

    @invariant()
    def every_numbered_version_is_whole(self):
        for version in os.listdir(self.base) if os.path.isdir(self.base) else []:
            if version.isdigit():
                assert os.path.isfile(os.path.join(self.base, version, "saved_model.pb"))


def test_what_operators_do_to_files_never_breaks_a_loaded_version(task_files, tmp_path):
    OperatorActions.files, OperatorActions.root = task_files, str(tmp_path)
    machine = OperatorActions.TestCase
    machine.settings = settings(max_examples=8, stateful_step_count=15, deadline=None,
                                suppress_health_check=list(HealthCheck), database=None)
    machine().runTest()
