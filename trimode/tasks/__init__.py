"""Tasks with checkable answers: training data (train split) and evaluation (held-out split).

    from trimode.tasks import load_tasks, TASKS
    items = load_tasks("arithmetic", n=100, seed=0, split="heldout")
    items[0].prompt, items[0].answer, items[0].check("12")
    prompt_text(items[0], tokenizer)        # what the model is given: a chat item as a user turn
"""

from trimode.tasks import arithmetic, code, sequences, structured  # noqa: F401  (each module registers its tasks)
from trimode.tasks.base import SPLITS, TASKS, Task, TaskSpec, load_tasks, plain_tasks, prompt_text, split_of
from trimode.tasks.edits import EDIT_TASKS, cut_hole, infill_items, revision_items, wrong_draft
from trimode.tasks.structured import STRUCTURED_TASKS

__all__ = ["EDIT_TASKS", "SPLITS", "TASKS", "Task", "TaskSpec", "cut_hole", "infill_items", "load_tasks", "plain_tasks",
           "prompt_text", "revision_items", "split_of", "wrong_draft", "STRUCTURED_TASKS"]
