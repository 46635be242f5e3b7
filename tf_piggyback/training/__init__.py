"""Learning a task (BUILD.md, "Layout"): the backbones a task starts from, the training loop
(`trainer`: one step for the CLI, `pb.train` and Keras' `fit`), its callbacks and evaluation, the
distribution strategies, the experiment the training CLI runs and the report over its task files.
Builds on `core` and `data`.
"""
