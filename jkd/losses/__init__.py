"""Pure distillation losses and metrics.

Every function maps arrays to *per-example* values of shape ``[...]`` (the inputs' leading
axes) and leaves the reduction to the caller; hyper-parameters are keyword-only; ``where=``
masks examples (padding tokens, for instance). All accept bf16/f16 inputs and compute in
float32, and work under ``jax.jit``, ``jax.vmap`` and ``jax.grad``.
"""

from jkd.losses._chunked import chunked_soft_distillation_loss
from jkd.losses._chunked import projected_soft_distillation_loss
from jkd.losses._cross import cross_tokenizer_divergence
from jkd.losses._cross import projected_cross_tokenizer_divergence
from jkd.losses._cross import span_log_probs
from jkd.losses._cross import stored_cross_tokenizer_divergence
from jkd.losses._cross import teacher_span_values
from jkd.losses._cross import uld_distance
from jkd.losses._dkd import decoupled_distillation_loss
from jkd.losses._features import attention_map
from jkd.losses._features import attention_transfer_loss
from jkd.losses._features import hint_loss
from jkd.losses._hard import cross_entropy_loss
from jkd.losses._hard import hard_distillation_loss
from jkd.losses._metrics import teacher_student_kl
from jkd.losses._metrics import top1_agreement
from jkd.losses._objective import distillation_objective
from jkd.losses._soft import blended_soft_loss
from jkd.losses._soft import soft_distillation_loss
from jkd.losses._relational import contrastive_representation_loss
from jkd.losses._relational import rkd_angle_loss
from jkd.losses._relational import rkd_distance_loss
from jkd.losses._relational import similarity_preserving_loss
from jkd.losses._relational import standardize_logits
from jkd.losses._sparse import teacher_topk
from jkd.losses._sparse import topk_soft_distillation_loss
from jkd.losses._token import Divergence
from jkd.losses._token import ForwardKL
from jkd.losses._token import GeneralizedJSD
from jkd.losses._token import ReverseKL
from jkd.losses._token import SkewForwardKL
from jkd.losses._token import SkewReverseKL
from jkd.losses._token import TotalVariation
from jkd.losses._token import token_divergence
from jkd.losses._token import projected_token_divergence
from jkd.losses._token import projected_topk_kl
from jkd.losses._token import token_mean

__all__ = [
    "Divergence",
    "ForwardKL",
    "GeneralizedJSD",
    "ReverseKL",
    "SkewForwardKL",
    "SkewReverseKL",
    "TotalVariation",
    "token_divergence",
    "projected_token_divergence",
    "projected_topk_kl",
    "token_mean",
    "cross_tokenizer_divergence",
    "projected_cross_tokenizer_divergence",
    "stored_cross_tokenizer_divergence",
    "teacher_span_values",
    "span_log_probs",
    "uld_distance",
    "attention_map",
    "contrastive_representation_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "similarity_preserving_loss",
    "standardize_logits",
    "attention_transfer_loss",
    "blended_soft_loss",
    "chunked_soft_distillation_loss",
    "projected_soft_distillation_loss",
    "cross_entropy_loss",
    "decoupled_distillation_loss",
    "distillation_objective",
    "hard_distillation_loss",
    "hint_loss",
    "soft_distillation_loss",
    "teacher_student_kl",
    "teacher_topk",
    "top1_agreement",
    "topk_soft_distillation_loss",
]
