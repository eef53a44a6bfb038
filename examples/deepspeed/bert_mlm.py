"""A DeepSpeed-style masked-LM pre-training loop: a tiny BERT (transformers, random weights, no download) on
synthetic token sequences with 15% of positions masked, trained with ZeRO-2 and the optimizer offloaded to the
CPU (ds_config_bert.json). It shows the pieces BERT pre-training scripts use:
- parameter groups: biases and LayerNorm weights without weight decay, the rest with it;
- gradient accumulation (train_batch_size 8 = micro 2 x 2 ranks x accumulation 2), with the loss of each
  optimizer step reported when `engine.is_gradient_accumulation_boundary()` says this micro-step completes it;
- a checkpoint (`engine.save_checkpoint`, with the data position as client state) after `--save_at` optimizer
  steps, and at the end `engine.load_checkpoint` and a replay of the steps after it, which give the same losses.

Runs under DeepSpeed as written; under ztune the import line is the only change:

    torchrun --nproc_per_node 2 examples/deepspeed/bert_mlm.py --checkpoint_dir /tmp/mlm \\
        --deepspeed --deepspeed_config examples/deepspeed/ds_config_bert.json
"""

import argparse
import json

import deepspeed
import torch
import transformers
from torch.utils.data import TensorDataset

VOCAB, SEQ = 64, 16
MASK_ID = 1  # token 0 is padding, 1 the mask; real tokens are 2..VOCAB-1
IGNORE = -100  # label of unmasked positions: left out of the loss (torch's cross_entropy ignore_index)


def synthetic_mlm(num: int = 96, mask_prob: float = 0.15, seed: int = 0) -> TensorDataset:
    """(input_ids, labels), each (num, SEQ): sequences repeating a random 4-token motif (so a masked token can be
    inferred from its context), with positions masked at random; labels hold the original token there."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, VOCAB, (num, 4), generator=gen).repeat(1, SEQ // 4)
    masked = torch.rand(num, SEQ, generator=gen) < mask_prob
    masked[:, 0] = True  # at least one masked position per sequence
    inputs = tokens.masked_fill(masked, MASK_ID)
    labels = tokens.masked_fill(~masked, IGNORE)
    return TensorDataset(inputs, labels)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The usual BERT split: no weight decay on biases and LayerNorm weights."""
    no_decay = ("bias", "LayerNorm.weight")
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0}]


def train(engine, batches, start: int, stop: int, *, save_at: int | None = None, checkpoint_dir: str = ""):
    """Micro-steps start..stop-1 over `batches`; returns the mean loss of each optimizer step in that range."""
    step_losses, window = [], []
    for i in range(start, stop):
        input_ids, labels = batches[i]
        loss = engine(input_ids=input_ids, labels=labels).loss
        engine.backward(loss)
        window.append(loss.item())
        boundary = engine.is_gradient_accumulation_boundary()  # does this step() apply the optimizer?
        engine.step()
        if boundary:
            step_losses.append(sum(window) / len(window))
            window = []
            if engine.global_rank == 0:
                print(f"optimizer step {engine.global_steps} loss {step_losses[-1]:.4f} lr {engine.get_lr()[0]:.2e}",
                      flush=True)
            if save_at is not None and engine.global_steps == save_at:
                engine.save_checkpoint(checkpoint_dir, client_state={"next_micro_step": i + 1})
    return step_losses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps to run")
    parser.add_argument("--save_at", type=int, default=3, help="save a checkpoint after this optimizer step")
    parser.add_argument("--checkpoint_dir", required=True)
    parser.add_argument("--losses_out", default=None, help="write rank 0's losses here as JSON")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, pad_token_id=0)
    model = transformers.BertForMaskedLM(config)
    engine, _, loader, _ = deepspeed.initialize(args=args, model=model,
                                                model_parameters=parameter_groups(model, weight_decay=0.01),
                                                training_data=synthetic_mlm())
    batches = list(loader)  # this rank's micro-batches, kept so that the resumed run sees the same data
    num_micro = args.steps * engine.gradient_accumulation_steps()
    losses = train(engine, batches, 0, num_micro, save_at=args.save_at, checkpoint_dir=args.checkpoint_dir)

    # Back to the checkpoint: the steps after it must repeat.
    _, client_state = engine.load_checkpoint(args.checkpoint_dir)
    resumed = train(engine, batches, client_state["next_micro_step"], num_micro)
    if engine.global_rank == 0:
        print(f"resumed at optimizer step {args.save_at}: losses {resumed}", flush=True)
    if args.losses_out and engine.global_rank == 0:
        with open(args.losses_out, "w") as f:
            json.dump({"losses": losses, "resumed": resumed}, f)


if __name__ == "__main__":
    main()
