"""Train a small byte-level model on a text from Python, generate with the KV cache, and save
and load the checkpoint (the command-line equivalent is `relattn train` / `relattn generate`).

    python examples/train_and_generate.py
"""

import codecs
import contextlib
import io
import tempfile

import torch
import torch.nn.functional as F

from relattn.models import TinyLM, TinyLMConfig, ids_to_text, text_to_ids

with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
    import this
text = codecs.decode(this.s, "rot13")  # stored ROT13-encoded in every Python installation
data = text_to_ids(text)  # (N,) byte ids
torch.manual_seed(0)
model = TinyLM(TinyLMConfig(d_model=64, num_layers=2, num_heads=4, pe="alibi"))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
context, batch = 64, 16
for step in range(150):
    starts = torch.randint(0, len(data) - context - 1, (batch, 1))
    window = data[starts + torch.arange(context + 1)]  # (batch, context + 1)
    logits = model(window[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0 or step == 149:
        print(f"step {step:3d}  loss {loss.item():.3f} nats/byte")

model.eval()
prompt = text_to_ids("Beautiful is ")
ids = model.generate(prompt, max_new_tokens=60, temperature=0.5, top_k=20, seed=0)
print(repr(ids_to_text(ids)))

with tempfile.TemporaryDirectory() as folder:
    model.save(folder)  # model.safetensors + config.json
    again = TinyLM.load(folder)
    same = again.generate(prompt, max_new_tokens=60, temperature=0.5, top_k=20, seed=0)
    assert torch.equal(ids, same)
    print("reloaded checkpoint generates the same text")
