#!/usr/bin/env python3
"""Goldens for the conformance suite's reference backend (lens_conformance::ReferenceBackend).

An independent implementation of the same tiny model in plain Python floats (f64), written
from its definition, not from the Rust code:

  vocabulary  12 words; a prompt is split at whitespace, a word outside the list is <unk> (0)
  layer 0     h = EMBED[token]
  block b     mid_t = h_t + MIX[b] * mean(h_0..h_t)        (causal mean, the "attention")
              out_t = mid_t + W[b] @ rmsnorm(mid_t)        (the "MLP")
  norm lens   logits = UNEMBED @ (NORM_W * rmsnorm(h))
  raw lens    logits = UNEMBED @ h
  rmsnorm(x)  x / sqrt(mean(x^2) + 1e-5)

Writes golden_reference.json (norm lens) and golden_reference_raw.json (raw lens) in the
format of tests/data/oracle/ (see PROVENANCE.md there): top-5 ids and probabilities (ties to
the lower id), entropy, KL(model output || layer), next-token rank and probability, floats
rounded to 6 significant digits. Run: python3 make_reference_golden.py (no packages needed).
"""

import json
import math
import os

VOCAB = ["<unk>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "big", "large"]
EMBED = [
    [0.2, -0.1, -0.1, 0.1],
    [0.0, -0.7, -0.5, -0.8],
    [0.5, -0.7, 0.9, 0.4],
    [0.1, 0.9, 0.2, -0.8],
    [0.1, -0.4, -0.1, -0.7],
    [0.8, -0.5, 0.8, 0.2],
    [-0.6, -0.2, 0.3, -0.6],
    [-0.5, 0.7, -0.6, 0.9],
    [0.6, -1.0, -0.7, 0.9],
    [-0.7, 0.4, -0.4, 0.6],
    [0.7, 0.9, 1.0, -0.5],
    [-0.3, 0.1, -1.0, 1.0],
]
MIX = [0.5, -0.25, 0.5]
W = [
    [[0.4, 0.3, 0.3, 0.6], [-0.3, -0.3, -0.4, -0.5], [-0.3, 0.2, 0.5, 0.5], [0.6, 0.2, 0.2, -0.3]],
    [[0.2, 0.4, 0.4, 0.3], [-0.5, 0.3, 0.5, 0.2], [0.2, 0.2, -0.6, 0.4], [-0.6, 0.6, -0.3, -0.5]],
    [[0.3, 0.4, 0.1, -0.6], [-0.1, 0.4, 0.3, 0.3], [-0.2, -0.6, -0.2, -0.5], [0.5, 0.3, -0.2, -0.4]],
]
NORM_W = [1.2, 0.8, 1.5, 1.0]
# "big" and "large" share their row: their logits tie exactly, which tests ties to the lower id.
UNEMBED = [
    [-0.1, 0.8, 0.6, 0.7],
    [0.7, 0.1, -1.5, 1.2],
    [1.5, -1.1, 0.8, 0.2],
    [-1.1, 1.4, -1.5, 0.8],
    [0.3, -0.6, -0.9, 1.2],
    [-0.8, 1.1, -1.5, -1.4],
    [0.3, 0.9, 0.8, 1.5],
    [-1.4, 0.4, 1.3, -1.4],
    [-0.8, -0.8, -1.2, -0.2],
    [-1.2, 1.3, 0.8, -0.6],
    [-1.3, -1.0, 0.5, -0.6],
    [-1.3, -1.0, 0.5, -0.6],
]
EPS = 1e-5
PROMPTS = [
    "the cat sat on the mat",
    "a big dog ran to the large mat",
    "  The cat\tsat on\n a mat ",
    "héllo the dog ran to a cat",
]


def rmsnorm(x):
    r = math.sqrt(sum(v * v for v in x) / len(x) + EPS)
    return [v / r for v in x]


def matvec(m, x):
    return [sum(a * b for a, b in zip(row, x)) for row in m]


def tokenize(text):
    return [VOCAB.index(w) if w in VOCAB else 0 for w in text.split()]


def layers_of(ids):
    """resid[layer][position] for layers 0..=3."""
    h = [list(EMBED[i]) for i in ids]
    out = [h]
    for b in range(3):
        nxt = []
        for t in range(len(h)):
            mean = [sum(h[s][j] for s in range(t + 1)) / (t + 1) for j in range(4)]
            mid = [h[t][j] + MIX[b] * mean[j] for j in range(4)]
            upd = matvec(W[b], rmsnorm(mid))
            nxt.append([mid[j] + upd[j] for j in range(4)])
        h = nxt
        out.append(h)
    return out


def logits(h, norm):
    x = [w * v for w, v in zip(NORM_W, rmsnorm(h))] if norm else h
    return matvec(UNEMBED, x)


def log_softmax(z):
    m = max(z)
    lz = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lz for v in z]


def r6(v):
    return float(f"{v:.6g}")


def golden(norm):
    prompts = []
    min_gap = math.inf
    for text in PROMPTS:
        ids = tokenize(text)
        resid = layers_of(ids)
        final = [log_softmax(logits(h, True)) for h in resid[-1]]
        layers = []
        for l, rows in enumerate(resid):
            entry = {k: [] for k in ["top5_ids", "top5_probs", "entropy", "kl_final_layer", "next_rank", "next_prob"]}
            entry["layer"] = l
            for t, h in enumerate(rows):
                z = logits(h, norm)
                gaps = [abs(z[i] - z[j]) for i in range(12) for j in range(i + 1, 12) if (i, j) != (10, 11)]
                min_gap = min(min_gap, min(gaps))
                lp = log_softmax(z)
                order = sorted(range(len(z)), key=lambda v: (-z[v], v))[:5]
                entry["top5_ids"].append(order)
                entry["top5_probs"].append([r6(math.exp(lp[v])) for v in order])
                entry["entropy"].append(r6(-sum(math.exp(v) * v for v in lp)))
                q = final[t]
                kl = sum(math.exp(a) * (a - b) for a, b in zip(q, lp))
                entry["kl_final_layer"].append(r6(max(kl, 0.0)))
                if t + 1 < len(ids):
                    nxt = ids[t + 1]
                    entry["next_rank"].append(sum(1 for v in z if v > z[nxt]))
                    entry["next_prob"].append(r6(math.exp(lp[nxt])))
                else:
                    entry["next_rank"].append(None)
                    entry["next_prob"].append(None)
            layers.append(entry)
        prompts.append({"text": text, "n_tokens": len(ids), "token_ids": ids, "layers": layers})
    return {
        "header": {
            "description": "Golden logit lens of lens_conformance's reference backend, computed "
            "by tests/data/make_reference_golden.py in f64 Python",
            "architecture": {"type": "reference", "n_layers": 3, "hidden": 4, "vocab": 12},
            "lens": "norm" if norm else "nonorm",
            "min_logit_gap": min_gap,
        },
        "prompts": prompts,
    }


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    for name, norm in [("golden_reference.json", True), ("golden_reference_raw.json", False)]:
        with open(os.path.join(here, name), "w") as f:
            json.dump(golden(norm), f, indent=1)
            f.write("\n")
