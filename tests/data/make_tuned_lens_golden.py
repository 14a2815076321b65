"""Goldens for loading a lens of the `tuned-lens` Python package (Belrose et al. 2023).

Builds `tuned_lens.nn.lenses.TunedLens.from_model` on the oracle's tiny Llama
(tests/data/oracle/tiny-llama), fills its translators with seeded random numbers (a trained
lens is not needed to test loading: any translators must give the package's numbers), saves
it with the package's own `lens.save` (params.pt, a torch pickle, and config.json) into
tests/data/tuned-lens/, and writes tuned-lens/golden.json: for each prompt and each
translated layer L = 0..N-1 (HF hidden_states[L], the pre-norm residual after L blocks) and
each position, the package's `lens(hidden, L)` distribution: top-5 ids and probabilities
(float32 softmax of its logits) and KL(model output || lens) in nats (float64 sum).

Run with tuned-lens==0.2.0, torch and transformers (checked: torch 2.15.0, transformers
5.24.0), from the repository root:
    python tests/data/make_tuned_lens_golden.py
"""

import json
import pathlib

import torch
import transformers
import tuned_lens
from transformers import AutoModelForCausalLM, AutoTokenizer
from tuned_lens.nn.lenses import TunedLens

ROOT = pathlib.Path(__file__).resolve().parent
MODEL = ROOT / "oracle" / "tiny-llama"
OUT = ROOT / "tuned-lens"
PROMPTS = ["The capital of France is", "Once upon a time, there was a little"]

torch.manual_seed(15)
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(MODEL)
lens = TunedLens.from_model(model)
with torch.no_grad():
    for t in lens.layer_translators:
        t.weight.normal_(0.0, 0.05)
        t.bias.normal_(0.0, 0.5)
# The config records where the model came from; keep the repository's path, not this machine's.
lens.config.base_model_name_or_path = "tests/data/oracle/tiny-llama"
lens.save(OUT)
# Read it back as a user would, so the goldens are the saved lens's numbers.
lens = TunedLens.from_model_and_pretrained(model, OUT).eval()

prompts = []
for text in PROMPTS:
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
        final = out.logits[0].float().log_softmax(-1)
        layers = []
        for layer in range(len(lens)):
            logits = lens(out.hidden_states[layer], layer)[0].float()
            logp = logits.log_softmax(-1)
            top = torch.topk(logits, 5, dim=-1, sorted=True)
            kl = (final.double().exp() * (final.double() - logp.double())).sum(-1)
            layers.append(
                {
                    "layer": layer,
                    "top5_ids": top.indices.tolist(),
                    "top5_probs": logp.exp().gather(-1, top.indices).tolist(),
                    "kl_to_final": kl.tolist(),
                }
            )
    prompts.append({"text": text, "token_ids": ids, "layers": layers})

golden = {
    "description": __doc__.strip().splitlines()[0],
    "versions": {
        "tuned_lens": tuned_lens.__version__ if hasattr(tuned_lens, "__version__") else "0.2.0",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    },
    "seed": 15,
    "prompts": prompts,
}
(OUT / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
print("wrote", OUT)
