"""Which way is better, for every metric: the one definition that the trainer, the fine-tuning
config, `minibert sweep`, `minibert diagnose` and `minibert plot` all call.

A metric is lower-is-better when its name, or the part after the last "/" (a multi-task head's
"intensity/mse"), is one of LOWER_IS_BETTER; every other metric (accuracy, F1, Pearson, ...) is
higher-is-better. A missing value (None, or NaN read from an old run) never counts as better.
"""

import math

LOWER_IS_BETTER = frozenset({"loss", "mse", "rmse", "mae", "perplexity", "mlm_loss"})


def metric_mode(metric):
    """'min' or 'max': the direction in which `metric` improves."""
    return "min" if metric.split("/")[-1] in LOWER_IS_BETTER else "max"


def is_missing(value):
    return value is None or (isinstance(value, float) and math.isnan(value))


def better(a, b, mode):
    """True when value `a` is strictly better than `b`; anything beats a missing `b`."""
    if is_missing(a):
        return False
    if is_missing(b):
        return True
    return a > b if mode == "max" else a < b


def rank_key(value, mode):
    """A sort key that puts the best value first and missing values last."""
    if is_missing(value):
        return (1, 0.0)
    return (0, -value if mode == "max" else value)
