"""Many tasks behind one server (BUILD.md, "Layout"): the signatures every export shares, the task
bank (`taskbank`: versions of tasks over one traced backbone; `graph`, its working slots and
packing; `store`, its tasks on disk; `reader`, task files into a bank) and the SavedModel export in
TensorFlow Serving's layout (`saved_model`). Builds on `core` and `data`.
"""
