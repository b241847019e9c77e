"""Tasks with checkable answers: training data (train split) and evaluation (held-out split).

    from trimode.tasks import load_tasks, TASKS
    items = load_tasks("arithmetic", n=100, seed=0, split="heldout")
    items[0].prompt, items[0].answer, items[0].check("12")
"""

from trimode.tasks import arithmetic, code, sequences  # noqa: F401  (each module registers its tasks)
from trimode.tasks.base import SPLITS, TASKS, Task, TaskSpec, load_tasks, split_of

__all__ = ["SPLITS", "TASKS", "Task", "TaskSpec", "load_tasks", "split_of"]
