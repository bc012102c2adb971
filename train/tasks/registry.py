"""--task NAME -> the class that knows its head, data and metrics (train/tasks/task.py).

These are the tasks with one head. Multi-task training (train/tasks/multitask.py) combines them,
so it imports this table; the fine-tuning command adds `multitask` itself to it.
"""

from train.tasks.classification import ClassificationTask
from train.tasks.qa import QATask
from train.tasks.regression import RegressionTask
from train.tasks.tagging import TokenTask

SINGLE_TASKS = {t.name: t for t in [ClassificationTask, RegressionTask, TokenTask, QATask]}
