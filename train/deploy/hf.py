"""`minibert export --to hf`: a fine-tuned run as the transformers class that matches its task.

    classification, --pooling cls  -> BertForSequenceClassification (problem_type
                                      single_label_classification, id2label/label2id from the run)
    regression, --pooling cls      -> BertForSequenceClassification, num_labels 1, problem_type
                                      regression; a standardised run's mean and std are folded
                                      into the classifier so that it answers in the data's units:
                                      y = z std + mean = x (W std)^T + (b std + mean)
    tokens without a CRF           -> BertForTokenClassification (id2label from the tag set)
    qa                             -> BertForQuestionAnswering (qa_outputs: start, end)

The directory holds config.json (minibert's BertConfig in Hugging Face's spelling, plus
architectures, id2label, label2id and, for sequence classification, problem_type),
model.safetensors under Hugging Face's names (minibert.checkpoint.hf_state_dict for the encoder
and pooler, then the head's own names), and the tokenizer. The two token-level classes are built
without a pooler in transformers, so the pooler is left out for them.

Refused, with one line that names the head and points to `--to onnx`, which exports them all:
- mean pooling (the default): BertForSequenceClassification always reads the pooler on [CLS];
- a CRF tagger: BertForTokenClassification has no transition scores or Viterbi decoding;
- multitask: transformers has no class with several heads on one backbone;
- a pruned model (train/prune/): transformers builds every layer with the same heads and FFN
  width (transformers 4 read `pruned_heads` from config.json; transformers 5 dropped it).

Reference: transformers' modeling_bert.py (BertForSequenceClassification: dropout(pooler_output)
-> classifier; BertForTokenClassification: dropout(sequence_output) -> classifier;
BertForQuestionAnswering: qa_outputs -> split into start, end). tests/test_deploy.py loads each
export with transformers and compares logits with minibert's within 1e-5 (fp32).

Limits: QA's padding scores differ: minibert's head sets them to -1e4, transformers leaves them
as computed (neither is ever a valid answer).
"""

import os

from minibert.checkpoint import hf_state_dict
from minibert.errors import UserError
from minibert.io import atomic_save_safetensors, atomic_write_json


class NotExportable(UserError, ValueError):
    """The run's head has no form in the target format; the message is one line."""


def hf_class(meta):
    """The transformers class name for this task's head, or NotExportable saying why not."""
    kind = meta["task"]
    if kind == "multitask":
        names = [h["name"] for h in meta["heads"]]
        raise NotExportable(f"a multitask run ({len(names)} heads: {', '.join(names)}) has no "
                            "transformers class (none holds several heads on one backbone); "
                            "use --to onnx")
    if kind in ("classification", "regression"):
        if meta["pooling"] != "cls":
            raise NotExportable(f"the {kind} head pools with --pooling {meta['pooling']}; "
                                "BertForSequenceClassification reads the pooler on [CLS] only, "
                                "so transformers has no class for it; use --to onnx (or "
                                "fine-tune with --pooling cls)")
        return "BertForSequenceClassification"
    if kind == "tokens":
        if meta["crf"]:
            raise NotExportable("the tokens head has a CRF; BertForTokenClassification has no "
                                "transition scores or Viterbi decoding; use --to onnx (emission "
                                "scores in the graph, Viterbi outside it)")
        return "BertForTokenClassification"
    if kind == "qa":
        return "BertForQuestionAnswering"
    raise NotExportable(f"task {kind!r} has no transformers class; use --to onnx")


def head_config(meta):
    """config.json fields that say which head this is and what its outputs mean."""
    kind = meta["task"]
    if kind in ("classification", "tokens"):  # one output per label (or tag), named after it
        labels = [str(lab) for lab in meta["labels"]]
        out = {"id2label": {str(i): lab for i, lab in enumerate(labels)},
               "label2id": {lab: i for i, lab in enumerate(labels)}}
        if kind == "classification":
            out["problem_type"] = "single_label_classification"
        return out
    if kind == "regression":  # one output, named after the target
        return {"id2label": {"0": meta["target_field"]}, "label2id": {meta["target_field"]: 0},
                "problem_type": "regression"}
    return {}  # qa: transformers' default of two outputs, start and end


def head_state(meta, head):
    """The head's weights under transformers' names; regression in the data's units."""
    w, b = head.out.weight.detach(), head.out.bias.detach()  # (N, C), (N,)
    if meta["task"] == "regression":
        std, mean = meta["target_std"], meta["target_mean"]
        w, b = w * std, b * std + mean  # z std + mean, folded into the linear layer
    name = "qa_outputs" if meta["task"] == "qa" else "classifier"
    return {f"{name}.weight": w, f"{name}.bias": b}


def export_hf(model, tok, meta, out_dir):
    """Write out_dir for transformers' from_pretrained; returns the class name written."""
    cls = hf_class(meta)  # refuses before anything is written
    c = model.bert.config
    if c.pruned_heads or c.intermediate_sizes is not None:
        raise NotExportable("the model was pruned (" + ", ".join(
            w for w, on in (("heads", c.pruned_heads), ("FFN neurons", c.intermediate_sizes))
            if on) + "): transformers' BERT classes have the same heads and FFN width in every "
            "layer (transformers 5 dropped pruned_heads); use --to onnx")
    state = hf_state_dict(model.bert)  # "bert.*", pooler included
    if cls != "BertForSequenceClassification":  # built with add_pooling_layer=False
        state = {k: v for k, v in state.items() if not k.startswith("bert.pooler.")}
    state.update(head_state(meta, model.head))
    config = model.bert.config.to_hf_dict()
    config.update(architectures=[cls], **head_config(meta))
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(os.path.join(out_dir, "config.json"), config)
    atomic_save_safetensors(os.path.join(out_dir, "model.safetensors"), state,
                            metadata={"format": "pt"})
    tok.save(out_dir, model_max_length=meta["max_length"])  # what the run read, and predict reads
    return cls
