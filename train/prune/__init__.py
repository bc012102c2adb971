"""Pruning: a fine-tuned model made smaller by removing whole heads and FFN neurons.

    importance.py  gates on heads and neurons, and Michel et al. 2019's gradient importance
    surgery.py     the least important units removed physically: smaller q/k/v, proj and FFN
    prune.py       the `minibert prune` command
"""
