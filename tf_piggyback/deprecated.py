"""The import paths of the flat layout before the wings (BUILD.md, "Layout"), kept for one release.

`import tf_piggyback.phone` (or `from tf_piggyback.export import export_tflite`) still works: it
warns with a `DeprecationWarning` naming the new path and gives a module whose names are the new
module's (the objects themselves, not copies: `tf_piggyback.phone.PhoneTasks is
tf_piggyback.devices.phone.PhoneTasks`). A finder on `sys.meta_path` answers for the old names
only, so nothing is imported until a user asks for an old path.

To be removed in the release after 0.1 (then an old path is a `ModuleNotFoundError`).
"""

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# Old module (relative to tf_piggyback) -> the new modules it gives, the first being its home.
MOVED = {
    "files": ("core.files",), "coding": ("core.coding",), "binarizers": ("core.binarizers",),
    "fingerprint": ("core.fingerprint",), "layers": ("core.layers",), "surgery": ("core.surgery",),
    "taskfile": ("core.taskfile",), "methods": ("core.methods",),
    **{f"methods.{name}": (f"core.methods.{name}",)
       for name in ("base", "piggyback", "classifier", "finetune", "lora", "packnet")},
    "images": ("data.images",), "sources": ("data.sources",), "datasets": ("data.datasets",), "text": ("data.text",),
    "backbones": ("training.backbones",), "evaluation": ("training.evaluation",), "trainer": ("training.trainer",),
    "callbacks": ("training.callbacks",), "distribute": ("training.distribute",),
    "experiment": ("training.experiment",), "report": ("training.report",),
    "signatures": ("serving.signatures",), "bankgraph": ("serving.graph", "serving.packing", "serving.slots"),
    "bankstore": ("serving.store",), "bankmodule": ("serving.versions",),
    "taskbank": ("serving.taskbank", "serving.reader"),
    # `export` gave the TFLite functions too (BUILD.md: imports now run one way, serving -> devices).
    "export": ("serving.saved_model", "devices.tflite"),
    "tflite": ("devices.tflite",), "phone": ("devices.phone",), "phonebytes": ("devices.phonebytes",),
    "phoneint8": ("devices.phoneint8",), "ondevice": ("devices.ondevice",),
}
PACKAGE = __name__.rpartition(".")[0]


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # a plain module, filled by exec_module

    def exec_module(self, module):
        old = module.__name__.removeprefix(PACKAGE + ".")
        new = [f"{PACKAGE}.{name}" for name in MOVED[old]]
        warnings.warn(f"{module.__name__} moved to {new[0]}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=_importer_level())
        public = []
        for name in reversed(new):  # the home module's names win
            target = importlib.import_module(name)
            module.__dict__.update({k: v for k, v in vars(target).items() if not k.startswith("__")})
            public += getattr(target, "__all__", [k for k in vars(target) if not k.startswith("_")])
        module.__all__ = sorted(set(public))  # `from tf_piggyback.export import *` as it was
        home = sys.modules[new[0]]
        module.__getattr__ = lambda name: getattr(home, name)


def _importer_level():
    """The `stacklevel` of the frame that imported the old path (past importlib's own frames), so
    the warning names the user's line and Python's default filters show it in `__main__`."""
    level, frame = 2, sys._getframe(2)  # stacklevel 1 is exec_module, which calls this
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
        if "_bootstrap" not in frame.f_code.co_filename:  # `warnings` skips importlib's bootstrap frames itself
            level += 1
        frame = frame.f_back
    return level


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix(PACKAGE + ".")
        if not fullname.startswith(PACKAGE + ".") or old not in MOVED:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, _Loader())
        if any(name.startswith(old + ".") for name in MOVED):  # a package: `tf_piggyback.methods.lora`
            spec.submodule_search_locations = []
        return spec


def attribute(name):
    """The old module `name` as an attribute of the package (`pb.trainer.epoch_batches`), with
    the old path's warning; AttributeError for any other name (`tf_piggyback.__getattr__`)."""
    if name not in MOVED:
        raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")
    return importlib.import_module(f"{PACKAGE}.{name}")


class _Package(types.ModuleType):
    """The package's module type once `install` ran. Importing an old path sets it as an attribute
    of the package, as any import of a submodule does; where the package already has a public
    name of that name that is not a module (`pb.fingerprint`, the function, against the old module
    `tf_piggyback.fingerprint`), the name is kept."""

    def __setattr__(self, name, value):
        kept = self.__dict__.get(name)
        if name in MOVED and kept is not None and not isinstance(kept, types.ModuleType) \
                and isinstance(value, types.ModuleType) and value.__name__ == f"{PACKAGE}.{name}":
            return
        super().__setattr__(name, value)


def install():
    """Puts the old paths' finder on `sys.meta_path` (once; `tf_piggyback/__init__.py` calls it)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
    sys.modules[PACKAGE].__class__ = _Package
