"""The method and its file (BUILD.md, "Layout"): what a task is and how it is kept.

Masks and their binarizers (§3, Eq. 1-2), the masked layer wrappers, surgery over any Keras
model (wrap, freeze, bake), the methods as peers behind one interface (`methods`: piggyback and
the baselines of §4, which the task file names), the backbone fingerprint, mask coding and the
task file. Imports nothing else of the package: every other wing builds on this one.
"""
