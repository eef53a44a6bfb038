"""A transformers causal LM trained with the Hugging Face ZeRO-3 DeepSpeed config (ds_config_zero3_hf.json: the
config of the transformers DeepSpeed docs, optimizer and parameters offloaded to the CPU, "auto" everywhere
the Trainer fills a value), driven the way the Trainer drives DeepSpeed: the "auto" values are filled from
training arguments first, then the filled dict is handed to `deepspeed.initialize(config=...)`. The model is a
2-layer Llama (random weights, no download) on synthetic token sequences.

One addition to the docs' config: `"torch_adam": true` in the optimizer params. With the optimizer offloaded,
DeepSpeed otherwise steps its DeepSpeedCPUAdam, a C++ op it compiles at start-up; torch's AdamW keeps this
example free of a compiler (ztune lists the key as ignored: it has its own CPU Adam).

Runs under DeepSpeed as written; under ztune the import line is the only change:

    torchrun --nproc_per_node 2 examples/deepspeed/hf_causal_lm.py \\
        --ds_config examples/deepspeed/ds_config_zero3_hf.json
"""

import argparse
import json
import math

import deepspeed
import torch
import transformers
from torch.utils.data import TensorDataset


def fill_auto(config: dict, args: argparse.Namespace, *, world_size: int, hidden_size: int, total_steps: int) -> dict:
    """`config` with its "auto" values replaced as the Hugging Face Trainer replaces them (transformers 5.x,
    integrations/deepspeed.py: HfTrainerDeepSpeedConfig.trainer_config_process and trainer_config_finalize),
    `args` playing the TrainingArguments. Values that are not "auto" are kept."""
    def fill(path: str, value):
        *parents, key = path.split(".")
        node = config
        for p in parents:
            node = node.get(p)
            if node is None:
                return
        if node.get(key) == "auto":
            node[key] = value

    micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    fill("train_micro_batch_size_per_gpu", micro)
    fill("gradient_accumulation_steps", accum)
    fill("train_batch_size", world_size * micro * accum)
    fill("gradient_clipping", args.max_grad_norm)
    fill("optimizer.params.lr", args.learning_rate)
    fill("optimizer.params.betas", [args.adam_beta1, args.adam_beta2])
    fill("optimizer.params.eps", args.adam_epsilon)
    fill("optimizer.params.weight_decay", args.weight_decay)
    fill("scheduler.params.warmup_min_lr", 0)
    fill("scheduler.params.warmup_max_lr", args.learning_rate)
    fill("fp16.enabled", args.fp16)
    fill("bf16.enabled", args.bf16)
    fill("zero_optimization.reduce_bucket_size", hidden_size * hidden_size)
    if config.get("zero_optimization", {}).get("stage") == 3:
        fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        fill("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size)
    fill("scheduler.params.total_num_steps", total_steps)
    # TrainingArguments.get_warmup_steps: warmup_steps if set, else ceil(total * warmup_ratio); at least 1.
    warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(total_steps * args.warmup_ratio)
    fill("scheduler.params.warmup_num_steps", max(1, warmup))
    return config


def synthetic_tokens(num: int = 64, seq: int = 16, vocab: int = 128, seed: int = 0) -> TensorDataset:
    """Sequences counting up in steps of 3 (mod vocab) from a random start: each next token follows from the
    last one, so a few optimizer steps already lower the loss."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (num, 1), generator=gen)
    return TensorDataset((start + 3 * torch.arange(seq)) % vocab)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ds_config", required=True, help="DeepSpeed JSON config, \"auto\" values allowed")
    parser.add_argument("--max_steps", type=int, default=5, help="optimizer steps")
    # The TrainingArguments the Trainer would fill the config from (its defaults, except where noted).
    parser.add_argument("--per_device_train_batch_size", type=int, default=2)  # Trainer: 8
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)  # Trainer: 1
    parser.add_argument("--learning_rate", type=float, default=1e-2)  # Trainer: 5e-5
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--warmup_steps", type=int, default=2)  # Trainer: 0
    parser.add_argument("--warmup_ratio", type=float, default=0.0)
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    parser.add_argument("--losses_out", default=None, help="write rank 0's losses here as JSON")
    args = parser.parse_args()

    deepspeed.init_distributed()
    torch.manual_seed(0)
    model_config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                            tie_word_embeddings=False, use_cache=False)
    model = transformers.LlamaForCausalLM(model_config)
    with open(args.ds_config) as f:
        ds_config = fill_auto(json.load(f), args, world_size=torch.distributed.get_world_size(),
                              hidden_size=model_config.hidden_size, total_steps=args.max_steps)
    engine, _, loader, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                                training_data=synthetic_tokens())
    losses = []
    for micro_step, (input_ids,) in enumerate(loader):
        if engine.global_steps == args.max_steps:
            break
        loss = engine(input_ids=input_ids, labels=input_ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if engine.global_rank == 0:
            print(f"micro-step {micro_step} loss {loss.item():.4f} lr {engine.get_lr()[0]:.2e}", flush=True)
    if args.losses_out and engine.global_rank == 0:
        with open(args.losses_out, "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    main()
