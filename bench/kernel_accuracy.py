"""Accuracy of each attention path inside the encoder, against eager attention in float64.

The setting of tests/test_kernels.py::test_model_matches_eager: a 2-layer encoder (hidden 64,
2 heads), B = 2, T = 33, one sequence of 20 real tokens with a hole at positions 5-7, the loss
sum(output * w) on real positions. Each path (eager, sdpa, triton, triton-varlen) runs in fp32;
for the output and every parameter's gradient it prints max |x - x64| and the worst of
max |x - x64| / max |x64| over all of them (the test's rule: at most 2e-6).

    python bench/kernel_accuracy.py [--no-hole]   # on a CUDA GPU; on a CPU the kernels run in
                                                  # Triton's interpreter (TRITON_INTERPRET=1)
"""

import argparse
import os
import platform

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from minibert.config import BertConfig  # noqa: E402
from minibert.model import BertEncoder  # noqa: E402

ENCODER = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
PATHS = ("eager", "sdpa", "triton", "triton-varlen")


def case(device, hole=True):
    """(weights, ids (B, T), mask (B, T) long, w (B, T, C)): the same for every path."""
    torch.manual_seed(0)
    state = BertEncoder(BertConfig(**ENCODER, attention="eager")).state_dict()
    ids = torch.randint(1, 100, (2, 33), device=device)
    am = (torch.arange(33)[None, :] < torch.tensor([33, 20])[:, None]).long()
    if hole:
        am[1, 5:8] = 0  # so that the padded path must read its mask
    am = am.to(device)
    w = torch.randn(2, 33, 64, device=device) * am[..., None]  # a loss on real positions only
    return state, ids, am, w


def encoder_out_and_grads(attention, state, ids, am, w, dtype):
    """The encoder's output and every parameter's gradient of sum(output * w), in float64 for
    comparison: ((B, T, C), {name: grad})."""
    model = BertEncoder(BertConfig(**ENCODER, attention=attention)).to(ids.device)
    model.load_state_dict(state)
    model.to(dtype)
    y = model(ids, am)  # (B, T, C)
    (y * w.to(dtype)).sum().backward()
    return (y.double(),
            {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None})


def errors(y, g, y64, g64, am):
    """{tensor: (max |x - x64|, max |x64|)} over the output at real positions and each gradient."""
    real = am[..., None]  # (B, T, 1)
    pairs = [("output", y * real, y64 * real), *((n, g[n], g64[n]) for n in g64)]
    return {n: ((x - x64).abs().max().item(), x64.abs().max().item()) for n, x, x64 in pairs}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hole", action=argparse.BooleanOptionalAction, default=True,
                   help="a hole in the second sequence's mask (the test's setting)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print("machine: " + (f"GPU {torch.cuda.get_device_name()}" if device == "cuda" else
                         f"CPU {platform.processor() or platform.machine()}, Triton interpreter"))
    state, ids, am, w = case(device, args.hole)
    y64, g64 = encoder_out_and_grads("eager", state, ids, am, w, torch.float64)
    err = {a: errors(*encoder_out_and_grads(a, state, ids, am, w, torch.float32), y64, g64, am)
           for a in PATHS}
    print(f"{'max |x - x64|':48s} {'max |x64|':>9s} " + " ".join(f"{a:>13s}" for a in PATHS))
    for n, (_, scale) in err["eager"].items():
        print(f"{n:48s} {scale:9.2e} " + " ".join(f"{err[a][n][0]:13.2e}" for a in PATHS))
    worst = {a: max(e / s for e, s in err[a].values()) for a in PATHS}
    print(f"{'worst max |x - x64| / max |x64| (limit 2e-6)':58s} "
          + " ".join(f"{worst[a]:13.2e}" for a in PATHS))


if __name__ == "__main__":
    main()
