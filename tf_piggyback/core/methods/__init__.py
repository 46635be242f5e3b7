"""The training methods, as peers behind one interface (`Method`): piggyback (§3), the baselines of
§4 (classifier-only, finetune, PackNet) and LoRA.

Adding a method is one module here that defines a `Method` subclass decorated with `@register`
(its `build`, and what differs from a task-file method's defaults), and its import below; the
import order is `--method`'s order of choices.
"""

from tf_piggyback.core.methods import piggyback, classifier, finetune, packnet, lora  # noqa: F401 (registers them)
from tf_piggyback.core.methods.base import TASK_FILE, Method, get, names, register

__all__ = ["TASK_FILE", "Method", "get", "names", "register"]
