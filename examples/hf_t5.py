"""A Hugging Face T5 fine-tuned and sampled with its attention computed by relattn.

Builds a tiny random T5 (a stand-in for a checkpoint you have on disk), saves it to a local
directory, loads it back, applies relattn, takes one training step and generates.

    python examples/hf_t5.py
"""

import tempfile

import torch
from transformers import T5Config, T5ForConditionalGeneration

from relattn.integrations.transformers import apply


def main() -> list[list[int]]:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as path:
        T5ForConditionalGeneration(config).save_pretrained(path)
        model = T5ForConditionalGeneration.from_pretrained(path)  # a local directory only

    model = apply(model)  # same weights; attention via relattn, no N×N bias

    src = torch.randint(2, 128, (2, 48))
    mask = torch.ones_like(src)
    mask[1, 40:] = 0  # padding: becomes relattn's key_padding_mask
    labels = torch.randint(2, 128, (2, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    loss = model(input_ids=src, attention_mask=mask, labels=labels).loss
    loss.backward()  # reaches relative_attention_bias.weight through relattn's table gradient
    optimizer.step()
    print(f"one training step: loss {loss.item():.3f}")

    model.eval()
    out = model.generate(input_ids=src, attention_mask=mask, max_new_tokens=10, do_sample=True)
    print("generated:", out.tolist())
    return out.tolist()


if __name__ == "__main__":
    main()
