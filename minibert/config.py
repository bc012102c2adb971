"""The BERT model config: one dataclass, read from and written to Hugging Face's `config.json`.

Field names follow Hugging Face's `BertConfig` so that a `config.json` round-trips unchanged and
`transformers` can load what we save. Only the fields that change the computation are kept;
everything else in a foreign `config.json` is ignored, never guessed at.
"""

import json
import os
from dataclasses import asdict, dataclass, field, fields

from minibert.errors import ConfigError, missing_from_checkpoint
from minibert.io import load_json_object

# Attention implementations the model can run. Each is written out in minibert/model.py (eager,
# sdpa) or minibert/kernels/ (triton, triton-varlen); the config names one, there is no fallback.
ATTENTION_IMPLS = ("eager", "sdpa", "triton", "triton-varlen")

# `gelu` in BERT's original code and in transformers is the exact erf form; `gelu_new` (GPT-2's)
# is the tanh approximation. Other activations exist in the wild but not in BERT checkpoints.
HIDDEN_ACTS = ("gelu", "gelu_new")


@dataclass
class BertConfig:
    vocab_size: int = 30522  # BERT's uncased WordPiece vocabulary
    hidden_size: int = 768  # C
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # nh; head size hs = C // nh
    intermediate_size: int = 3072  # the MLP is 4x wider than the residual stream
    hidden_act: str = "gelu"  # exact erf GELU, as BERT was trained
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512  # learned absolute positions: the longest input
    type_vocab_size: int = 2  # segment A / segment B
    layer_norm_eps: float = 1e-12  # BERT's value; much smaller than PyTorch's 1e-5 default
    pad_token_id: int | None = 0  # its row starts at zero; None (transformers allows it): none
    # Not a Hugging Face field: which attention code runs. `sdpa` is PyTorch's fused kernel and
    # the fast default; `eager` is the explicit softmax, kept as the readable reference.
    attention: str = "sdpa"
    # Pruning (train/prune/) makes layers differ. `pruned_heads` is transformers 4's field and
    # spelling: {layer: [heads removed, numbered as in the unpruned model]}. `intermediate_sizes`
    # (one FFN width per layer) is minibert's own. Both are empty for every published model.
    pruned_heads: dict = field(default_factory=dict)
    intermediate_sizes: list | None = None

    def __post_init__(self):
        problems = self._check_types()
        if problems:  # the value checks below would fail on a wrong type, naming no key
            raise ConfigError("invalid BertConfig: " + "; ".join(problems))
        if self.hidden_act not in HIDDEN_ACTS:
            problems.append(
                f"hidden_act={self.hidden_act!r} is not supported; use one of {HIDDEN_ACTS} "
                "('gelu' is the exact erf form, 'gelu_new' the tanh approximation)"
            )
        if self.attention not in ATTENTION_IMPLS:
            problems.append(f"attention={self.attention!r}; choose one of {ATTENTION_IMPLS}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)!r} must be a positive integer")
        if not problems and self.hidden_size % self.num_attention_heads != 0:
            problems.append(
                f"hidden_size={self.hidden_size} does not divide by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.layer_norm_eps <= 0:
            problems.append(f"layer_norm_eps={self.layer_norm_eps} must be positive")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            problems.append(f"pad_token_id={self.pad_token_id} is outside the vocabulary")
        if not problems:
            problems += self._check_pruning()
        if problems:
            raise ConfigError("invalid BertConfig: " + "; ".join(problems))

    def _check_types(self):
        """A JSON value of the wrong type ("0.1" for 0.1, null, true for 1), one problem a key."""
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)
        kinds = {"an integer": is_int, "a number": lambda v: is_int(v) or isinstance(v, float),
                 "a string": lambda v: isinstance(v, str),
                 "an integer or null": lambda v: v is None or is_int(v)}
        want = {"hidden_act": "a string", "attention": "a string",
                "hidden_dropout_prob": "a number", "attention_probs_dropout_prob": "a number",
                "layer_norm_eps": "a number", "pad_token_id": "an integer or null",
                **dict.fromkeys(("vocab_size", "hidden_size", "num_hidden_layers",
                                 "num_attention_heads", "intermediate_size",
                                 "max_position_embeddings", "type_vocab_size"), "an integer")}
        return [f"{name}={getattr(self, name)!r} must be {kind}"
                for name, kind in want.items() if not kinds[kind](getattr(self, name))]

    def _check_pruning(self):
        """Normalise `pruned_heads` (JSON gives string keys) and check both pruning fields."""
        problems, heads = [], {}
        if not isinstance(self.pruned_heads, dict):
            return [f"pruned_heads={self.pruned_heads!r} must map layers to lists of heads"]
        for layer, removed in self.pruned_heads.items():
            if not str(layer).isdigit() or int(layer) >= self.num_hidden_layers:
                problems.append(f"pruned_heads: layer {layer!r} is not in "
                                f"0..{self.num_hidden_layers - 1}")
                continue
            ok = isinstance(removed, list) and all(
                isinstance(h, int) and 0 <= h < self.num_attention_heads for h in removed)
            if not ok or len(set(removed)) != len(removed):
                problems.append(f"pruned_heads[{layer}]={removed!r}: give distinct head numbers "
                                f"in 0..{self.num_attention_heads - 1}")
            elif len(removed) == self.num_attention_heads:
                problems.append(f"pruned_heads[{layer}] removes every head; keep at least one")
            elif removed:
                heads[int(layer)] = sorted(removed)
        self.pruned_heads = dict(sorted(heads.items()))
        sizes = self.intermediate_sizes
        if sizes is not None and (not isinstance(sizes, list)
                                  or len(sizes) != self.num_hidden_layers
                                  or not all(isinstance(n, int) and n > 0 for n in sizes)):
            problems.append(f"intermediate_sizes={sizes!r} must list one positive width per "
                            f"layer ({self.num_hidden_layers})")
        return problems

    @property
    def head_size(self):
        return self.hidden_size // self.num_attention_heads

    def heads(self, layer):
        """The heads layer `layer` still has, numbered as in the unpruned model."""
        removed = set(self.pruned_heads.get(layer, ()))
        return [h for h in range(self.num_attention_heads) if h not in removed]

    def ffn_size(self, layer):
        return self.intermediate_size if self.intermediate_sizes is None else \
            self.intermediate_sizes[layer]

    @classmethod
    def from_dict(cls, d, source="config"):
        # Another architecture's config can share BERT's key names (RoBERTa's all of them, with
        # positions counted differently): loaded as BERT it would give wrong outputs, silently.
        kind = d.get("model_type", "bert")
        if kind != "bert":
            raise ConfigError(f"{source}: model_type {kind!r}: not a BERT checkpoint; minibert "
                              "reads BERT's architecture only")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ConfigError(f"{source}: is_decoder / add_cross_attention: a causal BERT decoder; "
                              "minibert's encoder attends both ways and has no cross-attention")
        positions = d.get("position_embedding_type", "absolute")
        if positions != "absolute":
            raise ConfigError(f"{source}: position_embedding_type {positions!r}: minibert has "
                              "BERT's absolute position embeddings only")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        # Older checkpoints spell the activation "gelu" but some tools wrote "gelu_python" for the
        # same exact erf function; accept that one alias because it is the same math.
        if kwargs.get("hidden_act") == "gelu_python":
            kwargs["hidden_act"] = "gelu"
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path):
        d = load_json_object(path, ConfigError)
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers")
        # a run's config.json, say (a pretraining run's has a vocab_size): not BERT-base's defaults
        why = "a run's config, with an `out`" if "out" in d else \
            None if any(k in d for k in sizes) else f"none of {', '.join(sizes)}"
        if why:
            raise missing_from_checkpoint(os.path.dirname(path) or ".", f"{os.path.basename(path)}"
                                          f" is not a model's config ({why})")
        return cls.from_dict(d, source=str(path))

    def to_hf_dict(self, architecture="BertForMaskedLM"):
        d = {k: v for k, v in asdict(self).items() if k != "attention"}
        # an unpruned model's config.json stays exactly what transformers writes
        for k in ("pruned_heads", "intermediate_sizes"):
            if not d[k]:
                del d[k]
        # What transformers needs to pick the class and fill the fields we do not model;
        # `architecture` says what the weights beside it hold (BertModel: no MLM head).
        d.update(model_type="bert", architectures=[architecture],
                 position_embedding_type="absolute", initializer_range=0.02)
        return d

    def save_json(self, path, architecture="BertForMaskedLM"):
        from minibert.io import atomic_write_text
        atomic_write_text(path, json.dumps(self.to_hf_dict(architecture), indent=2) + "\n")
