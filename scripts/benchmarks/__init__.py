"""The benchmarks behind `scripts/bench.py`, kept out of the installed package (as Keras keeps
its own in a top-level `benchmarks/`): `suite` (presets cpu, gpu, train, methods), `serving`
(many tasks in one SavedModel or `.tflite`), `many_tasks` (10 to 10,000 tasks read from a
version's files) and `pipeline` (the training input alone). They use the library's public names
only. `scripts/bench.py` puts `scripts/` on the path; so does a child process they start
(`CHILD_PATH`, `run_child`).
"""

import json
import os
import subprocess
import sys

CHILD_PATH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # scripts/, for child processes
_CHILD = """
import importlib, json, sys
sys.path.insert(0, sys.argv[4])
module = importlib.import_module("benchmarks." + sys.argv[1])
print(json.dumps(getattr(module, sys.argv[2])(**json.loads(sys.argv[3]))))
"""


def run_child(module, function, **kwargs):
    """`benchmarks.<module>.<function>(**kwargs)` in a fresh Python process (a measurement that
    starts clean); its JSON result, the last line it prints."""
    out = subprocess.run([sys.executable, "-c", _CHILD, module, function, json.dumps(kwargs), CHILD_PATH],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
