"""A DeepSpeed-style image classifier: a small CNN on a synthetic 10-class image set, with a linear warm-up
of the learning rate (a client scheduler handed to initialize) and gradient clipping from the config.

Runs under DeepSpeed as written; under ztune the import line is the only change:

    torchrun --nproc_per_node 2 examples/deepspeed/image_classifier.py \\
        --deepspeed --deepspeed_config examples/deepspeed/ds_config_classifier.json
"""

import argparse
import json

import deepspeed
import torch
from torch import nn
from torch.utils.data import TensorDataset


def synthetic_images(num: int = 256, seed: int = 0) -> TensorDataset:
    """(num, 3, 16, 16) images whose class is written into their mean colour, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (num,), generator=gen)
    palette = torch.randn(10, 3, 1, 1, generator=gen)
    images = palette[labels] + 0.5 * torch.randn(num, 3, 16, 16, generator=gen)
    return TensorDataset(images, labels)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(16, 10)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12, help="micro-steps to run")
    parser.add_argument("--warmup", type=int, default=4, help="optimizer steps of linear lr warm-up")
    parser.add_argument("--losses_out", default=None, help="write rank 0's losses here as JSON")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Net()

    def warmup(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.warmup))

    engine, _, loader, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters(),
                                                training_data=synthetic_images(), lr_scheduler=warmup)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for step, (images, labels) in enumerate(loader):
        if step == args.steps:
            break
        loss = loss_fn(engine(images), labels)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if engine.global_rank == 0:
            print(f"step {step} loss {loss.item():.4f} lr {engine.get_lr()[0]:.2e}", flush=True)
    if args.losses_out and engine.global_rank == 0:
        with open(args.losses_out, "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    main()
