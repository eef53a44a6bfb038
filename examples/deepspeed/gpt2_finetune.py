"""A DeepSpeed-style GPT-2 fine-tune: a tiny GPT-2 (transformers, random weights, no download) on synthetic
token sequences, reading its config through add_config_arguments (--deepspeed_config).

Runs under DeepSpeed as written; under ztune the import line is the only change:

    torchrun --nproc_per_node 2 examples/deepspeed/gpt2_finetune.py \\
        --deepspeed --deepspeed_config examples/deepspeed/ds_config_gpt2.json
"""

import argparse
import json

import deepspeed
import torch
import transformers
from torch.utils.data import TensorDataset


def synthetic_tokens(num: int = 128, seq: int = 16, vocab: int = 96, seed: int = 0) -> TensorDataset:
    """Sequences that repeat a random 4-token motif: learnable, so the loss falls."""
    gen = torch.Generator().manual_seed(seed)
    motifs = torch.randint(0, vocab, (num, 4), generator=gen)
    return TensorDataset(motifs.repeat(1, seq // 4))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8, help="micro-steps to run")
    parser.add_argument("--losses_out", default=None, help="write rank 0's losses here as JSON")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    model = transformers.GPT2LMHeadModel(config)
    engine, _, loader, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters(),
                                                training_data=synthetic_tokens())
    losses = []
    for step, (input_ids,) in enumerate(loader):
        if step == args.steps:
            break
        loss = engine(input_ids=input_ids, labels=input_ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if engine.global_rank == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    if args.losses_out and engine.global_rank == 0:
        with open(args.losses_out, "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    main()
