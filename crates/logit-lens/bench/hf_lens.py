"""The HF transformers side of `logit-lens bench`.

Reads {"model": GGUF path, "prompts": [[ids...]...], "repeats": n} on stdin and prints, per
prompt, the median seconds of: a forward pass capturing every hidden state; the full logit
lens (every layer x every position: final norm, lm_head, log-softmax, top-5, entropy, KL to
the final layer, next-token rank); the lens of the last position only; and one greedy
generation step after the prompt (a token's forward on the KV cache with every hidden state,
then the final layer's argmax; the median of 8 steps). This is how a researcher would write
the lens with transformers, batched per layer.
"""
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM

req = json.load(sys.stdin)
path = req["model"]
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
model.eval()
norm, head = model.model.norm, model.lm_head
captured = {}
model.model.layers[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("last", o[0] if isinstance(o, tuple) else o))


def forward(ids):
    out = model(torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    hs = list(out.hidden_states[:-1]) + [captured["last"]]
    return [h[0] for h in hs]


def lens(hs, ids, positions):
    final = torch.log_softmax(head(norm(hs[-1][positions])).float(), -1)
    p_final = final.exp()
    nxt = torch.tensor(ids[1:] + [ids[-1]])[positions]
    res = []
    for h in hs:
        lp = torch.log_softmax(head(norm(h[positions])).float(), -1)
        top = torch.topk(lp, 5, -1)
        ent = -(lp.exp().double() * lp.double()).sum(-1)
        kl = (p_final.double() * (final.double() - lp.double())).sum(-1)
        rank = (lp > lp.gather(-1, nxt[:, None])).sum(-1)
        res.append((top, ent, kl, rank))
    return res


def med(f, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); r = f(); ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2], r


def steps(ids, n=8):
    out = model(torch.tensor([ids]), use_cache=True)
    past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True, output_hidden_states=True)
        past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


results = []
with torch.inference_mode():
    for ids in req["prompts"]:
        n = req["repeats"]
        fwd, hs = med(lambda: forward(ids), n)
        full, _ = med(lambda: lens(hs, ids, torch.arange(len(ids))), n)
        one, _ = med(lambda: lens(hs, ids, torch.tensor([len(ids) - 1])), max(n, 5))
        step = steps(ids)
        results.append({"n": len(ids), "forward_s": fwd, "full_lens_s": full, "one_position_s": one, "step_s": step})
print(json.dumps(results))
