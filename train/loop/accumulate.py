"""Gradient accumulation: the micro-batches of one optimizer step, and what each one weighs.

A model's loss is a mean over the items of its batch, and the step's gradient must be the mean
over all the items of the step, however they were split into micro-batches and processes:

    weight_j = items_j / items_of_the_step * world      (x world: DDP averages the ranks' sums)

Items are examples for most tasks, and then every rank knows the step's count from the global
group of indices, with no communication. Masked-LM averages over masked tokens, a number that
varies from batch to batch; such data says what it counts with `count_items(batch)`. Weighting
those batches by examples instead would give a batch with few masked tokens as much say as one
with many. Their total is summed over ranks on the device, and the weights stay device tensors:
the step does not wait for the sum.

A multi-task step may hold batches of tasks that count different items (a tagger's words, a
classifier's examples). Such data also says which task a batch is (`unit_of(indices)`), and the
step is a mean over examples between tasks, over each task's own items within it:

    weight_j = examples_u / examples_of_the_step * items_j / items_u     (u: batch j's task)

which is the rule above when every batch of the step is one task's.
"""

import torch


def micro_batches(data, dist, group):
    """This rank's share of one step: ([(cpu batch, items, n_real), ...], the step's items).

    `group` holds the step's micro-batches as global lists of example indices; n_real is how many
    of this rank's examples are real (0: a stand-in that keeps the ranks in step, weight 0). The
    step's items are an int, or a device tensor when counted items are summed over ranks."""
    count = getattr(data, "count_items", None)
    out = []
    for idx in group:
        part, n_real = dist.shard(idx)
        batch = data.collate(part)
        items = (count(batch) if count is not None else n_real) if n_real else 0
        out.append((batch, items, n_real))
    if count is None:
        return out, sum(len(idx) for idx in group)
    unit_of = getattr(data, "unit_of", None)
    if unit_of is not None:
        return _per_unit(out, [unit_of(idx) for idx in group], [len(idx) for idx in group], dist)
    total = sum(items for _, items, _ in out)
    if dist.world > 1:
        total = dist.all_reduce(torch.tensor(float(total), dtype=torch.float64,
                                             device=dist.device))
        return out, total.clamp(min=1)
    return out, max(total, 1)  # nothing masked in the whole step: every weight is 0


def _per_unit(out, units, sizes, dist):
    """micro_batches' answer when batches count items in different units: each batch's items
    become examples_u * items_j / items_u, over a total of the step's examples (the weight of
    the module docstring). units and sizes come from the global group: every rank has them."""
    examples, items = {}, {}
    for (_, n, _), u, size in zip(out, units, sizes):
        examples[u] = examples.get(u, 0) + size
        items[u] = items.get(u, 0) + n
    keys = sorted(items)
    if dist.world > 1:  # one all-reduce for every task's count, on the device
        summed = dist.all_reduce(torch.tensor([float(items[u]) for u in keys],
                                              dtype=torch.float64, device=dist.device))
        items = dict(zip(keys, summed.clamp(min=1)))
    else:
        items = {u: max(n, 1) for u, n in items.items()}
    return [(b, examples[u] * n / items[u], r) for (b, n, r), u in zip(out, units)], sum(sizes)
