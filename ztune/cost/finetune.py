"""Partial fine-tuning (frozen parameters, LoRA) and the stage-3 initialisation peak: pure formulas.

Frozen parameters (`requires_grad=False`) hold only the compute-dtype parameter (sharded at stage 3 like the
trainable ones, as ztune's runtime does: runtime/construct/shards.py `FrozenGroup`): no gradient, no fp32
master, no optimizer state. They are still gathered at stage 3 in forward and backward, but produce no
gradient reduction.

Compute: per token and parameter, forward is 2 FLOPs and backward 4 (Kaplan et al. 2020, section 2.1;
Narayanan et al. 2021, Megatron-LM, eq. 3 derivation): 2 for the input gradient (dX = dY W^T) and 2 for the
weight gradient (dW = X^T dY). A frozen linear layer still needs the input gradient (layers below it may
train) but skips dW, so it costs 4 instead of 6 FLOPs per token and parameter (1/3 of its training FLOPs,
half of its backward's):

    FLOPs/token = 6 Psi_trainable + 4 Psi_frozen + 12 L h s

LoRA (Hu et al. 2021, "LoRA", section 4.1): a d_out x d_in weight gets A (r x d_in) and B (d_out x r), i.e.
r (d_in + d_out) trainable parameters, and the base weight is frozen. ztune's estimate adapts the matrices
PEFT adapts by default (peft `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`, src/peft/utils/constants.py):
q_proj and v_proj for Llama / Mistral / Qwen2 / Mixtral, the fused c_attn (h -> 3h) for GPT-2.
"""

from __future__ import annotations

from dataclasses import dataclass

from ztune.specs import Architecture, ModelSpec, ParamCounts

# Names of the adapted matrices, by architecture (PEFT's defaults, see the module docstring).
LORA_TARGETS = {
    Architecture.LLAMA: ("q_proj", "v_proj"),
    Architecture.MIXTRAL: ("q_proj", "v_proj"),
    Architecture.GPT2: ("c_attn",),
}

# Models are constructed in fp32 (torch's default dtype) before the engine casts them: the materialisation
# buffer and an eagerly built model hold 4 bytes per parameter.
CONSTRUCT_BYTES = 4


def lora_numel_per_layer(model: ModelSpec, *, rank: int) -> int:
    """Adapter parameters of one decoder layer at LoRA rank `rank`: r (d_in + d_out) per adapted matrix.

    Llama-like: q_proj (h -> heads x head_size) and v_proj (h -> kv_heads x head_size); GPT-2: c_attn (h -> 3h).
    """
    h = model.hidden_size
    if model.architecture is Architecture.GPT2:
        return rank * (h + 3 * h)
    q_out = model.num_heads * model.head_size
    return rank * (h + q_out) + rank * (h + model.kv_size)


@dataclass(frozen=True)
class TrainableSplit:
    """How many parameters train and how many are frozen (elements). `total` = trainable + frozen is what is
    stored; the *_active counts are what one token uses (FLOPs)."""

    trainable: int
    frozen: int
    trainable_active: int
    frozen_active: int
    description: str

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    @property
    def is_full(self) -> bool:
        return self.frozen == 0


def trainable_split(model: ModelSpec, counts: ParamCounts, *, fraction: float = 1.0, lora_rank: int = 0
                    ) -> TrainableSplit:
    """The split for a full fine-tune (fraction 1, rank 0), a trainable `fraction` in (0, 1] of the model's
    parameters (spread uniformly, so the same fraction of the active ones), or LoRA at `lora_rank` (the base
    model frozen, the adapters added and trained).

    Raises ValueError for a fraction outside (0, 1], a negative rank, or both a fraction < 1 and a rank."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"trainable fraction must be in (0, 1], got {fraction}")
    if lora_rank < 0:
        raise ValueError(f"LoRA rank must be >= 1, got {lora_rank}")
    if lora_rank and fraction < 1.0:
        raise ValueError("give a trainable fraction or a LoRA rank, not both")
    if lora_rank:
        per_layer = lora_numel_per_layer(model, rank=lora_rank)
        adapters = model.num_layers * per_layer
        names = "+".join(LORA_TARGETS[model.architecture])
        return TrainableSplit(
            trainable=adapters, frozen=counts.total, trainable_active=adapters, frozen_active=counts.active_per_token,
            description=f"LoRA rank {lora_rank} on {names} ({adapters:,} adapter parameters train, the base model "
                        "is frozen: PEFT's default targets)")
    trainable = round(fraction * counts.total)
    active = round(fraction * counts.active_per_token)
    what = "full fine-tune" if fraction == 1.0 else f"{fraction:.2%} of the parameters train, the rest frozen"
    return TrainableSplit(trainable=trainable, frozen=counts.total - trainable, trainable_active=active,
                          frozen_active=counts.active_per_token - active, description=what)


def training_flops_per_token(*, split: TrainableSplit, num_layers: int, attention_width: int, seq_len: int
                             ) -> float:
    """6 Psi_trainable + 4 Psi_frozen + 12 L h s (module docstring); 6 Psi + 12 L h s when nothing is frozen."""
    return (6.0 * split.trainable_active + 4.0 * split.frozen_active
            + 12.0 * num_layers * attention_width * seq_len)


def init_unit_numel(counts: ParamCounts) -> int:
    """Largest unit ztune's stage-3 construction materialises at once: a decoder layer, or the root unit (every
    parameter outside the layers: embedding, final norm and an untied LM head)."""
    return max(counts.per_layer, counts.embedding + counts.final_norm + counts.lm_head)


@dataclass(frozen=True)
class InitPeak:
    """Device bytes per rank while `ztune.initialize` builds stage 3's shards."""

    states_bytes: int  # the sharded model states (all of them: conservative, moments may come at step 1)
    unit_bytes: int  # one unit at full size in CONSTRUCT_BYTES (meta: materialised; eager: flattened for broadcast)
    model_bytes: int  # eager construction: the whole model on every rank's device; 0 for meta
    reserve_bytes: int

    @property
    def total(self) -> int:
        return self.states_bytes + self.unit_bytes + self.model_bytes + self.reserve_bytes


def init_peak(*, construction: str, num_params: int, unit_numel: int, states_bytes: int, reserve_bytes: int
              ) -> InitPeak:
    """Stage-3 init peak per rank (runtime/construct/shards.py builds the shards one unit at a time).

    meta: states + one unit at full size in fp32 (the unit `MetaInit.materialize` fills, its slice copied out).
    eager: the already built model is moved whole to every rank's device (fp32, 4 Psi) and each unit is
    flattened to an fp32 buffer and broadcast from rank 0, on top of the growing shards.

    Checked against docs/bench/zero_init.md (58M Llama, fp32, 221 MiB model, root unit 125 MiB; not fitted):
    meta at 2 ranks predicts 442 + 125 = 567 MiB vs 378 measured (+ initialise column, above the post-import
    baseline), at 4 ranks 221 + 125 = 346 vs 283; eager at 2 ranks 442 + 125 + 221 = 788 vs 518, at 4 ranks
    567 vs 455. The formula is an upper bound (about 1.2-1.5x): the runtime creates Adam's moments at the
    first step, not at init, and an eager model's full copies are freed as its units are sharded.
    """
    if construction not in CONSTRUCTIONS:
        raise ValueError(f"construction must be one of {', '.join(CONSTRUCTIONS)}, got {construction!r}")
    model = num_params * CONSTRUCT_BYTES if construction == "eager" else 0
    return InitPeak(states_bytes=states_bytes, unit_bytes=unit_numel * CONSTRUCT_BYTES, model_bytes=model,
                    reserve_bytes=reserve_bytes)


CONSTRUCTIONS = ("meta", "eager")
