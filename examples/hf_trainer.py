"""Hugging Face Trainer: a tiny GPT-2 from config on synthetic tokens, with healthmon's callback.

    python examples/hf_trainer.py             # healthy run (CPU, well under a minute)
    python examples/hf_trainer.py --lr 0.3    # a learning rate 100x too high: see the alerts

The one line healthmon adds is ``callbacks=[HFHealthCallback()]``. The model is random-initialised
from a ``GPT2Config`` (nothing is downloaded); the tokens follow a noisy Markov chain, so the loss
falls well below log(vocab). healthmon's TensorBoard events and JSON report go to
``<output_dir>/healthmon``; check the run with ``healthmon check <output_dir>/healthmon``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from healthmon.integrations.hf import HFHealthCallback

VOCAB, LENGTH = 32, 24


class MarkovTokens(Dataset):
    """Sequences of a noisy Markov chain; labels are the inputs (the model shifts them).

    The next token is ``3 * token + 1`` mod the vocabulary, or a random one with probability 0.2.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        tokens = torch.empty(n, LENGTH, dtype=torch.int64)
        tokens[:, 0] = torch.randint(VOCAB, (n,), generator=g)
        for t in range(1, LENGTH):
            noise = torch.randint(VOCAB, (n,), generator=g)
            keep = torch.rand(n, generator=g) > 0.2
            tokens[:, t] = torch.where(keep, (3 * tokens[:, t - 1] + 1) % VOCAB, noise)
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A two-layer GPT-2 with 32-dimensional embeddings, random-initialised from its config."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def main(argv: Sequence[str] | None = None) -> HFHealthCallback:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--output-dir", default=None, help="default: a temporary folder")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="hf_trainer_")
    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=args.lr,
        warmup_steps=15,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    health = HFHealthCallback()
    trainer = Trainer(
        model=tiny_gpt2(),
        args=training_args,
        train_dataset=MarkovTokens(2048),
        callbacks=[health],  # the one line healthmon adds
    )
    trainer.train()
    print(f"healthmon report: {health.report_path}")
    return health


if __name__ == "__main__":
    main()
