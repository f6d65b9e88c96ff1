"""Models and text shared by the language-model diverge tests: a tiny random GPT-2 with a
byte-level BPE tokenizer trained on the fly (no downloads), random sentences, noisy weights."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "the quick brown fox jumps over a lazy dog while seven small cats sleep under one warm red blanket".split()


def texts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(torch.randint(12, 40, (1,), generator=g)),), generator=g)) for _ in range(n)]


def make_gpt2_dir(path: Path, *, vocab: int = 200, seed: int = 0, adds_bos: bool = False) -> Path:
    """A random GPT-2 with a byte-level BPE tokenizer trained here, saved with save_pretrained;
    ``adds_bos``: the tokenizer puts <|endoftext|> (id 0) before every text, as LLaMA's does."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts(200, 99), trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
        )
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0, initializer_range=0.2,  # peaked, LM-like outputs
    )
    model = transformers.GPT2LMHeadModel(config)
    path.mkdir(parents=True)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path


def noisy(tensors: dict[str, torch.Tensor], scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in tensors.items():
        out[name] = t + scale * t.std() * torch.randn(t.shape, generator=g) if t.dim() > 1 else t.clone()
    return out
