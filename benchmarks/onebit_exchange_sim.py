"""Which property of 1-bit Adam's momentum exchange costs loss: one process simulating n workers.

A diagnostic for docs/bench/onebit_adam.md (issue 15), cheaper than the cluster in a box: one process trains
tiny-llama in bf16 (fp32 masters, as the engine) for n = 4 simulated workers, each with its own batch (the
bench's data: runtime/data.batches with rank r of 4), the bench's lr schedule (WarmupCosineLR, linear warm-up,
cosine to 0.1x) and Adam for the first `freeze_step` steps on the averaged gradient. The state after the warm-up
(masters, m, v) is saved once per seed, and every variant continues from it, so all variants of one seed share
their warm-up bit for bit (as the box's Adam and 1-bit Adam runs do) and differ only in the compression stage:

- adam: Adam on the averaged gradient (the reference);
- frozen: the frozen variance, local momenta averaged exactly (no compression; runtime/onebit_adam.py (4), (7));
- the exchange variants: runtime/onebit_adam.py equations (4)-(6) with a worker and a server error feedback
  around a sign code (compress below), then (8) and, with step_bound, (9).

The sign codes (x -> sign(x) * scale per block; what each sends: 1 bit per element plus the scales):
- mean<B>: scale = mean |x| per block of B elements (runtime/comm/compress.py's codec at B = 128; Seide et al. 2014);
- rms<B>: scale = ||x|| / sqrt(B) per block (DeepSpeed's OnebitAdam scale, there one per worker buffer);
- dsrms: DeepSpeed's OnebitAdam: one RMS scale for the worker's whole buffer, one per server piece;
- W/S: code W on the workers, S on the servers ("none": that side exact), e.g. mean128/none.
A `pre:` prefix (e.g. pre:mean128) exchanges the preconditioned momentum u = m / (sqrt(v_T / c2) + eps) instead of m
(errors kept in u's space; every worker holds the same frozen v, so m = u_hat x the same denominator); `q:` uses
the square root of that denominator (m / v^(1/4), the space in which the frozen-variance update is plain momentum
SGD: with P = diag(1 / sqrt(v)) and y = P^(-1/2) x, the step of x by lr P m is a step of y by lr P^(1/2) m);
`inc:` exchanges the momentum's increment (1 - b1) g^(i) instead of m^(i) (b1 m_{t-1} is the same on every
worker, so only the new part goes through the code): m_t = b1 m_{t-1} + C-averaged increment;
`local:` keeps each worker's own momentum m^(i)_t = b1 m^(i)_{t-1} + (1 - b1) g^(i)_t (never replaced by the
exchanged value; their mean is the momentum of the averaged gradient, momentum being linear) and exchanges it for the
update (7) only, so the code's error reaches the parameters once instead of through the momentum recursion.

Loss = the mean over the 4 workers of the TAIL losses ending at step k (the bench's window). Prints one JSON line
per variant: the windows at 160..300 and their ratio to adam's.

Usage: python benchmarks/onebit_exchange_sim.py --seed 0 --variants adam,frozen,mean128 [--steps 300]
       [--freeze-step 150] [--state-dir /tmp/onebit_sim] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TAIL = 20
WORLD = 4
LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8
LR_WARMUP, COS_MIN = 30, 0.1
BLOCK_ALIGN = 4 * 128  # pad the flat buffer so every piece holds whole blocks of up to 128


def lr_at(step: int, total: int) -> float:
    """runtime/compat/lr_schedules.WarmupCosineLR's lr for 0-based optimizer step `step` (it = step - 1)."""
    it = step - 1
    if it < 0:
        return 0.0
    if it < LR_WARMUP:
        return LR * it / LR_WARMUP
    progress = min(1.0, (it - LR_WARMUP + 1) / max(1, total - LR_WARMUP))
    return LR * max(0.0, COS_MIN + (1 - COS_MIN) * (1 + math.cos(math.pi * progress)) / 2)


def sign_code(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x (1-D fp32, numel a multiple of 128) -> its sign code's decompressed value."""
    if kind == "none":
        return x.clone()
    if kind == "whole_rms":
        return torch.where(x >= 0, 1.0, -1.0).mul_(torch.linalg.vector_norm(x) / math.sqrt(x.numel()))
    block = int(kind.lstrip("meanrs"))
    xb = x.view(-1, block)
    if kind.startswith("mean"):
        scale = xb.abs().mean(dim=1, keepdim=True)
    else:
        scale = torch.linalg.vector_norm(xb, dim=1, keepdim=True) / math.sqrt(block)
    return torch.where(xb >= 0, 1.0, -1.0).mul_(scale).view(-1)


class Exchange:
    """Equations (5)-(6) for WORLD simulated workers over a flat buffer of `numel` (piece r: server r)."""

    def __init__(self, code: str, numel: int):
        if code == "dsrms":
            self.worker_code, self.server_code = "whole_rms", "whole_rms"
        else:  # "worker/server" codes, "none" for an exact side
            self.worker_code, _, self.server_code = code.partition("/")
            self.server_code = self.server_code or self.worker_code
        self.d = [torch.zeros(numel) for _ in range(WORLD)]
        self.e = torch.zeros(numel)  # the servers' errors, piece r at [r * numel / WORLD, ...)
        self.piece = numel // WORLD
        self.error_ratio = []

    def __call__(self, xs: list[torch.Tensor]) -> torch.Tensor:
        n = self.piece
        avg = torch.zeros_like(self.e)
        for x, d in zip(xs, self.d, strict=True):
            y = d.add_(x)
            if self.worker_code == "whole_rms":  # DeepSpeed: one scale over the worker's whole buffer
                sent = sign_code(y, "whole_rms")
            else:
                sent = sign_code(y, self.worker_code)
            d.sub_(sent)
            avg.add_(sent)
        avg.div_(WORLD).add_(self.e)
        out = torch.empty_like(avg)
        for r in range(WORLD):
            out[r * n:(r + 1) * n] = sign_code(avg[r * n:(r + 1) * n], self.server_code)
        self.e.copy_(avg).sub_(out)
        return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="adam,frozen,mean128")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--freeze-step", type=int, default=150)
    ap.add_argument("--stop-at", type=int, default=None, help="end the variants after this step (the lr schedule "
                    "still spans --steps)")
    ap.add_argument("--no-step-bound", action="store_true")
    ap.add_argument("--state-dir", default="/tmp/onebit_sim")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="append the JSON lines here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ztune.profiles import load_model
    from ztune.runtime.data import batches, synthetic_corpus
    from ztune.runtime.models import build_model
    from ztune.runtime.onebit_adam import adam_step_bound

    spec = load_model("tiny-llama")
    seed, T, steps = args.seed, args.freeze_step, args.steps
    corpus = synthetic_corpus(vocab_size=spec.vocab_size, num_tokens=64 * WORLD * steps * 2, seed=seed)
    model = build_model(spec, dtype=torch.bfloat16, seed=seed)
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    numel = sum(sizes)
    padded = -(-numel // BLOCK_ALIGN) * BLOCK_ALIGN
    b1, b2 = BETAS
    bound = adam_step_bound(beta1=b1, beta2=b2)

    def load_params(master: torch.Tensor) -> None:
        with torch.no_grad():
            for p, chunk in zip(params, master[:numel].split(sizes), strict=True):
                p.copy_(chunk.view_as(p))

    def local_grads(step_batches) -> tuple[list[torch.Tensor], list[float]]:
        grads, losses = [], []
        for ids, labels in step_batches:
            loss = model(ids, labels=labels)
            loss.backward()
            g = torch.zeros(padded)
            g[:numel] = torch.cat([p.grad.reshape(-1).float() for p in params])
            for p in params:
                p.grad = None
            grads.append(g)
            losses.append(loss.item())
        return grads, losses

    def data():
        its = [batches(corpus, batch_size=1, seq_len=64, rank=r, world_size=WORLD, seed=seed, steps=steps)
               for r in range(WORLD)]
        return zip(*its, strict=True)

    state_path = Path(args.state_dir) / f"seed{seed}_T{T}.pt"
    state_path.parent.mkdir(parents=True, exist_ok=True)
    if state_path.exists():
        st = torch.load(state_path)
    else:  # the warm-up: Adam on the averaged gradient, equations (1)-(3)
        master = torch.zeros(padded)
        master[:numel] = torch.cat([p.detach().reshape(-1).float() for p in params])
        m, v, losses_by_step = torch.zeros(padded), torch.zeros(padded), []
        t0 = time.time()
        for step, sb in enumerate(data()):
            if step == T:
                break
            load_params(master)
            grads, losses = local_grads(sb)
            losses_by_step.append(losses)
            g = torch.stack(grads).sum(0).div_(WORLD)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            c1, c2 = 1 - b1 ** (step + 1), 1 - b2 ** (step + 1)
            master.addcdiv_(m, v.div(c2).sqrt_().add_(EPS), value=-lr_at(step, steps) / c1)
            if step % 25 == 0:
                print(f"[warm-up seed {seed}] step {step} loss {sum(losses) / WORLD:.3f} {time.time() - t0:.0f} s",
                      flush=True)
        st = {"master": master, "m": m, "v": v, "losses": losses_by_step}
        torch.save(st, state_path)

    for variant in args.variants.split(","):
        master, m, v = st["master"].clone(), st["m"].clone(), st["v"].clone()
        losses_by_step = [list(x) for x in st["losses"]]
        pre = variant.split(":")[0] if ":" in variant else ""
        code = variant.split(":")[-1]
        exchange = Exchange(code, padded) if code not in ("adam", "frozen") else None
        c2_T = 1 - b2 ** T
        frozen_zero = v == 0
        t0 = time.time()
        stop = args.stop_at or steps
        for step, sb in enumerate(data()):
            if step < T:
                continue
            if step >= stop:
                break
            load_params(master)
            grads, losses = local_grads(sb)
            losses_by_step.append(losses)
            lr = lr_at(step, steps)
            c1 = 1 - b1 ** (step + 1)
            if code == "adam":
                g = torch.stack(grads).sum(0).div_(WORLD)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                master.addcdiv_(m, v.div(1 - b2 ** (step + 1)).sqrt_().add_(EPS), value=-lr / c1)
                continue
            denom = v.div(c2_T).sqrt_().add_(EPS)
            locals_ = [m.lerp(g, 1 - b1) for g in grads]  # (4)
            if code == "frozen":
                m = torch.stack(locals_).sum(0).div_(WORLD)
            elif pre == "local":  # each worker keeps its own momentum; only the update direction is exchanged
                if step == T:
                    own = [m.clone() for _ in range(WORLD)]
                for mine, g in zip(own, grads, strict=True):
                    mine.lerp_(g, 1 - b1).masked_fill_(frozen_zero, 0.0)
                m = exchange([mine.clone() for mine in own])
            elif pre == "inc":  # exchange the momentum's increment (1 - b1) g^(i); b1 m is the same everywhere
                inc = exchange([g.mul(1 - b1).masked_fill_(frozen_zero, 0.0) for g in grads])
                m = m.mul_(b1).add_(inc)
            else:
                if pre:
                    w = denom.sqrt() if pre == "q" else denom
                    locals_ = [x.masked_fill_(frozen_zero, 0.0).div_(w) for x in locals_]
                m = exchange(locals_)  # (5), (6)
                if pre:
                    m.mul_(w)
            m.masked_fill_(frozen_zero, 0.0)  # (8)
            m[numel:] = 0.0
            step_ = m.div(denom).div_(c1)
            if not args.no_step_bound:
                step_.clamp_(-bound, bound)  # (9)
            master.add_(step_, alpha=-lr)
            if step % 25 == 0:
                print(f"[{variant} seed {seed}] step {step} loss {sum(losses) / WORLD:.3f} {time.time() - t0:.0f} s",
                      flush=True)
        windows = {k: sum(sum(ls[r] for ls in losses_by_step[k - TAIL:k]) / TAIL for r in range(WORLD)) / WORLD
                   for k in range(T + 10, stop + 1, 10)}
        rec = {"seed": seed, "variant": variant, "freeze_step": T, "step_bound": not args.no_step_bound,
               "windows": windows, "wall_s": time.time() - t0}
        line = json.dumps(rec)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
