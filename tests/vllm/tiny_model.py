"""Build a tiny Llama-architecture model directory for vLLM's `--load-format dummy`: a
byte-level BPE tokenizer trained on a few lines here, a Llama 3 style chat template, and a
config of tiny sizes. No weights: vLLM fills them with random values.

Run with the vLLM virtualenv's Python (it has `tokenizers` and `transformers`):

    python tests/vllm/tiny_model.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BOS, EOS = "<|begin_of_text|>", "<|eot_id|>"
SPECIAL = [BOS, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", EOS]

# What the tokenizer learns its merges from: prompts of the kind the tests send and the
# JSON that schema-constrained answers are made of.
CORPUS = [
    "Review 1: 'great value' Sentiment of the review: positive, negative, neutral, mixed.",
    "You label product reviews for the returns team. Label it.",
    '{"label": "positive"} {"label": "negative"} {"label": "neutral"} {"label": "mixed"}',
    '{"answer": "yes", "score": 0.5, "items": [1, 2, 3], "ok": true, "none": null}',
    "system user assistant The quick brown fox jumps over the lazy dog 0123456789.",
]

# Llama 3's chat template, reduced to what the OpenAI-compatible server needs.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token="<|end_of_text|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    vocab = tokenizer.get_vocab_size()
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,  # 4 heads of 32: the smallest head vLLM's CPU attention takes
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS),
        pad_token_id=tokenizer.token_to_id("<|end_of_text|>"),
        torch_dtype="float32",
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id})
    )
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
