"""A sentence encoder with a linear classifier on its mean-pooled token states.

Self-contained on purpose: ``fedpeft export`` copies this file next to an exported model and names it in
the model's ``config.json`` (``auto_map``), so that

    AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)

loads the model without fedpeft installed. It imports only torch and transformers.

The head reads what a sentence-transformers encoder (e.g. all-MiniLM-L6-v2) was trained to produce: the
mean of the last hidden states over non-padding tokens, L2-normalised when ``config.pooling_normalize``
is true, then ``dropout → Linear(hidden, num_labels)``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

AUTO_MAP = {"AutoModelForSequenceClassification": "modeling_mean_pooling.MeanPoolingForSequenceClassification"}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, *, normalize: bool) -> torch.Tensor:
    """Mean of ``hidden`` [batch, tokens, width] over the tokens ``attention_mask`` keeps."""
    if attention_mask is None:
        pooled = hidden.mean(dim=1)
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, p=2.0, dim=-1) if normalize else pooled


class MeanPoolingForSequenceClassification(PreTrainedModel):
    """``AutoModel`` encoder (under ``model``) → mean pooling → dropout → ``classifier``."""

    base_model_prefix = "model"  # a bare encoder checkpoint (BertModel keys) loads under it
    supports_gradient_checkpointing = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = AutoModel.from_config(config, add_pooling_layer=False) if config.model_type == "bert" \
            else AutoModel.from_config(config)
        dropout = getattr(config, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(config, "hidden_dropout_prob", 0.1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is getattr(self, "classifier", None):
            module.weight.data.normal_(mean=0.0, std=getattr(self.config, "initializer_range", 0.02))
            module.bias.data.zero_()
        elif isinstance(self.model, PreTrainedModel) and module is not self:
            self.model._init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def pooled(self, input_ids=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """The sentence embedding the classifier reads."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return mean_pool(hidden, attention_mask, normalize=bool(getattr(self.config, "pooling_normalize", False)))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        kwargs.pop("return_dict", None)
        logits = self.classifier(self.dropout(self.pooled(input_ids, attention_mask, **extra, **kwargs)))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)
