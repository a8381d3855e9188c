"""EsmLoc model configuration: an ESM-2 or ESM C backbone plus a subcellular-localisation head."""

import copy
from pathlib import Path

from transformers import EsmConfig, PreTrainedConfig


try:  # ESM C is native in transformers from 5.25; older releases still load every ESM-2 model
    from transformers import EsmcConfig
except ImportError:
    EsmcConfig = None


POOLING_MODES = ("mean", "cls", "attention")
# How a protein longer than the model's limit is cropped (the rule itself: tokenization_esmloc.crop_sequence), and the
# defaults of the config, the tokenizer and train.py: ESM-2 was trained on at most 1022 residues (+ <cls>, <eos>).
CROP_STRATEGIES = ("middle", "n_terminal")
DEFAULT_MAX_RESIDUES = 1022
DEFAULT_CROP = "middle"
# What happens to a protein longer than max_residues: "crop" (per `crop`) or "windows" (embedded whole, in overlapping
# windows of max_residues residues whose states are combined; the rule itself: tokenization_esmloc.window_spans).
LONG_PROTEIN_RULES = ("crop", "windows")
DEFAULT_LONG_PROTEINS = "crop"

# Local entries only: a model loaded from a hub repo and saved again would otherwise carry
# `user/repo--module.Class` references that reach the network on every later load.
AUTO_MAP = {
    "AutoConfig": "configuration_esmloc.EsmLocConfig",
    "AutoModel": "modeling_esmloc.EsmForLocalization",
    "AutoModelForSequenceClassification": "modeling_esmloc.EsmForLocalization",
}
# The pipeline a saved model brings along (transformers reads `custom_pipelines` from config.json), so that
# `pipeline("text-classification", model=DIR, trust_remote_code=True)` applies `decision_thresholds`. Local too.
CUSTOM_PIPELINES = {
    "text-classification": {
        "impl": "modeling_esmloc.EsmLocClassificationPipeline",
        "pt": ["AutoModelForSequenceClassification"],
        "type": "text",
    },
}

_ESM2_COMMON = {
    "vocab_size": 33,
    "pad_token_id": 1,
    "mask_token_id": 32,
    "position_embedding_type": "rotary",
    "max_position_embeddings": 1026,
    "token_dropout": True,
    "emb_layer_norm_before": False,
    "layer_norm_eps": 1e-5,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}

# The published ESM-2 architectures (Lin et al. 2023), for building a backbone with random weights
# when no checkpoint can be downloaded; "tiny" is for tests and smoke runs.
ESM2_ARCHITECTURES = {
    name: {**_ESM2_COMMON, "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
           "intermediate_size": 4 * hidden}
    for name, (layers, hidden, heads) in {
        "tiny": (2, 32, 4),
        "esm2_t6_8M": (6, 320, 20),
        "esm2_t12_35M": (12, 480, 20),
        "esm2_t30_150M": (30, 640, 20),
        "esm2_t33_650M": (33, 1280, 20),
        "esm2_t36_3B": (36, 2560, 40),
    }.items()
}


# ESM C (ESM Cambrian, EvolutionaryScale 2024), as transformers' EsmcConfig has it: the published sizes, for random
# backbones when no checkpoint can be loaded; "esmc_tiny" is for tests. The SwiGLU width is 8/3 of the hidden size
# rounded up to a multiple of 256, as in the reference code (EsmcConfig's own default: 2560 -> 6912).
ESMC_ARCHITECTURES = {
    name: {"model_type": "esmc", "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
           "intermediate_size": intermediate}
    for name, (layers, hidden, heads, intermediate) in {
        "esmc_tiny": (2, 64, 4, 176),
        "esmc_300m": (30, 960, 15, 2560),
        "esmc_600m": (36, 1152, 18, 3072),
    }.items()
}
# Every named architecture a random backbone can be built from (train.py / esmloc-pretrain --from_scratch).
ARCHITECTURES = {**ESM2_ARCHITECTURES, **ESMC_ARCHITECTURES}
# The backbone families esmloc runs, by their transformers model_type: the one decision every path branches on.
BACKBONE_FAMILIES = {"esm": "esm2", "esmc": "esmc"}
# How each family is named to people (model cards, messages).
FAMILY_NAMES = {"esm2": "ESM-2", "esmc": "ESM C"}


def backbone_family(config) -> str:
    """`"esm2"` or `"esmc"`: the family of a backbone config (an `EsmConfig`/`EsmcConfig`, its dict, or an
    `EsmLocConfig`, whose backbone is asked); ValueError for any other model type."""
    config = getattr(config, "esm_config", config)
    model_type = config.get("model_type", "esm") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in BACKBONE_FAMILIES:
        raise ValueError(f"esmloc runs ESM-2 (model_type 'esm') and ESM C ('esmc') backbones, not model_type "
                         f"{model_type!r}")
    return BACKBONE_FAMILIES[model_type]


def backbone_config(config):
    """The backbone's config object from what `EsmLocConfig(esm_config=...)` accepts: a config (returned as it is), a
    dict (an `EsmConfig` unless its `model_type` is `"esmc"`) or the name of an `ARCHITECTURES` entry."""
    if isinstance(config, str):
        if config not in ARCHITECTURES:
            raise ValueError(f"unknown backbone architecture {config!r}; one of {', '.join(ARCHITECTURES)}")
        config = dict(ARCHITECTURES[config])
    if not isinstance(config, dict):
        backbone_family(config)
        return config
    config = dict(config)
    if backbone_family(config) == "esmc":
        if EsmcConfig is None:
            import transformers

            raise ImportError(f"an ESM C backbone needs transformers >= 5.25 (EsmcConfig); this is "
                              f"{transformers.__version__}")
        config.pop("model_type", None)
        return EsmcConfig(**config)
    config.pop("model_type", None)
    return EsmConfig(**config)


# The licence fields of a hub model card's YAML metadata, as a checkpoint's README.md may carry them.
LICENSE_FIELDS = ("license", "license_name", "license_link")


def checkpoint_license(name_or_path, **hub_kwargs) -> dict | None:
    """The licence a backbone checkpoint declares in its own README.md metadata (`LICENSE_FIELDS` present there), for
    a local directory or a hub id (its README fetched like the weights, honouring HF_ENDPOINT and offline mode); None
    when it declares none or cannot be read. Never guessed from the name: ESM C's sizes come under different licences.
    """
    from huggingface_hub import hf_hub_download, metadata_load

    readme = Path(name_or_path) / "README.md"
    try:
        if not readme.is_file():
            if Path(name_or_path).is_dir():
                return None
            readme = hf_hub_download(str(name_or_path), "README.md", **hub_kwargs)
        metadata = metadata_load(readme) or {}
    except Exception:  # noqa: BLE001 (no readable card means: not recorded, and the model card says so)
        return None
    found = {key: str(metadata[key]) for key in LICENSE_FIELDS if metadata.get(key)}
    return found or None


def window_overlap_for(max_residues: int, window_overlap: int | None = None) -> int:
    """The least overlap of neighbouring windows, in residues: `window_overlap`, or by default a quarter of
    `max_residues`; ValueError unless it lies in [0, max_residues)."""
    overlap = max_residues // 4 if window_overlap is None else window_overlap
    if not 0 <= overlap < max_residues:
        raise ValueError(f"window_overlap must lie between 0 and max_residues - 1 = {max_residues - 1}, got {overlap}")
    return overlap


class EsmLocConfig(PreTrainedConfig):
    r"""
    Configuration of an [`EsmForLocalization`] model: an ESM-2 or ESM C encoder whose per-residue states are
    pooled into one vector per protein and classified into subcellular locations.

    Args:
        esm_config (`EsmConfig`, `EsmcConfig` or `dict`, *optional*):
            The backbone's configuration; a dict whose `model_type` is `"esmc"` is an ESM C one, any other an ESM-2
            one (`backbone_config`; `backbone_family` tells them apart). Defaults to the ESM-2 8M architecture
            (`esm2_t6_8M_UR50D`).
        pooling (`str`, *optional*, defaults to `"mean"`):
            How residue states become one protein vector: `"mean"` (average over residues), `"cls"` (the
            `<cls>` token's state) or `"attention"` (a learned softmax weighting over residues, as in
            DeepLoc 2.0 and Light Attention; the weights can be returned for interpretation).
            Padding and the `<cls>`/`<eos>` tokens never enter the mean or the attention.
        classifier_dropout (`float`, *optional*, defaults to 0.1):
            Dropout applied to the pooled vector and to the head's hidden layer.
        max_residues (`int`, *optional*, defaults to 1022):
            The longest protein, in residues, the model sees; ESM-2 was trained on at most 1022 residues
            (+ `<cls>` and `<eos>`). The tokenizer crops longer proteins and the model refuses longer inputs.
        crop (`str`, *optional*, defaults to `"middle"`):
            How a protein longer than `max_residues` is cropped: `"middle"` keeps the N- and C-terminal halves
            and drops the middle (as DeepLoc does); `"n_terminal"` keeps the start, where mitochondrial
            targeting peptides sit. Used when `long_proteins="crop"`.
        long_proteins (`str`, *optional*, defaults to `"crop"`):
            What happens to a protein longer than `max_residues`: `"crop"` (per `crop`: the rest is not seen) or
            `"windows"`: the whole protein is embedded in overlapping windows of `max_residues` residues (the first
            at the N-terminus, the last at the C-terminus, evenly spaced, neighbours overlapping by at least
            `window_overlap` residues: a stride of at most `max_residues - window_overlap`); each residue keeps its
            state from the window in which it lies most central (windows are cut at the middle of each overlap), the
            protein's `<cls>`/`<eos>` states are the mean of its windows' ones, and the whole protein is pooled as
            `pooling` says. Proteins of at most `max_residues` residues are one window: exactly what `"crop"` gives.
            See `tokenization_esmloc.window_spans`.
        window_overlap (`int`, *optional*):
            With `long_proteins="windows"`: the least overlap of neighbouring windows, in residues (0 to
            `max_residues - 1`); default a quarter of `max_residues` (255 for 1022), which gives every residue at
            least an eighth of a window of context on each side.
        class_weights (`list[float]`, *optional*):
            Loss weights, one per label: the cross-entropy `weight` for single-label problems, the BCE
            `pos_weight` for `problem_type="multi_label_classification"`.
        esm_name_or_path (`str`, *optional*):
            The ESM-2 or ESM C checkpoint the backbone weights came from (a hub id or a local path), for the record.
        backbone_license (`dict`, *optional*):
            The licence the backbone checkpoint declares in its own README.md metadata (`license`, and `license_name`
            / `license_link` where given; `checkpoint_license`), recorded by `EsmForLocalization.from_esm`; None when
            the checkpoint declares none (or for random weights). The model card states it.
        decision_thresholds (`float` or `list[float]`, *optional*):
            The decision rule's thresholds (train.py stores the ones tuned for MCC on validation): one number for a
            binary model (label 1 is predicted when its probability is >= it), one per label for a multi-label
            model (every label at or above its own is predicted), None for a multi-class model (the most probable
            label). None means 0.5 for binary and multi-label models. Every path applies it: the pipeline,
            `EsmForLocalization.predict_labels`, esmloc-predict and the demo.

    Labels use the standard `id2label` / `label2id` / `problem_type`; the default is the binary
    `{0: "Other", 1: "Mitochondrion"}`.
    """

    model_type = "esmloc"
    sub_configs_defaults = {"esm_config": EsmConfig}

    esm_config: dict | PreTrainedConfig | None = None
    pooling: str = "mean"
    classifier_dropout: float = 0.1
    max_residues: int = DEFAULT_MAX_RESIDUES
    crop: str = DEFAULT_CROP
    long_proteins: str = DEFAULT_LONG_PROTEINS
    window_overlap: int | None = None
    class_weights: list[float] | None = None
    esm_name_or_path: str | None = None
    backbone_license: dict | None = None
    decision_thresholds: float | list[float] | None = None
    # ESM-2's <pad> and <eos> ids, as the tokenizer has them; declared so that Trainer finds them here and does not
    # "align" the config with a warning at every run.
    pad_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self, **kwargs):
        if self.esm_config is None:
            self.esm_config = dict(ESM2_ARCHITECTURES["esm2_t6_8M"])
        # Before transformers' own sub-config handling (which would make every dict an EsmConfig): the family is the
        # dict's model_type.
        self.esm_config = backbone_config(self.esm_config)
        if self.id2label is None and kwargs.get("num_labels", 2) == 2:
            self.id2label = {0: "Other", 1: "Mitochondrion"}
        if self.id2label is not None and self.label2id is None:
            self.label2id = {label: int(i) for i, label in self.id2label.items()}
        super().__post_init__(**kwargs)
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {self.pooling!r}")
        if self.crop not in CROP_STRATEGIES:
            raise ValueError(f"crop must be one of {CROP_STRATEGIES}, got {self.crop!r}")
        if self.long_proteins not in LONG_PROTEIN_RULES:
            raise ValueError(f"long_proteins must be one of {LONG_PROTEIN_RULES}, got {self.long_proteins!r}")
        if self.max_residues < 1 or self.max_residues + 2 > self.esm_config.max_position_embeddings:
            raise ValueError(
                f"max_residues must be between 1 and {self.esm_config.max_position_embeddings - 2} "
                f"(the backbone's max_position_embeddings minus <cls> and <eos>), got {self.max_residues}"
            )
        window_overlap_for(self.max_residues, self.window_overlap)  # raises for an overlap the windows cannot have
        if self.class_weights is not None and len(self.class_weights) != self.num_labels:
            raise ValueError(f"class_weights has {len(self.class_weights)} entries for {self.num_labels} labels")
        self.check_decision_thresholds()
        self.auto_map = dict(AUTO_MAP)
        self.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)  # transformers edits the entries it reads in place

    def check_decision_thresholds(self):
        """ValueError unless `decision_thresholds` fits the problem: one number for binary, one per label for
        multi-label, None for multi-class; numbers between 0 and 1."""
        thresholds, multi_label = self.decision_thresholds, self.problem_type == "multi_label_classification"
        if thresholds is None:
            return
        if not multi_label and self.num_labels != 2:
            raise ValueError(f"decision_thresholds must be None for a multi-class model (it predicts its most probable "
                             f"label), got {thresholds!r}")
        if multi_label:
            wanted = f"a list of {self.num_labels} numbers between 0 and 1 for a multi-label model, one per label"
        else:
            wanted = "one number between 0 and 1 for a binary model, label 1's threshold"
        listed = isinstance(thresholds, (list, tuple))
        values = thresholds if listed else [thresholds]
        if (listed != multi_label or len(values) != (self.num_labels if multi_label else 1)
                or not all(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
                           for value in values)):
            raise ValueError(f"decision_thresholds must be {wanted}, got {thresholds!r}")

    def validate(self):
        super().validate()
        self.check_decision_thresholds()  # also at save time: train.py sets the tuned thresholds after __init__

    def to_dict(self):
        output = super().to_dict()
        output["auto_map"] = dict(AUTO_MAP)
        output["custom_pipelines"] = copy.deepcopy(CUSTOM_PIPELINES)
        return output

    @property
    def hidden_size(self) -> int:
        return self.esm_config.hidden_size

    @property
    def backbone_family(self) -> str:
        """`"esm2"` or `"esmc"` (`backbone_family`); the tokenizer must have the same (`EsmLocTokenizer.INPUT_SETTINGS`)."""
        return backbone_family(self.esm_config)


EsmLocConfig.register_for_auto_class()


__all__ = ["EsmLocConfig", "CUSTOM_PIPELINES", "ESM2_ARCHITECTURES", "ESMC_ARCHITECTURES", "ARCHITECTURES",
           "BACKBONE_FAMILIES", "backbone_config", "backbone_family", "checkpoint_license", "CROP_STRATEGIES", "DEFAULT_CROP",
           "DEFAULT_MAX_RESIDUES", "LONG_PROTEIN_RULES", "DEFAULT_LONG_PROTEINS", "window_overlap_for"]
