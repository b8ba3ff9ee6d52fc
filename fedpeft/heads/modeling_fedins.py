"""FedIns instance-adaptive inference: a pool of SSF entries, one key each, and a classifier that builds an
SSF for each input from the entries whose keys match the input's own features.

FedIns: Feng et al., "Towards Instance-adaptive Inference for Federated Learning", ICCV 2023,
arXiv 2308.06051 (official code: github.com/chunmeifeng/FedIns). For one input x:

1. the **query** q(x) is the frozen base model's own pooled feature of x (the pool switched off): the
   paper's frozen pretrained ViT [CLS] token; here the pooling the classifier's head reads (mean of the
   non-padding token states for a mean-pooling head, the first token for BERT's [CLS] head, the last
   non-padding token for a decoder's ``score`` head);
2. cosine similarity of q(x) to each of the M keys; the **top N** entries are chosen (hard top-N,
   no weighting by similarity, as the official code);
3. the chosen entries' scales and shifts are **averaged**, γ(x) = mean γ_i, β(x) = mean β_i, and every
   target layer's output becomes γ(x) ⊙ h + β(x). The official code averages over the batch as well
   (one SSF per batch, its issue #2); this is per instance, as the paper describes;
4. training adds the **matching loss** 1 − Σ_{i chosen} cos(q(x), k_i) (the official code's, summed over
   the N chosen entries, batch mean), the objective being (1 − λ)·CE + λ·match with λ = 0.1 there. Keys
   learn only from it; an entry's γ, β only when chosen.

Self-contained on purpose, like :mod:`modeling_mean_pooling` beside it: ``fedpeft export`` copies both
files next to an exported FedIns model and names this one in ``config.json`` (``auto_map``), so

    AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)

runs the instance-adaptive inference without fedpeft installed. fedpeft's own training model
(:mod:`fedpeft.adapters.ssf_pool`) uses the same functions, so both compute the same predictions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .modeling_mean_pooling import MeanPoolingForSequenceClassification, mean_pool

AUTO_MAP = {"AutoModelForSequenceClassification": "modeling_fedins.FedInsForSequenceClassification"}
# a target's pool child and the keys' module: ``<target>.ssf_pool.scale`` / ``.shift``, ``ssf_pool.keys``
POOL_CHILD = "ssf_pool"
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class SSFPool(nn.Module):
    """M scale-and-shift entries over one layer's output features: y = (w γ) ⊙ x + (w β) per example.

    A leaf module holding only the pool (``scale`` and ``shift``, each M × d), so Opacus sees one layer
    with one per-sample gradient rule. ``weights`` (n × M, each row the chosen entries at 1/N) is an
    input, not state, so that rule can read it.
    """

    def __init__(self, size: int, features: int, *, init_std: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(size, features))
        self.shift = nn.Parameter(torch.zeros(size, features))
        if init_std > 0:
            with torch.no_grad():
                self.scale.normal_(1.0, init_std)
                self.shift.normal_(0.0, init_std)
        self.routing: torch.Tensor | None = None  # this forward's weights; None: the pool is off (the query pass)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        w = weights.to(self.scale.dtype)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        gamma, beta = (w @ self.scale).view(shape), (w @ self.shift).view(shape)
        return x * gamma.to(x.dtype) + beta.to(x.dtype)

    def extra_repr(self) -> str:
        return f"size={self.scale.shape[0]}, features={self.scale.shape[1]}"


class PoolKeys(nn.Module):
    """The pool's M keys (M × width); the forward gives the cosine of each query to each key (n × M)."""

    def __init__(self, size: int, width: int) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.empty(size, width))
        nn.init.trunc_normal_(self.keys, std=0.02)  # the official code's initialisation

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(query.to(self.keys.dtype), dim=-1) @ nn.functional.normalize(self.keys, dim=-1).T


def select(cosine: torch.Tensor, n_select: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights n × M, chosen n × N)``: each row's top-N entries by cosine, weighted 1/N (ties: lower index)."""
    chosen = torch.topk(cosine.detach(), n_select, dim=-1, sorted=True).indices
    weights = torch.zeros_like(cosine, dtype=torch.float32).scatter_(1, chosen, 1.0 / n_select)
    return weights, chosen


def match_loss(cosine: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """1 − Σ_{i chosen} cos(q, k_i), averaged over the batch (the keys' only training signal)."""
    return (1.0 - cosine.gather(1, chosen).sum(dim=1)).mean()


def _apply_pool(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    pool: SSFPool = getattr(module, POOL_CHILD)
    return output if pool.routing is None else pool(output, pool.routing)


def pool_features(module: nn.Module) -> int:
    """The output width of a layer a pool can follow (``nn.Linear`` or a 1-D ``nn.LayerNorm``)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    raise TypeError(f"an SSF pool follows nn.Linear or a 1-D nn.LayerNorm, not {type(module).__name__}")


def attach_pools(model: nn.Module, targets: Iterable[str], *, size: int, init_std: float = 0.0) -> dict[str, object]:
    """Give each named module of ``model`` an :class:`SSFPool` child applied to its output; name → hook."""
    modules = dict(model.named_modules())
    hooks = {}
    for name in targets:
        module = modules[name]
        pool = SSFPool(size, pool_features(module), init_std=init_std)
        ref = next(module.parameters(), None)
        if ref is not None:
            pool.to(device=ref.device, dtype=ref.dtype if ref.dtype.is_floating_point else None)
        module.add_module(POOL_CHILD, pool)
        hooks[name] = module.register_forward_hook(_apply_pool)
    return hooks


def pools_of(model: nn.Module) -> list[SSFPool]:
    return [m for m in model.modules() if isinstance(m, SSFPool)]


@torch.no_grad()
def pooled_query(classifier: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The frozen classifier's own pooled feature of each input (call it with every pool off), computed in
    eval mode: the query is the frozen model's, without training's dropout."""
    backbone = classifier.base_model
    extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
    training = backbone.training
    backbone.eval()
    try:
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
    finally:
        backbone.train(training)
    if isinstance(classifier, MeanPoolingForSequenceClassification):
        return mean_pool(hidden, attention_mask, normalize=bool(getattr(classifier.config, "pooling_normalize", False)))
    if hasattr(classifier, "score"):  # a decoder's head reads the last non-padding token
        last = (attention_mask.sum(dim=1) - 1).clamp(min=0) if attention_mask is not None else \
            torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return hidden[:, 0]


def routed_forward(classifier: nn.Module, pools: list[SSFPool], keys: PoolKeys, n_select: int,
                   batch: dict) -> tuple[object, torch.Tensor]:
    """``(classifier output, matching loss)`` with each input's SSF built from its top-N pool entries
    (``pools``: the classifier's, :func:`pools_of`, found once by the caller; each is off between calls)."""
    query = pooled_query(classifier, **{k: batch[k] for k in INPUT_KEYS if batch.get(k) is not None})
    cosine = keys(query)
    weights, chosen = select(cosine, n_select)
    for pool in pools:
        pool.routing = weights
    try:
        output = classifier(**batch)
    finally:
        for pool in pools:
            pool.routing = None
    return output, match_loss(cosine, chosen)


class FedInsForSequenceClassification(PreTrainedModel):
    """A sequence classifier (``inner``) with SSF pools after its target layers and the pool's keys
    (``ssf_pool``); ``config.fedins`` holds ``targets``, ``pool_size``, ``pool_select`` and ``inner``
    (the inner classifier's class: the mean-pooling one, or the architecture's own)."""

    base_model_prefix = "inner"
    _supports_sdpa = True  # attention is the inner classifier's: it supports what its architecture does
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config) -> None:
        super().__init__(config)
        spec = dict(config.fedins)
        if spec.get("inner") == "MeanPoolingForSequenceClassification":
            config._attn_implementation = "eager"  # that head declares no other (and fedpeft trains it so)
            self.inner = MeanPoolingForSequenceClassification(config)
        else:
            from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

            self.inner = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)](config)
        self.n_select = int(spec["pool_select"])
        attach_pools(self.inner, spec["targets"], size=int(spec["pool_size"]))
        self._pools = pools_of(self.inner)
        self.ssf_pool = PoolKeys(int(spec["pool_size"]), config.hidden_size)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, SSFPool):
            module.scale.data.fill_(1.0)
            module.shift.data.zero_()
        elif isinstance(module, PoolKeys):
            nn.init.trunc_normal_(module.keys.data, std=0.02)
        elif hasattr(self, "inner") and module is not self:
            self.inner._init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        kwargs.pop("return_dict", None)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        output, _ = routed_forward(self.inner, self._pools, self.ssf_pool, self.n_select,
                                   {k: v for k, v in batch.items() if v is not None})
        logits = output.logits
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)
