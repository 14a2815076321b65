"""Train a tuned lens with the `tuned-lens` Python package on the token stream and budget of
`logit-lens tune`, for the side-by-side comparison of docs/tuned-lens.md (a benchmark, not a
test).

The package's command line does not start with current torchdata (and loads data through the
hub's `datasets`), so this is its training loop written out on its library, following its
`scripts/train_loop.py` and `scripts/ingredients.py` (0.2.0):

- the lens: `tuned_lens.nn.lenses.TunedLens.from_model(model)`, translators at the identity;
- the loss, per layer L < N: the mean over tokens of KL(model output || lens(h_L, L)), layer
  by layer (one backward per layer), `h` being HF's `hidden_states[:-1]`;
- each step: gradient norm clipped to 1, the optimiser's step, its scheduler's step;
- the optimisers (`--optimizer`): `sgd`, the package's default (SGD with Nesterov momentum 0.9,
  lr 1.0 * (1 - 0.9), weight decay 1e-3, no warm-up, linear decay) and `adam` (Adam with
  amsgrad, betas (0.9, 0.999), lr 1e-3, weight decay 1e-3, warm-up over a fifth of the steps,
  the package's `get_linear_schedule_with_warmup(opt, warmup, steps - warmup)`).

The tokens are the ones `logit-lens tune` trains on: each file tokenized by `logit-lens
tokenize` (the same ids, whatever HF's tokenizer would do), cut into sequences of `--seq`
tokens (shorter than 2 dropped), taken in order and cycling until a step has `--tokens`
tokens; a step's loss is the mean over all its tokens, as ours is. The model is HF
transformers' float32 model of the same GGUF file.

Run from the repository root with a Python that has torch, transformers and gguf, plus
`pip install --no-deps tuned-lens==0.2.0` (checked: torch 2.15.0, transformers 5.24.0):

    python crates/lens-tuned/bench/train_package_lens.py --gguf MODEL.gguf \
        --logit-lens target/release/logit-lens --out DIR --optimizer sgd \
        --steps 60 --tokens 256 --seq 128 usr_0*.txt usr_1*.txt usr_2*.txt

DIR gets the package's own `lens.save` files (params.pt, config.json), which `logit-lens
eval-lens --lens tuned:DIR` reads.
"""

import argparse
import os
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup
from tuned_lens.nn.lenses import TunedLens


def token_ids(logit_lens, gguf, path):
    """The ids `logit-lens tokenize` gives for the file (its second column)."""
    out = subprocess.run(
        [logit_lens, "tokenize", "--model", gguf, "--file", path],
        check=True, capture_output=True, text=True,
    ).stdout
    return [int(line.split()[1]) for line in out.splitlines() if line.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--logit-lens", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("texts", nargs="+")
    a = ap.parse_args()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(a.gguf)), gguf_file=os.path.basename(a.gguf),
        dtype=torch.float32,
    ).eval()
    model.requires_grad_(False)
    lens = TunedLens.from_model(model)
    seqs = []
    for path in a.texts:
        ids = token_ids(a.logit_lens, a.gguf, path)
        seqs += [ids[i:i + a.seq] for i in range(0, len(ids), a.seq) if len(ids[i:i + a.seq]) >= 2]
    total = sum(map(len, seqs))
    print(f"{len(seqs)} sequences, {total} tokens; {a.steps} steps of {a.tokens} tokens, {a.optimizer}",
          file=sys.stderr)

    params = [p for p in lens.parameters() if p.requires_grad]
    if a.optimizer == "sgd":
        beta = 0.9
        opt = torch.optim.SGD(params, lr=1.0 * (1 - beta), momentum=beta, nesterov=True, weight_decay=1e-3)
        warmup = 0
    else:
        opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), amsgrad=True, weight_decay=1e-3)
        warmup = min(1000, a.steps // 5)
    scheduler = get_linear_schedule_with_warmup(opt, warmup, a.steps - warmup)

    started = time.time()
    cursor = 0
    for step in range(a.steps):
        batch, n = [], 0
        while n < a.tokens:
            ids = seqs[cursor]
            cursor = (cursor + 1) % len(seqs)
            take = ids[: min(len(ids), a.tokens - n)]
            batch.append(take)
            n += len(take)
        losses = torch.zeros(len(lens))
        for ids in batch:
            with torch.no_grad():
                out = model(torch.tensor([ids]), output_hidden_states=True)
            labels = out.logits.log_softmax(-1)
            weight = len(ids) / n  # the step's loss is the mean over all its tokens
            for i, h in enumerate(out.hidden_states[:-1]):
                logits = lens(h, idx=i)
                loss = torch.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
                (loss * weight).backward()
                losses[i] += loss.detach() * weight
        torch.nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        scheduler.step()
        print(f"step {step + 1}/{a.steps} {time.time() - started:.0f}s mean KL {losses.mean():.3f} "
              f"per layer [{' '.join(f'{x:.2f}' for x in losses.tolist())}]", file=sys.stderr)
    lens.save(a.out)
    print(f"done: {a.steps} steps, {a.steps * a.tokens} tokens, {time.time() - started:.0f}s, saved {a.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
