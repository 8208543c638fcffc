"""Small random models made on the fly (no model hub is reachable): for tests and the demo.

Each maker writes a normal Hugging Face directory (safetensors, config, a byte-level BPE tokenizer
with a chat template) that stock vLLM and transformers both load. Sizes respect vLLM's CPU attention
(head_dim must be one of 32, 64, 80, ...).
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_CORPUS = [
    "The secure service keeps the secret part of every weight matrix.",
    "vLLM serves the public residual with continuous batching on the host.",
    "def add(a, b):\n    return a + b\n",
    "import os\nimport sys\nprint(sys.argv)\n",
    "Low rank factors, singular values and orthogonal blinding matrices.",
    "Hello world! How are you today? Fine, thanks, and you?",
    "for i in range(10):\n    total += i * i\n",
    "class Model:\n    def forward(self, x):\n        return self.layer(x)\n",
]


def make_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(family: str, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, tie: bool):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if family == "llama":
        return tf.LlamaConfig(**common, architectures=["LlamaForCausalLM"])
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None, architectures=["MistralForCausalLM"])
    if family == "qwen2":
        return tf.Qwen2Config(**common, architectures=["Qwen2ForCausalLM"])
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=hidden // heads, architectures=["Qwen3ForCausalLM"])
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512,
                             bos_token_id=0, eos_token_id=0, architectures=["GPT2LMHeadModel"],
                             tie_word_embeddings=True)
    if family == "bert":
        return tf.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=2 * hidden,
                             max_position_embeddings=512, pad_token_id=1, architectures=["BertModel"])
    raise ValueError(f"unknown tiny model family {family!r}")


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "bert")


def make_tiny_model(family: str, out_dir: str | Path, *, hidden: int = 128, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, tie: bool = False, seed: int = 0, init_std: float = 0.1) -> Path:
    """Write a random model of ``family`` to ``out_dir``; returns the directory.

    ``init_std`` is larger than transformers' default (0.02) so random models produce peaked,
    input-dependent next-token distributions rather than near-uniform ones, which makes token-level
    comparisons meaningful.
    """
    import transformers as tf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    config = _config(family, len(tokenizer), hidden, layers, heads, kv_heads, tie)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = getattr(tf, config.architectures[0])(config).to(torch.float32).eval()
    # Random biases (Qwen2 q/k/v, GPT-2, BERT) so bias handling is exercised, not just zero.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and "norm" not in name.lower() and "ln" not in name:
                p.normal_(0.0, init_std)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
