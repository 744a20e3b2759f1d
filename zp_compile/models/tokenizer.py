"""A tokenizer made locally (no download): byte-level BPE trained on a small built-in English corpus.

Serves the embedded default checkpoint (``zp-compile serve`` with no arguments) and the server tests.
Byte-level, so any text encodes; the corpus makes common words and the default labels (" yes", " no",
" positive", " negative") single tokens. Deterministic: the same vocabulary on every machine.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}  # ids 0, 1, 2: the tiny configs' ids

_CORPUS = """
The quick brown fox jumps over the lazy dog. Is the following statement true? Answer yes or no.
Question: does the passage support the claim? Answer: yes. Question: is the review positive or
negative? Answer: positive. The movie was great and the acting was wonderful, a positive review.
The film was boring, too long and badly written: a negative review. Answer: no. Answer: negative.
Classify the topic of the document: science, history, sports, politics, business, health, art.
Read the passage and answer the question with yes or no. The model reads the prompt and the system
scores the next token. A mixture of experts routes each token to a few experts in every layer.
Which of the following is correct? A, B, C or D. The answer is A. The answer is B. The answer is C.
The answer is D. Relevant or not relevant? This document is relevant to the query about the weather.
Paris is the capital of France. Water boils at one hundred degrees. The sun rises in the east.
"""


def _texts() -> list[str]:
    lines = [line.strip() for line in _CORPUS.strip().splitlines()]
    labels = " yes no positive negative relevant true false"
    return lines * 20 + [labels] * 50


def tiny_tokenizer(path: str | Path | None = None, vocab_size: int = 1024):
    """Train the built-in byte-level BPE, wrap it as a transformers fast tokenizer, save it to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_texts(), trainer=trainer)
    # Left padding: the server and the tests read the logits at the last position of every row.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, padding_side="left", model_max_length=4096, **SPECIAL)
    if path is not None:
        tokenizer.save_pretrained(path)
    return tokenizer
