"""Training: the optimizer, schedules, data, the fine-tuning and pretraining loops.

Nothing here knows BERT's internals; it sees a model that maps batches to a loss.
"""
