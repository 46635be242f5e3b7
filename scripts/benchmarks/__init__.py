"""The benchmarks behind `scripts/bench.py`, kept out of the installed package (as Keras keeps
its own in a top-level `benchmarks/`): `suite` (presets cpu, gpu, train, methods), `serving`
(many tasks in one SavedModel or `.tflite`) and `pipeline` (the training input alone). They use
the library's public names only. `scripts/bench.py` puts `scripts/` on the path; so does a
child process they start (`CHILD_PATH`).
"""

import os

CHILD_PATH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # scripts/, for child processes
