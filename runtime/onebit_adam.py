"""1-bit Adam (Tang et al. 2021, "1-bit Adam: Communication Efficient Large-Scale Training with Adam's
Convergence Speed", arXiv 2102.02888) over the engine's flat fp32 masters, at ZeRO stage 0.

The algorithm (the paper's Algorithm 1; equation numbers are this docstring's):
- Warm-up, steps 1 .. freeze_step: the original Adam on the all-reduced (averaged) gradient g_t:
      (1) m_t = b1 m_{t-1} + (1 - b1) g_t        (2) v_t = b2 v_{t-1} + (1 - b2) g_t^2
      (3) x_{t+1} = x_t (1 - lr wd) - lr (m_t / c1_t) / (sqrt(v_t / c2_t) + eps)
  with c1_t = 1 - b1^t, c2_t = 1 - b2^t when bias_correction is on (Kingma & Ba 2015), else 1, and
  decoupled weight decay wd (Loshchilov & Hutter 2019; DeepSpeed's OnebitAdam adds wd x p to the update,
  which is the same). With bias_correction on, (1)-(3) are torch.optim.AdamW's update.
  The warm-up is not written out again here: OneBitAdam steps it through `warmup`, the AdamW that
  runtime/optim_shard.build_shard_optimizer builds for the engine's own AdamW runs (the fused C++ kernel on
  CPU when it is built, else torch's fused AdamW), over the same state tensors, and the engine hands it the
  gradients exactly as it hands them to AdamW (runtime/optim_shard.step_shards). So before freeze_step a
  1-bit Adam run is bitwise the AdamW run (Adam's, at weight decay 0) of the same job, and a comparison of
  the two measures the compression stage only. (Written as torch ops, (3) differed from the C++ kernel in
  ~0.2% of the masters per step, torch's float32 sqrt not being correctly rounded; the bf16 tiny-llama runs
  of docs/bench/onebit_adam.md drifted apart from step 5 on, 1.10x in loss by step 150 on one seed.)
- Compression stage, steps t > freeze_step = T_w: v is frozen at v_{T_w} and nothing else is all-reduced.
  On worker i, from its local gradient g_t^(i) (not averaged):
      (4) m_t^(i) = b1 m_{t-1} + (1 - b1) g_t^(i)                      (local momentum)
      (5) mh_t^(i) = C[m_t^(i) + d_{t-1}^(i)],  d_t^(i) = m_t^(i) + d_{t-1}^(i) - mh_t^(i)    (worker error
                                                                                           feedback)
  the server of each 1/n piece averages what it received and compresses again:
      (6) mb_t = C[(1/n) sum_i mh_t^(i) + e_{t-1}],  e_t = (1/n) sum_i mh_t^(i) + e_{t-1} - mb_t    (server
                                                                                           error feedback)
  and every worker sets m_t = mb_t (the same bytes everywhere, so replicas stay identical) and applies
      (7) x_{t+1} = x_t (1 - lr wd) - lr (m_t / c1_t) / (sqrt(v_{T_w} / c2_{T_w}) + eps)
  The paper writes (7) without bias corrections or eps (x_{t+1} = x_t - lr m_t / sqrt(v_{T_w})); with
  bias_correction false (7) is exactly DeepSpeed's OnebitAdam update, m / (sqrt(v) + eps) + wd x p.
  Before (7):
      (8) m_t <- 0 where v_{T_w} = 0 (an element without a warm-up gradient has no step size; mask_unfrozen_)
  and, only with `step_bound` (ztune's option, off by default; not in the paper nor in DeepSpeed's OnebitAdam):
      (9) the step of (7) per element, (m_t / c1_t) / (sqrt(v_{T_w} / c2_{T_w}) + eps), clamped to
          +-(1 - b1) / sqrt(1 - b2)  (bound_step_): the bound Adam's own effective step obeys (Kingma & Ba 2015,
          Section 2.1: |step| <= lr (1 - b1) / sqrt(1 - b2) when 1 - b1 > sqrt(1 - b2), 3.16 lr at the default
          betas), because Adam's variance takes in the gradient that makes its momentum; a frozen variance does
          not, so an element whose gradient was tiny in the warm-up and grows later (the output-layer row of a
          token absent from the warm-up: its gradient p_j h is ~1e-4 of what it becomes once the token is a
          label) gets steps ~1e3 x lr without (9). docs/bench/onebit_adam.md has the measurements.
  and, only with `local_momentum` (ztune's option, off by default; not in the paper nor in DeepSpeed's OnebitAdam),
  (4) is replaced by
      (4') m_t^(i) = b1 m_{t-1}^(i) + (1 - b1) g_t^(i)    (each worker's own momentum, m_{T_w}^(i) = m_{T_w})
  and (5)-(6) exchange it for (7) only: the exchanged mb_t is the update's m_t, but no worker's momentum is
  replaced by it. Momentum is linear, so (1/n) sum_i m_t^(i) is exactly the momentum (1) of the averaged gradient,
  and the error feedback still makes sum_t mb_t track sum_t (1/n) sum_i m_t^(i) (Karimireddy et al. 2019). What
  changes is where the code's error goes: in (4) the exchanged momentum, error included, is the next step's b1
  m_{t-1}, so with r_t = (1/n) sum_i d_t^(i) + e_t the sum of the steps (7) is off Adam's with frozen variance by
  ~ lr r_t / (1 - b1) (10 x r_t at b1 = 0.9); with (4') by ~ lr r_t. Bytes are unchanged; each rank keeps one more
  numel of state (`local_momentum`, rank-local like the errors). docs/bench/onebit_adam.md has the measurements.
- C[.] is runtime/comm/compress.py's 1-bit codec: per block of ONEBIT_CHUNK_NUMEL elements, the signs and
  one fp32 scale: the block's mean |x| (default), or with onebit_scale "rms" its ||x|| / sqrt(block)
  (DeepSpeed's OnebitAdam's kind of scale, there one per worker buffer): the code keeps the block's norm, where
  the mean's code has sqrt(mean(x)^2 / mean(x^2)) of it and leaves the rest to the error feedback.
- The exchange (5)-(6) is runtime/grad_reduce.CompressedExchange: an all-to-all in which rank r receives
  every worker's compressed piece r (rank r is piece r's server), then an all-gather of the compressed
  averages. Bytes per rank per step: 2 (n-1)/n x (numel/8 + 4 numel/ONEBIT_CHUNK_NUMEL), 0.039x (1/25.6) of an
  fp32 all-reduce's 2 (n-1)/n x 4 numel at the 128-element block.

The compression stage's element-wise steps, (4), (4'), (7), (8) and (9) (momentum_, local_momentum_,
mask_unfrozen_, adam_update_, bounded_update_), run the C++ kernel of runtime/onebit_kernels.py where it takes the
tensors (contiguous fp32 CPU), bit for bit the torch ops written here, which run otherwise and for inf/NaN input.

State per master (optimizer.state[master]): step, exp_avg (m), exp_avg_sq (v; frozen after freeze_step),
and from the first compressed step worker_error (d, the master's numel) and server_error (e, numel / n), and with
local_momentum, local_momentum (m^(i) of (4'), numel). m and v are the same on every rank; the errors and
local_momentum are this rank's own (RANK_LOCAL_KEYS in runtime/state/capture.py): a checkpoint stores them per
rank and restores them at the same world size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ztune.config.schema import Compression, OptimizerType
from ztune.runtime import onebit_kernels
from ztune.runtime.comm import Comm
from ztune.runtime.comm.compress import Codec

# What a param group of OneBitAdam passes on to its warm-up AdamW (a scheduler may move them).
_SHARED_HYPER = ("lr", "betas", "eps", "weight_decay", "bias_correction")


def bias_corrections(*, step: int, variance_step: int, beta1: float, beta2: float, enabled: bool
                     ) -> tuple[float, float]:
    """(c1, c2) of equations (3) and (7): 1 - b1^step and 1 - b2^variance_step, or (1, 1) when disabled."""
    if not enabled:
        return 1.0, 1.0
    return 1.0 - beta1 ** step, 1.0 - beta2 ** variance_step


def _part(t: torch.Tensor, begin: int, end: int) -> torch.Tensor:
    """Elements [begin, end) of `t` as the kernel counts them: all of `t` when that is the whole range (the kernel
    may not have taken it: not contiguous), else (it took it: contiguous) a flat view."""
    return t if (begin, end) == (0, t.numel()) else t.view(-1)[begin:end]


def momentum_(m: torch.Tensor, grad: torch.Tensor, *, beta1: float) -> torch.Tensor:
    """Equations (1) / (4) in place: m <- b1 m + (1 - b1) grad, as m.lerp_(grad, 1 - b1) rounds it (the C++ kernel
    of runtime/onebit_kernels.py where it takes the tensors, bitwise the same). Returns m."""
    for b, e in onebit_kernels.momentum_(m, grad, weight=1.0 - beta1):
        _part(m, b, e).lerp_(_part(grad, b, e), 1.0 - beta1)
    return m


def local_momentum_(own: torch.Tensor, m: torch.Tensor, grad: torch.Tensor, v: torch.Tensor, *,
                    beta1: float) -> torch.Tensor:
    """Equation (4') and (8) on this rank's own momentum, then its copy into m (the buffer the exchange sends):
    own <- b1 own + (1 - b1) grad, own <- 0 where v == 0, m <- own; one pass of the C++ kernel where it takes the
    tensors (runtime/onebit_kernels.py), else those three torch ops. Returns own."""
    for b, e in onebit_kernels.momentum_(own, grad, weight=1.0 - beta1, v=v, out=m):
        part = _part(own, b, e)
        _torch_mask_(part.lerp_(_part(grad, b, e), 1.0 - beta1), _part(v, b, e))
        _part(m, b, e).copy_(part)
    return own


def variance_(v: torch.Tensor, grad: torch.Tensor, *, beta2: float) -> torch.Tensor:
    """Equation (2) in place: v <- b2 v + (1 - b2) grad^2. Returns v."""
    return v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def adam_update_(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float, eps: float,
                 weight_decay: float, c1: float, c2: float, mask_zero_variance: bool = False) -> None:
    """Equations (3) / (7) in place on p (fp32, same shape as m and v); with mask_zero_variance, equation (8)
    (mask_unfrozen_) on m first, in the same pass. The C++ kernel of runtime/onebit_kernels.py where it takes the
    tensors (bitwise the torch ops of _torch_adam_update_ and mask_unfrozen_)."""
    for b, e in onebit_kernels.update_(p, m, v, lr=lr, eps=eps, weight_decay=weight_decay, c1=c1, c2=c2, bound=None,
                                       mask=mask_zero_variance):
        pp, mp, vp = _part(p, b, e), _part(m, b, e), _part(v, b, e)
        if mask_zero_variance:
            _torch_mask_(mp, vp)
        _torch_adam_update_(pp, mp, vp, lr=lr, eps=eps, weight_decay=weight_decay, c1=c1, c2=c2)


def _torch_adam_update_(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float, eps: float,
                        weight_decay: float, c1: float, c2: float) -> None:
    """adam_update_ as torch ops: the fallback, and the reference the kernel is tested against."""
    if weight_decay:
        p.mul_(1.0 - lr * weight_decay)
    denom = v.sqrt().div_(c2 ** 0.5).add_(eps)  # one buffer: the same rounding as sqrt(v) / sqrt(c2) + eps
    p.addcdiv_(m, denom, value=-lr / c1)


def adam_step_bound(*, beta1: float, beta2: float) -> float:
    """Equation (9)'s bound on |m_hat / (sqrt(v_hat) + eps)|: (1 - b1) / sqrt(1 - b2) (Kingma & Ba 2015,
    Section 2.1), or 1 when 1 - b1 <= sqrt(1 - b2) (the paper's other case)."""
    return max(1.0, (1.0 - beta1) / (1.0 - beta2) ** 0.5)


def bounded_update_(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float, eps: float,
                    weight_decay: float, c1: float, c2: float, bound: float, mask_zero_variance: bool = False) -> None:
    """Equation (7) with (9) in place on p: the per-element step (m / c1) / (sqrt(v / c2) + eps) clamped to
    [-bound, bound] before it is scaled by lr. Same shapes and mask_zero_variance as adam_update_; the same
    kernel."""
    for b, e in onebit_kernels.update_(p, m, v, lr=lr, eps=eps, weight_decay=weight_decay, c1=c1, c2=c2,
                                       bound=bound, mask=mask_zero_variance):
        pp, mp, vp = _part(p, b, e), _part(m, b, e), _part(v, b, e)
        if mask_zero_variance:
            _torch_mask_(mp, vp)
        _torch_bounded_update_(pp, mp, vp, lr=lr, eps=eps, weight_decay=weight_decay, c1=c1, c2=c2, bound=bound)


def _torch_bounded_update_(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float, eps: float,
                           weight_decay: float, c1: float, c2: float, bound: float) -> None:
    """bounded_update_ as torch ops: the fallback, and the reference the kernel is tested against."""
    if weight_decay:
        p.mul_(1.0 - lr * weight_decay)
    denom = v.sqrt().div_(c2 ** 0.5).add_(eps)  # one buffer: the same rounding as sqrt(v) / sqrt(c2) + eps
    step = torch.div(m, denom).div_(c1).clamp_(-bound, bound)
    p.add_(step, alpha=-lr)


def mask_unfrozen_(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Equation (8) in place: m <- 0 where the frozen variance v is exactly 0. Returns m.

    An element whose gradient was zero at every warm-up step has v_{T_w} = 0, so (7) would move it by
    lr m / eps (1e8 m at eps 1e-8) the first time its gradient is not zero: e.g. the input-embedding row of
    a token first seen after the freeze (tiny-llama's untied embedding on the synthetic corpus: ~1,450 of 8,192
    rows first seen between steps 60 and 300). Adam would have given that element its own variance; frozen,
    it has none, and the compression stage exchanges no gradients to build one. So its momentum is held at
    zero and the element stays where the warm-up left it (weight decay aside): what DeepSpeed's OnebitAdam
    does for the entries a user lists in `exp_avg_mask` ("parameters with constant zero gradients"), here
    found from the frozen variance itself. Elements with any warm-up gradient (v > 0) are untouched.
    The C++ kernel of runtime/onebit_kernels.py where it takes the tensors (the same bits, one pass)."""
    for b, e in onebit_kernels.mask_(m, v):
        _torch_mask_(_part(m, b, e), _part(v, b, e))
    return m


def _torch_mask_(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """mask_unfrozen_ as the torch op: the fallback, and the reference the kernel is tested against."""
    return m.masked_fill_(v == 0, 0.0)


def onebit_codec(*, scale: str = "mean") -> Codec:
    return Codec(Compression.ONEBIT, onebit_scale=scale)


class OneBitAdam(torch.optim.Optimizer):
    """1-bit Adam over flat fp32 masters whose numel is a multiple of the world size (module docstring).

    `step()` reads each master's `.grad`: the averaged gradient while `compressing` is False (warm-up: the
    engine all-reduces and divides by world size x loss scale), this rank's own gradient (divided by the loss
    scale only) once it is True. Every rank must call step() with the same masters in the same order: in the
    compression stage each master's step is a collective. Param groups carry lr, betas, eps, weight_decay,
    bias_correction (a scheduler may move lr); `freeze_step` is the optimizer's, as in DeepSpeed. step_bound:
    apply equation (9) in the compression stage (ztune's option; False is Tang et al.'s and DeepSpeed's update).
    local_momentum: equation (4') instead of (4) (ztune's option; False is Tang et al.'s and DeepSpeed's).
    The warm-up steps go through `warmup_optimizer()` (module docstring); the engine calls it itself, so that the
    gradients reach it as they reach the engine's AdamW."""

    def __init__(self, params: Iterable, *, comm: Comm, freeze_step: int, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 bias_correction: bool = True, valid_numel: dict[int, int] | None = None, step_bound: bool = False,
                 local_momentum: bool = False, onebit_scale: str = "mean", fused_cpu: bool = False):
        """valid_numel: id(master) -> its elements before the flat buffer's tail padding (default: all).
        fused_cpu: the warm-up's AdamW runs the fused C++ CPU kernel (what the engine's AdamW runs on CPU when the
        kernel is built; runtime/initialize.py decides for both)."""
        if freeze_step < 1:
            raise ValueError(f"freeze_step must be >= 1, got {freeze_step}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction))
        self.comm = comm
        self.freeze_step = freeze_step
        self.step_bound = step_bound
        self.local_momentum = local_momentum
        self.codec = onebit_codec(scale=onebit_scale)
        self.valid_numel = dict(valid_numel or {})
        self._exchanges: dict[int, object] = {}
        from ztune.runtime.optim_shard import build_shard_optimizer

        # Equations (1)-(3): the engine's AdamW, one group per group here (decoupled decay, as (3) has it).
        self.warmup = build_shard_optimizer(
            [p for g in self.param_groups for p in g["params"]], kind=OptimizerType.ADAMW, lr=lr, betas=betas,
            eps=eps, weight_decay=weight_decay, momentum=0.0, fused_cpu=fused_cpu, bias_correction=bias_correction,
            param_groups=[{"params": g["params"], **{k: g[k] for k in _SHARED_HYPER}} for g in self.param_groups])

    @property
    def steps_done(self) -> int:
        """Optimizer steps applied so far (the same for every master)."""
        for group in self.param_groups:
            for p in group["params"]:
                step = self.state.get(p, {}).get("step")
                if step is not None:
                    return int(step)  # load_state_dict may have made it a tensor
        return 0

    @property
    def compressing(self) -> bool:
        """Whether the next step is a compression-stage step (local gradients, 1-bit momentum exchange)."""
        return self.steps_done >= self.freeze_step

    def warmup_optimizer(self) -> torch.optim.Optimizer:
        """`warmup`, the AdamW that applies equations (1)-(3), ready for one step: it shares this optimizer's
        state (step, exp_avg, exp_avg_sq; also after load_state_dict replaced it) and takes this optimizer's
        lr, betas, eps, weight_decay and bias_correction per group (a scheduler moves this one's)."""
        self.warmup.state = self.state
        for mine, theirs in zip(self.param_groups, self.warmup.param_groups, strict=True):
            theirs.update({k: mine[k] for k in _SHARED_HYPER})
        return self.warmup

    def _exchange(self, p: torch.Tensor):
        from ztune.runtime.grad_reduce import CompressedExchange

        ex = self._exchanges.get(id(p))
        if ex is None:
            if p.numel() % self.comm.world_size:
                raise ValueError(f"1-bit Adam: a master of {p.numel()} elements does not split into "
                                 f"{self.comm.world_size} equal pieces")
            ex = CompressedExchange(self.codec, comm=self.comm, padded_numel=p.numel(), device=p.device)
            self._exchanges[id(p)] = ex
        return ex

    def exchange_momentum_(self, p: torch.Tensor, m: torch.Tensor, state: dict, *, mask: bool = True) -> None:
        """Equations (5)-(6): replace local momentum `m` (fp32 [numel]) by the all-gathered compressed average,
        updating this rank's worker and server errors in `state`. Collective. mask: then equation (8) on m
        (False: the caller's update applies it, as step() does, in the update's own pass)."""
        ex = self._exchange(p)
        n = self.comm.world_size
        if "worker_error" not in state:
            state["worker_error"] = torch.zeros_like(m)
            state["server_error"] = torch.zeros(m.numel() // n, dtype=m.dtype, device=m.device)
        # The residuals live in the optimizer state (checkpointed; load_state_dict replaces the tensors).
        ex.worker.residual, ex.server.residual = state["worker_error"], state["server_error"]
        work, recv = ex.start(m)  # (5): compress m + d piece by piece, all-to-all
        work.wait()
        avg = ex.reduce(recv).div_(n)  # the server's mean of the n decompressed pieces
        ex.gather(avg, m)  # (6): compress avg + e, all-gather, decompress every piece into m
        # A 1-bit code has no zero: the padding after the parameters (zero gradient) would receive +-scale
        # momentum and, with a zero frozen variance there, m / eps updates. Keep it at exactly zero (the role of
        # DeepSpeed's exp_avg_mask for entries whose gradient is always zero); the parameters are untouched.
        m[self.valid_numel.get(id(p), m.numel()):].zero_()
        if mask:
            mask_unfrozen_(m, state["exp_avg_sq"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        if any(p.grad is None for g in self.param_groups for p in g["params"]):
            raise RuntimeError("1-bit Adam: every master needs a gradient at every step (a missing one "
                               "would desynchronise the collective exchange)")
        if not self.compressing:
            self.warmup_optimizer().step()  # (1)-(3): the engine's AdamW (module docstring)
            return loss
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                state["step"] = int(state["step"]) + 1  # int(): the warm-up's torch AdamW keeps a tensor
                m, v = state["exp_avg"], state["exp_avg_sq"]  # v: frozen since freeze_step
                if self.local_momentum:  # (4'): this rank's own momentum, never replaced by the exchanged one
                    own = state.get("local_momentum")
                    if own is None:
                        own = state["local_momentum"] = m.clone()
                    local_momentum_(own, m, p.grad, v, beta1=beta1)  # (4'), (8), then m <- own
                else:
                    momentum_(m, p.grad, beta1=beta1)  # (4), this rank's own gradient
                self.exchange_momentum_(p, m, state, mask=False)  # (5), (6); (8) in the update's pass
                c1, c2 = bias_corrections(step=state["step"], variance_step=self.freeze_step,
                                          beta1=beta1, beta2=beta2, enabled=group["bias_correction"])
                if self.step_bound:
                    bounded_update_(p, m, v, lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"],
                                    c1=c1, c2=c2, bound=adam_step_bound(beta1=beta1, beta2=beta2),
                                    mask_zero_variance=True)
                else:
                    adam_update_(p, m, v, lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"],
                                 c1=c1, c2=c2, mask_zero_variance=True)  # (8), (7)
        return loss


def build_onebit_adam(masters: list[torch.Tensor], *, valid_numels: list[int], comm: Comm, freeze_step: int,
                      lr: float, betas: tuple[float, float], eps: float, weight_decay: float, bias_correction: bool,
                      param_groups: list[dict] | None = None, step_bound: bool = False,
                      local_momentum: bool = False, onebit_scale: str = "mean",
                      fused_cpu: bool = False) -> OneBitAdam:
    """OneBitAdam over `masters` (valid_numels[i]: master i's elements before its padding), or over torch-style
    `param_groups` of them (per-group overrides). fused_cpu: as the engine's AdamW (OneBitAdam.__init__)."""
    params = list(param_groups) if param_groups is not None else list(masters)
    return OneBitAdam(params, comm=comm, freeze_step=freeze_step, lr=lr, betas=betas, eps=eps,
                      weight_decay=weight_decay, bias_correction=bias_correction, step_bound=step_bound,
                      local_momentum=local_momentum, onebit_scale=onebit_scale, fused_cpu=fused_cpu,
                      valid_numel={id(m): n for m, n in zip(masters, valid_numels, strict=True)})
