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
    total = sum(items for _, items, _ in out)
    if dist.world > 1:
        total = dist.all_reduce(torch.tensor(float(total), dtype=torch.float64,
                                             device=dist.device))
        return out, total.clamp(min=1)
    return out, max(total, 1)  # nothing masked in the whole step: every weight is 0
