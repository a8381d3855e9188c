"""EsmForLocalization: an ESM-2 or ESM C encoder with a pooling + classification head for subcellular localisation."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, EsmModel, TextClassificationPipeline
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.esm.modeling_esm import EsmPreTrainedModel

try:
    from .configuration_esmloc import EsmLocConfig, backbone_family, checkpoint_license
    from .tokenization_esmloc import window_spans
except ImportError:  # imported as a top-level module (an installed package or the repository root)
    from configuration_esmloc import EsmLocConfig, backbone_family, checkpoint_license
    from tokenization_esmloc import window_spans

try:  # ESM C: transformers >= 5.25 (EsmLocConfig refuses an ESM C backbone without it)
    from transformers import EsmcModel
except ImportError:
    EsmcModel = None


# Windows of long proteins run through the encoder this many at a time (without gradients, this bounds the memory of
# a very long protein; with them, every window's activations are kept for the backward pass anyway).
WINDOWS_PER_PASS = 8


MULTI_LABEL = "multi_label_classification"


# --- the decision rule: logits -> probabilities -> labels, the same on every path ----------------------------------


def label_probabilities(logits, multi_label: bool) -> torch.Tensor:
    """Logits (n, num_labels) -> probabilities (n, num_labels): a sigmoid per label for multi-label models, a softmax
    otherwise; float32 (float64 stays float64) whatever the model's dtype."""
    logits = torch.as_tensor(logits)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


def predicted_labels(probabilities, names, multi_label: bool, thresholds=None) -> list:
    """The decision rule: the predicted label(s) of each protein from its (num_labels,) probabilities.

    Binary: `names[1]` when its probability >= `thresholds` (one number; None: 0.5), else `names[0]`.
    Multi-label: the list of labels (in model order) whose probability >= their threshold (one per label, or one
    for all; None: 0.5), possibly empty. Multi-class: the most probable label (`thresholds` must be None).
    The comparison is made in float64, so every path that computes the same probability decides alike."""
    probabilities = torch.as_tensor(probabilities).to(torch.float64)
    names = list(names)
    if not multi_label and len(names) != 2:
        if thresholds is not None:
            raise ValueError("a multi-class model predicts its most probable label: it takes no threshold")
        return [names[index] for index in probabilities.argmax(dim=-1).tolist()]
    cuts = torch.as_tensor(0.5 if thresholds is None else thresholds, dtype=torch.float64).reshape(-1)
    if multi_label:
        chosen = probabilities >= cuts.expand(len(names))
        return [[name for name, on in zip(names, row) if on] for row in chosen.tolist()]
    return [names[1] if on else names[0] for on in (probabilities[:, 1] >= cuts[0]).tolist()]


def decision_rule(config) -> tuple[list, bool, object]:
    """(label names in output order, multi-label?, thresholds) of a model's config: what `predicted_labels` needs."""
    names = [config.id2label[key] for key in sorted(config.id2label, key=int)]
    return names, config.problem_type == MULTI_LABEL, getattr(config, "decision_thresholds", None)


@dataclass
class LocalizationOutput(SequenceClassifierOutput):
    r"""
    pooling_weights (`torch.FloatTensor` of shape `(batch_size, sequence_length)`, *optional*):
        The attention-pooling weight of every token (zero for padding, `<cls>` and `<eos>`; each row sums to 1),
        returned with `output_pooling_weights=True` when `config.pooling == "attention"`.
    """

    pooling_weights: torch.FloatTensor | None = None


def residue_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The positions of residues: attended tokens other than the first (`<cls>`) and the last (`<eos>`)."""
    mask = attention_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device)
    first = mask.int().argmax(dim=1, keepdim=True)
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1, keepdim=True)
    return mask & (positions > first) & (positions < last)


def stitch_windows(states, spans):
    """One protein's token states (`<cls>` residues `<eos>`) from the states of its windows (`spans` as
    `tokenization_esmloc.window_spans` gives them; one `(end - start + 2, hidden)` tensor per window, `<cls>` window
    `<eos>`): each residue's state comes from the window that keeps it (the one it lies most central in), the
    `<cls>` and `<eos>` states are the mean of the windows' ones. One window is returned as it is."""
    if len(states) == 1:
        return states[0]
    residues = [state[1 + keep_start - start:1 + keep_end - start]
                for state, (start, _, keep_start, keep_end) in zip(states, spans, strict=True)]
    cls = torch.stack([state[0] for state in states]).mean(dim=0, keepdim=True)
    eos = torch.stack([state[-1] for state in states]).mean(dim=0, keepdim=True)
    return torch.cat([cls, *residues, eos])


class EsmLocPooler(nn.Module):
    """Turns per-token states into one vector per protein; padding and special tokens never contribute."""

    def __init__(self, config: EsmLocConfig):
        super().__init__()
        self.mode = config.pooling
        self.attention = nn.Linear(config.hidden_size, 1) if self.mode == "attention" else None

    def forward(self, hidden_states, attention_mask):
        if self.mode == "cls":
            first = attention_mask.int().argmax(dim=1)
            return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), first], None
        return self.pool_residues(hidden_states, residue_mask(attention_mask))

    def pool_residues(self, hidden_states, residues):
        """Mean or attention pooling of the positions where `residues` (bool, batch x length) is true; the states may
        hold only the residues (cached per-residue features) or whole token sequences."""
        if self.mode == "cls":
            raise ValueError("<cls> pooling needs the <cls> state, not residue states")
        residues = residues.bool().unsqueeze(-1)
        if self.mode == "mean":
            total = (hidden_states * residues).sum(dim=1)
            return total / residues.sum(dim=1).clamp(min=1), None
        scores = self.attention(hidden_states).masked_fill(~residues, torch.finfo(hidden_states.dtype).min)
        weights = torch.softmax(scores.float(), dim=1).to(hidden_states.dtype) * residues
        return (weights * hidden_states).sum(dim=1), weights.squeeze(-1)


class EsmLocClassificationHead(nn.Module):
    """Dropout, a hidden layer and the output projection, applied to the pooled protein vector."""

    def __init__(self, config: EsmLocConfig):
        super().__init__()
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.hidden = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.GELU()
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled):
        hidden = self.activation(self.hidden(self.dropout(pooled)))
        return self.out_proj(self.dropout(hidden))


class EsmLocPreTrainedModel(EsmPreTrainedModel):
    config_class = EsmLocConfig
    config: EsmLocConfig
    # Trainer would otherwise pass `num_items_in_batch` and scale the logged loss by the number of processes.
    accepts_loss_kwargs = False

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        # transformers maps ESM's LayerNorm.weight/.bias back to the legacy LayerNorm.gamma/.beta names when saving
        # "in the original format". from_pretrained renames them again, but Trainer restores checkpoints (resuming,
        # load_best_model_at_end) with a plain load_state_dict, which then silently skips every encoder LayerNorm.
        # Saving the module's own names makes every tensor round-trip on both paths.
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)


class EsmForLocalization(EsmLocPreTrainedModel):
    """
    ESM-2 or ESM C with a localisation head: the encoder (`self.esm`: an `EsmModel`, or an `EsmcModel` for an ESM C
    `config.esm_config`) gives last hidden states that are pooled per protein (`config.pooling`) and classified. Single-label problems (the default binary Mitochondrion / Other) use cross-entropy,
    `problem_type="multi_label_classification"` (e.g. DeepLoc's 10 locations) uses BCE, both weighted by
    `config.class_weights` when set.

    Inputs must be tokenized as `EsmLocTokenizer` does (`<cls>` residues `<eos>`). With `config.long_proteins="crop"`
    they hold at most `config.max_residues` residues (the tokenizer crops) and longer inputs are refused rather than
    silently run outside what ESM-2 was trained on; with `"windows"` a batch with a longer protein runs window by
    window (`windowed_states`) and is pooled and classified whole.

    From logits to labels, the rule every esmloc path applies (the pipeline, esmloc-predict, the demo, the model
    card): `probabilities(logits)` (a softmax; a sigmoid per label for multi-label models), then
    `predict_labels(logits)`: a binary model predicts label 1 (e.g. Mitochondrion) when its probability is >=
    `config.decision_thresholds` (tuned on validation by train.py; 0.5 when None), a multi-label model every label at
    or above its own threshold, a multi-class model its most probable label:

    ```python
    batch = tokenizer(proteins, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    model.predict_labels(logits), model.probabilities(logits)
    ```
    """

    def __init__(self, config: EsmLocConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        if backbone_family(config.esm_config) == "esmc":
            self.esm = EsmcModel(config.esm_config)
        else:
            self.esm = EsmModel(config.esm_config, add_pooling_layer=False)
            # Unused by this task; frozen so that DDP does not wait for gradients that never come.
            self.esm.contact_head.requires_grad_(False)
        self.pooler = EsmLocPooler(config)
        self.classifier = EsmLocClassificationHead(config)
        self.post_init()

    @classmethod
    def from_esm(cls, esm_name_or_path, **config_kwargs):
        """Builds the model around the weights of a stock ESM-2 or ESM C checkpoint (`EsmModel`/`EsmForMaskedLM` or
        `EsmcModel`/`EsmcForMaskedLM` layout, a hub id or a local directory; the family is its config's
        `model_type`); the head starts from random weights. `config_kwargs` go to `EsmLocConfig`. The licence the
        checkpoint's README.md declares is recorded in `config.backbone_license` (the model card states it).
        """
        hub_kwargs = {key: config_kwargs.pop(key) for key in ("revision", "token", "cache_dir") if key in config_kwargs}
        if backbone_family(AutoConfig.from_pretrained(esm_name_or_path, **hub_kwargs)) == "esmc":
            esm = EsmcModel.from_pretrained(esm_name_or_path, **hub_kwargs)
        else:
            esm = EsmModel.from_pretrained(esm_name_or_path, add_pooling_layer=False, **hub_kwargs)
        esm_config = esm.config.to_dict()
        config_kwargs.setdefault("backbone_license", checkpoint_license(esm_name_or_path, **hub_kwargs))
        config = EsmLocConfig(esm_config=esm_config, esm_name_or_path=str(esm_name_or_path), **config_kwargs)
        model = cls(config)
        model.esm.load_state_dict(esm.state_dict())
        return model

    def windowed_states(self, input_ids, attention_mask, **kwargs):
        """The encoder's last hidden states (batch x length x hidden) of a batch holding proteins longer than
        `config.max_residues`: every protein (its attended tokens) is cut into windows (`window_spans`), the windows
        run through the encoder `WINDOWS_PER_PASS` at a time, and each protein's states are stitched back together
        (`stitch_windows`) at its positions; zero at padding."""
        config, windows, spans = self.config, [], []
        for ids, mask in zip(input_ids, attention_mask.bool()):
            tokens = ids[mask]
            spans.append(window_spans(len(tokens) - 2, config.max_residues, config.window_overlap))
            windows += [torch.cat([tokens[:1], tokens[1 + start:1 + end], tokens[-1:]])
                        for start, end, _, _ in spans[-1]]
        states = []
        for first in range(0, len(windows), WINDOWS_PER_PASS):
            chunk = windows[first:first + WINDOWS_PER_PASS]
            ids = nn.utils.rnn.pad_sequence(chunk, batch_first=True, padding_value=config.esm_config.pad_token_id)
            mask = nn.utils.rnn.pad_sequence([torch.ones_like(window) for window in chunk], batch_first=True)
            hidden = self.esm(ids, attention_mask=mask, **kwargs).last_hidden_state
            states += [row[:len(window)] for row, window in zip(hidden, chunk)]
        output = hidden.new_zeros(*input_ids.shape, hidden.shape[-1])
        first = 0
        for row, row_spans in enumerate(spans):
            output[row, attention_mask[row].bool()] = stitch_windows(states[first:first + len(row_spans)], row_spans)
            first += len(row_spans)
        return output

    def get_input_embeddings(self):
        return self.esm.get_input_embeddings()

    def probabilities(self, logits) -> torch.Tensor:
        """Class probabilities (batch x num_labels) from `logits`: a sigmoid per label for multi-label models, a
        softmax otherwise."""
        return label_probabilities(logits, self.config.problem_type == MULTI_LABEL)

    def predict_labels(self, logits) -> list:
        """The predicted label of each protein (a list of labels for a multi-label model, possibly empty) by the
        model's decision rule and `config.decision_thresholds` (see the class docstring)."""
        names, multi_label, thresholds = decision_rule(self.config)
        return predicted_labels(self.probabilities(logits), names, multi_label, thresholds)

    def classify(self, hidden_states, attention_mask, labels=None, output_pooling_weights=False):
        """The head alone: per-token states -> logits (and loss); shared by `forward` and cached-feature training."""
        pooled, weights = self.pooler(hidden_states, attention_mask)
        return self.classify_pooled(pooled, labels, pooling_weights=weights if output_pooling_weights else None)

    def classify_pooled(self, pooled, labels=None, pooling_weights=None):
        """The classifier on pooled protein vectors (batch x hidden) -> logits (and loss): what `classify` does after
        pooling, for features pooled once and cached."""
        logits = self.classifier(pooled)
        loss = self.loss(logits, labels) if labels is not None else None
        return LocalizationOutput(loss=loss, logits=logits, pooling_weights=pooling_weights)

    def loss(self, logits, labels):
        weights = None
        if self.config.class_weights is not None:
            weights = torch.tensor(self.config.class_weights, dtype=logits.dtype, device=logits.device)
        if self.config.problem_type == "multi_label_classification":
            return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=weights)
        if self.config.problem_type == "regression":
            return nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        return nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1), weight=weights)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_pooling_weights: bool = False,
        **kwargs,
    ) -> LocalizationOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, or `(batch_size, num_labels)` floats for multi-label):
            Targets for the loss.
        output_pooling_weights (`bool`, *optional*):
            Return the attention-pooling weight of every token (attention pooling only).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if input_ids.shape[1] > self.config.max_residues + 2:
            if self.config.long_proteins != "windows":
                raise ValueError(
                    f"input of {input_ids.shape[1]} tokens is longer than max_residues={self.config.max_residues} "
                    "(+ <cls> and <eos>); tokenize proteins with EsmLocTokenizer, which crops them (or use a model "
                    "with long_proteins='windows', which embeds long proteins in windows)"
                )
            if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
                raise ValueError("output_attentions and output_hidden_states are per window for proteins longer than "
                                 f"max_residues={self.config.max_residues}, which run in windows: not returned")
            hidden = self.windowed_states(input_ids, attention_mask, **kwargs)
            return self.classify(hidden, attention_mask, labels, output_pooling_weights)
        outputs = self.esm(input_ids, attention_mask=attention_mask, **kwargs)
        output = self.classify(outputs.last_hidden_state, attention_mask, labels, output_pooling_weights)
        output.hidden_states = outputs.hidden_states
        output.attentions = outputs.attentions
        return output


class EsmLocClassificationPipeline(TextClassificationPipeline):
    """
    What `pipeline("text-classification", model=DIR, trust_remote_code=True)` gives for an esmloc model (every saved
    config names it in `custom_pipelines`): proteins in (checked and normalised by `EsmLocTokenizer`; what is not a
    protein raises `ValueError`), the model's decision out, by `EsmForLocalization.predict_labels`' rule and
    `config.decision_thresholds`, with the probabilities esmloc-predict writes.

    - Called without `top_k`: a binary or multi-class model gives `{"label", "score"}` per protein, the predicted
      label and its probability (`[{...}]` for one protein, as the stock pipeline); a multi-label model gives the
      list of its predicted labels (model order, possibly empty), each with its probability.
    - With `top_k` (`None` for all): every label's probability, highest first, as the stock pipeline; these are
      scores, not the decision.
    """

    def check_model_type(self, supported_models):
        if getattr(self.model.config, "model_type", None) != "esmloc":
            super().check_model_type(supported_models)

    def _sanitize_parameters(self, function_to_apply=None, top_k="", **tokenizer_kwargs):
        if function_to_apply is not None:
            raise ValueError("an esmloc model's scores are its own probabilities (EsmForLocalization.probabilities): "
                             "the pipeline takes no function_to_apply")
        return super()._sanitize_parameters(top_k=top_k, **tokenizer_kwargs)

    def __call__(self, inputs, **kwargs):
        result = super().__call__(inputs, **kwargs)
        if isinstance(inputs, str) and "top_k" not in kwargs and self.model.config.problem_type == MULTI_LABEL:
            return result[0]  # one protein's predicted labels are a list already, as with top_k
        return result

    def postprocess(self, model_outputs, top_k=1, _legacy=True):
        names, multi_label, thresholds = decision_rule(self.model.config)
        probabilities = label_probabilities(model_outputs["logits"], multi_label)
        scores = dict(zip(names, probabilities[0].tolist()))
        if not _legacy:  # top_k given
            ranked = sorted(({"label": name, "score": score} for name, score in scores.items()),
                            key=lambda item: item["score"], reverse=True)
            return ranked if top_k is None else ranked[:top_k]
        predicted = predicted_labels(probabilities, names, multi_label, thresholds)[0]
        if multi_label:
            return [{"label": name, "score": scores[name]} for name in predicted]
        return {"label": predicted, "score": scores[predicted]}


EsmForLocalization.register_for_auto_class("AutoModel")


__all__ = ["EsmForLocalization", "EsmLocClassificationPipeline", "EsmLocPreTrainedModel", "LocalizationOutput",
           "label_probabilities", "predicted_labels", "stitch_windows"]
