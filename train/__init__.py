"""Training: everything that changes weights, and everything that reads what a run wrote.

Nothing here knows BERT's internals beyond the model's public calls; `minibert` (the model and
its kernels) never imports `train`. The rooms:

- train/loop/      the training loop and what it stands on: Trainer, AdamW, schedules, parameter
                   groups, run directory, resume state, device and precision, data parallelism
- train/tasks/     the fine-tuning tasks: classification, regression, tagging + CRF, extractive
                   QA, multi-task, and their scorers
- train/finetune/  `minibert finetune` and `minibert predict`: the config and the script
- train/pretrain/  `minibert pretrain` and `minibert tokenizer train`: masked-LM objective,
                   masking, token cache and packing
- train/runs/      reading runs: curves, diagnosis, plot, report, memory, sweeps
- train/data/      reading labelled files, and `minibert data get` for the real data sets
- train/deploy/    `minibert export` and `minibert quantize`: transformers classes, ONNX, int8
- train/distill/   `minibert distill`: a smaller student on a teacher's soft targets
- train/prune/     `minibert prune`: the least important heads and FFN neurons removed
- train/cli.py     the `minibert` command; train/command.py what every command shares
"""
