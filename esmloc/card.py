"""The model card of a trained model, rendered from the run's own files.

`write_model_card` renders the template `model_card.md` (the repository's root file; the package ships it as
`esmloc/model_card.md`) into the output directory's `README.md` from the run's own files (config.json,
run_info.json, *_results.json, trainer_state.json), so every number in a card is a number the run wrote; what they
lack is left out, never made up. `esmloc.publish` sends the card with the model.

Reading the run is esmloc.run_files (`RunRecord`), the metric tables and model-index entries esmloc.card_metrics.
"""

from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub import constants as hub_constants

from configuration_esmloc import FAMILY_NAMES, window_overlap_for
from esmloc import card_metrics, task
from esmloc.run_files import ADAPTER_DIR, ADAPTER_FILES, RunRecord, as_hub_model_id, fmt, is_number


TEMPLATE_NAME = "model_card.md"
CARD_FILE = "README.md"
# In every card the template renders (an HTML comment, invisible on the Hub): how a push recognises an esmloc card.
# The text names the function's place before esmloc.card existed; kept, so that cards rendered then are recognised.
CARD_MARKER = "rendered by esmloc.publish.render_model_card"
CARD_KINDS = ("merged", "adapter")
# The card's own licence (the trained model's) unless told: for an ESM-2 backbone (MIT) esmloc's apache-2.0; for an
# ESM C one the backbone checkpoint's declared licence (its sizes differ: open or non-commercial), else "other", since
# a model derived from it is bound by terms esmloc cannot know (`card_license`).
DEFAULT_LICENSE = "apache-2.0"
TAGS = ["protein", "esm", "esm2", "biology", "subcellular-localization", "mitochondrion"]
# Per backbone family (configuration_esmloc.backbone_family): how the card names it, its tag in place of "esm2".
UNKNOWN_LICENSE = "unknown, see the checkpoint"
PLOT_TITLES = {
    "roc_curve.png": "ROC curve (test)",
    "pr_curve.png": "Precision-recall curve (test)",
    "confusion_matrix.png": "Confusion matrices (test)",
    "mcc_per_location.png": "MCC per location (test)",
}

HUB_URL = "https://huggingface.co"


class PublishError(RuntimeError):
    """A card or a push (or the preparation of one) failed; the message says why and what to check. Never holds a
    token."""


def _display_path(path) -> str | None:
    """A data file as the card names it: its file name only (absolute paths would leak a user's directories)."""
    return None if not path else Path(str(path)).name


def template_path() -> Path:
    """The model card template shipped with the package (`esmloc/model_card.md`, the root `model_card.md`)."""
    return Path(str(resources.files("esmloc").joinpath(TEMPLATE_NAME)))


# --- the card ------------------------------------------------------------------------------------------------------


def _plots(run: RunRecord) -> list[tuple[str, str]]:
    present = sorted(path.name for path in run.dir.glob("*.png") if path.is_file())
    known = [name for name in PLOT_TITLES if name in present]
    return [(PLOT_TITLES.get(name, Path(name).stem.replace("_", " ")), name)
            for name in known + [name for name in present if name not in known]]


def card_license(run: RunRecord, license: str | None = None) -> dict:
    """The card's licence metadata (`license`, and `license_name`/`license_link` where known): `license` when given;
    for an ESM C backbone the licence its checkpoint declared (`RunRecord.backbone_license`), else `other`; for ESM-2
    and for random weights (no checkpoint, no terms) `DEFAULT_LICENSE`."""
    if license:
        return {"license": license}
    random_weights = bool(run.base_model and run.base_model.startswith("random:"))
    if run.backbone_family == "esmc" and not random_weights:
        return dict(run.backbone_license or {"license": "other"})
    return {"license": DEFAULT_LICENSE}


def _backbone_text(run: RunRecord) -> str:
    """The card's "Backbone" cell: the family, and the licence its checkpoint declared, never guessed."""
    name = FAMILY_NAMES[run.backbone_family]
    if run.base_model and run.base_model.startswith("random:"):
        return f"{name} (random weights: no checkpoint licence applies)"
    declared = run.backbone_license
    if not declared:
        return f"{name}; licence: {UNKNOWN_LICENSE}"
    terms = declared.get("license_name") or declared.get("license")
    if declared.get("license_link"):
        terms = f"[{terms}]({declared['license_link']})"
    return (f"{name}; licence: {terms} (as the checkpoint's own metadata declares it; this model is derived from "
            "its weights and comes under those terms)")


def _base_model_text(run: RunRecord, base_id: str | None) -> tuple[str, bool]:
    """(how the card names the base model, whether its weights can be loaded by that name)."""
    base = run.base_model
    name = FAMILY_NAMES[run.backbone_family]
    if base_id:
        return f"[`{base_id}`]({HUB_URL}/{base_id})", True
    if base and base.startswith("random:"):
        return f"none: an {name} `{base[len('random:'):]}` architecture with random initial weights", False
    if base:  # a local folder: only its name (a path would show the publisher's directories)
        return (f"`{Path(base).name}`, a local {name} checkpoint (esmloc-push --base_model names its hub id)",
                Path(base).expanduser().is_dir())
    return "not recorded", False


def _head_text(run: RunRecord) -> str:
    parts = [f"{run.config.get('pooling', 'mean')} pooling"]
    esm = run.config.get("esm_config") or {}
    if esm.get("num_hidden_layers") and esm.get("hidden_size"):
        parts.append(f"over the {esm['num_hidden_layers']}-layer, {esm['hidden_size']}-dimensional "
                     f"{FAMILY_NAMES[run.backbone_family]} encoder")
    if is_number(run.config.get("classifier_dropout")):
        parts.append(f"dropout {fmt(run.config['classifier_dropout'], 'g')}")
    return ", ".join(parts)


def _crop_text(crop: str | None) -> str:
    return {"middle": "middle cropping: the N- and C-terminal halves are kept, as in DeepLoc 2.0",
            "n_terminal": "the N-terminal residues are kept, where mitochondrial targeting peptides sit"}.get(
        crop, f"crop strategy {crop!r}")


def _long_proteins_texts(config: dict) -> tuple[str, str, str]:
    """(the summary table's cell, the limitation's heading, the limitation after the template's sentence on ESM-2's
    training length) for the model's long-protein rule: cropped, or whole in windows."""
    max_residues = config.get("max_residues", "(not recorded)")
    if config.get("long_proteins") == "windows":
        overlap = window_overlap_for(max_residues, config.get("window_overlap"))
        return (f"embedded whole, in windows of {max_residues} residues overlapping by at least {overlap} (each "
                "residue's state from the window it is most central in), on every path", "Long proteins.",
                f"This model sees every residue of a longer protein, each through a window of {max_residues} residues: "
                "it never relates residues that no window holds together (for instance signals at the two ends of a "
                "long protein).")
    return (f"cropped to {max_residues} residues ({_crop_text(config.get('crop'))}) by the tokenizer, on every path",
            "Cropping.",
            f"This model sees at most {max_residues} residues of a protein ({_crop_text(config.get('crop'))}); signals "
            "in the removed part (for instance an internal targeting signal) are invisible to it.")


def _training_rows(run: RunRecord) -> list[tuple[str, str]]:
    rows = []
    finetune = run.finetune
    descriptions = {"frozen": "frozen backbone, only the head trained", "lora": "LoRA adapters + head",
                    "full": "full fine-tuning (backbone and head)"}
    if finetune:
        rows.append(("Fine-tuning mode", f"`{finetune}` ({descriptions.get(finetune, finetune)})"))
    if is_number(run.model.get("trainable_parameters")) and is_number(run.model.get("total_parameters")):
        counts = f"{fmt(run.model['trainable_parameters'])} of {fmt(run.model['total_parameters'])}"
        rows.append(("Trainable parameters", counts))
    if is_number(run.training.get("num_train_epochs")):
        trained = run.train.get("epoch")
        text = fmt(run.training["num_train_epochs"], "g")
        if is_number(trained) and trained != run.training["num_train_epochs"]:
            text += f" requested, {fmt(trained, '.3g')} trained"
        rows.append(("Epochs", text))
    elif is_number(run.train.get("epoch")):
        rows.append(("Epochs", fmt(run.train["epoch"], "g")))
    for key, name, spec in (("learning_rate", "Learning rate", "g"), ("per_device_train_batch_size",
                            "Batch size per device", "g"), ("world_size", "Processes", "g"), ("seed", "Seed", "g")):
        if is_number(run.training.get(key)):
            rows.append((name, fmt(run.training[key], spec)))
    if isinstance(run.model.get("class_weights"), bool) or run.config.get("class_weights") is not None:
        weights = run.config.get("class_weights")
        name = "Loss weights (BCE pos_weight per location)" if run.multi_label else "Class-weighted loss"
        rows.append((name, "yes: " + ", ".join(
            f"{label} {fmt(weight)}" for label, weight in zip(run.labels, weights)) if weights else "no"))
    if is_number(run.train.get("train_loss")):
        rows.append(("Final training loss", fmt(run.train["train_loss"])))
    if is_number(run.train.get("train_runtime")):
        rows.append(("Training loop runtime (train_runtime)", f"{fmt(run.train['train_runtime'], '.1f')} s"))
    best = run.training.get("metric_for_best_model")
    if best and is_number(run.state.get("best_metric")):
        step = run.state.get("best_global_step")
        rows.append(("Model kept", f"the checkpoint with the best validation `{best}`: {fmt(run.state['best_metric'])}"
                                   + (f" (step {fmt(step, 'g')})" if is_number(step) else "")))
    return rows


def _lora_rows(run: RunRecord) -> list[tuple[str, str]]:
    if run.finetune != "lora":
        return []
    source = run.adapter_config or {}
    rows = []
    for key, adapter_key, name in (("lora_r", "r", "Rank r"), ("lora_alpha", "lora_alpha", "Alpha"),
                                   ("lora_dropout", "lora_dropout", "Dropout")):
        value = run.model.get(key, source.get(adapter_key))
        if is_number(value):
            rows.append((name, fmt(value, "g")))
    targets = run.model.get("lora_target_modules") or source.get("target_modules")
    if targets:
        rows.append(("Target modules", ", ".join(f"`{t}`" for t in targets)))
    saved = source.get("modules_to_save")
    if saved:
        rows.append(("Trained in full and saved with the adapter", ", ".join(f"`{m}`" for m in saved)))
    return rows


def _split_text(run: RunRecord) -> str | None:
    method = run.split_method
    if method == "stratified":
        return "stratified random split of one file (seeded; identical sequences kept in one split)"
    if method == "partition":
        parts = []
        for key, name in (("validation_partitions", "validation"), ("test_partitions", "test")):
            if run.data.get(key) is not None:
                parts.append(f"{name} partitions {', '.join(str(p) for p in run.data[key])}")
        detail = f" ({'; '.join(parts)})" if parts else ""
        return f"by the homology partitions of the data's `Partition` column{detail}"
    if method == "given":
        return "three given files (train, validation, test)"
    if method == "dataset":
        return "the dataset's own train, validation and test splits, as published"
    return method


def _data_rows(run: RunRecord) -> list[tuple[str, str]]:
    if not run.data:
        return []
    rows = []
    files = [(name, _display_path(run.data.get(key))) for key, name in (("train_file", "train"),
             ("validation_file", "validation"), ("test_file", "test"))]
    files = [(name, file) for name, file in files if file]
    if run.data.get("dataset_name"):
        rows.append(("Dataset", f"`{run.data['dataset_name']}`"))
    if files:
        rows.append(("Data files", ", ".join(f"`{file}` ({name})" for name, file in files)))
    elif run.data.get("dataset_config") == "deeploc":
        rows.append(("Data", "the DeepLoc 2.0 SwissProt training set (public download)"))
    if run.data.get("dataset_config"):
        rows.append(("Task (dataset config)", f"`{run.data['dataset_config']}`"))
    if run.split_method:
        rows.append(("Split", _split_text(run)))
    sizes = run.data.get("split_sizes") or {}
    if sizes:
        rows.append(("Proteins per split", ", ".join(f"{name} {fmt(size, 'g')}" for name, size in sizes.items())))
    for key, name in (("max_train_samples", "train"), ("max_eval_samples", "validation"),
                      ("max_test_samples", "test")):
        if is_number(run.data.get(key)):
            rows.append((f"Truncated {name} split", f"to at most {fmt(run.data[key], 'g')} proteins"))
    return rows


def _exact(value) -> str:
    """A threshold as the paths apply it: every digit (a rounded one would decide some proteins differently)."""
    return f"`{float(value)!r}`"


def _decision_rule(run: RunRecord) -> tuple[str, bool]:
    """The rule every path applies to this model's probabilities (`modeling_esmloc.predicted_labels` with the
    config's `decision_thresholds`), in words, with the exact thresholds; and whether every path does apply it (not
    so for a model saved before config.json held its thresholds: its pipeline uses 0.5, esmloc-predict the tuned ones
    of test_results.json)."""
    labels, multi_label, thresholds = run.labels, run.multi_label, run.config.get("decision_thresholds")
    if not multi_label and len(labels) != 2:
        return "The most probable label is predicted.", True
    if thresholds is None:
        rule = ("Every location whose probability is at least 0.5 is predicted (possibly none)." if multi_label else
                f"`{labels[1]}` is predicted when its probability is at least 0.5, else `{labels[0]}`.")
        if task.saved_with_thresholds(run.config):
            return rule, True
        tuned = [run.test.get(key) for key in task.tuned_threshold_keys(labels, multi_label)]
        if all(is_number(value) for value in tuned):
            rule = ("This model was saved before esmloc stored decision thresholds in `config.json`: esmloc-predict "
                    "and the demo apply the threshold(s) tuned on validation (`test_results.json`), "
                    + ", ".join(f"`{label}` ≥ {_exact(value)}" for label, value in zip(labels[-len(tuned):], tuned))
                    + "; its own code (the pipeline) does not.")
        return rule, False
    source = ("`decision_thresholds` in `config.json`, which train.py sets to the threshold"
              f"{'s' if multi_label else ''} tuned for MCC on validation")
    if multi_label:
        return ("Every location whose probability is at least its own threshold is predicted (possibly none): "
                + ", ".join(f"`{label}` ≥ {_exact(value)}" for label, value in zip(labels, thresholds))
                + f" ({source})."), True
    return (f"`{labels[1]}` is predicted when its probability is at least {_exact(thresholds)} ({source}), else "
            f"`{labels[0]}`."), True


def _class_weights_text(run: RunRecord) -> str | None:
    weights = run.config.get("class_weights")
    return ", ".join(f"{label} {fmt(w)}" for label, w in zip(run.labels, weights)) if weights else None


def render_model_card(
    output_dir,
    *,
    what: str = "merged",
    repo_id: str | None = None,
    endpoint: str | None = None,
    license: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    space_id: str | None = None,
) -> ModelCard:
    """The model card of a run's output directory, rendered from the template `model_card.md`.

    Every number comes from the run's files (test_results.json, run_info.json, train_results.json or
    all_results.json, trainer_state.json, config.json); what they lack is left out, never made up. Plots are
    referenced only when their PNG exists. `what="adapter"` renders the card of the LoRA adapter (library `peft`,
    loading code that names the base model). `repo_id` (and `endpoint`, for the clone URL) make the loading code use
    the repository; without them it uses the folder's name. `base_model` and `datasets` set the metadata the run
    cannot know (hub ids); by default `base_model` is the run's backbone checkpoint when that is a hub id. `license`:
    the card's licence; by default per `card_license` (for ESM C, the backbone checkpoint's declared licence).
    """
    if what not in CARD_KINDS:
        raise ValueError(f"what must be one of {CARD_KINDS}, got {what!r}")
    output_dir = Path(output_dir)
    run = RunRecord(output_dir)
    if not run.config:
        raise PublishError(f"{output_dir} holds no config.json: not a saved esmloc model")
    if base_model is not None and as_hub_model_id(base_model) is None:
        raise ValueError(f"base_model must be a hub model id such as facebook/esm2_t6_8M_UR50D, got {base_model!r}")
    base_id = base_model or as_hub_model_id(run.base_model)
    base_text, base_loadable = _base_model_text(run, base_id)
    is_adapter = what == "adapter"
    multi_label = run.multi_label
    labels = run.labels
    name = repo_id.split("/")[-1] if repo_id else output_dir.resolve().name
    backbone = FAMILY_NAMES[run.backbone_family]

    if multi_label:
        task_name = "Protein subcellular localisation (multi-label)"
        title = f"{name}: protein subcellular localisation with {backbone}"
        summary = (f"Predicts where in the cell a protein lives from its amino-acid sequence alone: one independent "
                   f"probability for each location ({', '.join(labels)}). An {backbone} protein "
                   "language model encodes the sequence; a pooling layer and a classifier turn it into the scores.")
        output_description = "one sigmoid probability per location: " + ", ".join(f"`{label}`" for label in labels)
    else:
        positive = labels[-1]
        task_name = f"Protein subcellular localisation ({positive} vs {', '.join(labels[:-1])})"
        title = f"{name}: is this protein in the {positive.lower()}?"
        summary = (f"Predicts from its amino-acid sequence alone whether a protein is located in the "
                   f"**{positive.lower()}** (`{positive}`) or not (`{labels[0]}`). An {backbone} protein language model "
                   "encodes the sequence; a pooling layer and a classifier turn it into the probability.")
        output_description = f"probabilities of {' and '.join(f'`{label}`' for label in labels)} (softmax)"

    finetune = run.finetune
    targets = run.model.get("lora_target_modules") or run.adapter_config.get("target_modules") or []
    finetune_text = {"frozen": f"frozen {backbone} backbone, trained head",
                     "lora": "LoRA adapters" + (f" on {', '.join(f'`{t}`' for t in targets)}" if targets else "")
                             + ", trained head",
                     "full": "the whole model (backbone and head)"}.get(finetune, "not recorded")
    # A hub dataset train.py --dataset_name read (a local folder is recorded by its name only, no hub id).
    datasets = datasets or ([run.data["dataset_name"]] if as_hub_model_id(run.data.get("dataset_name")) else None)
    train_file = _display_path(run.data.get("train_file"))
    source = run.data.get("dataset_name") or train_file or (
        "DeepLoc 2.0" if run.data.get("dataset_config") == "deeploc" else "esmloc data")
    dataset_name = f"{source} (test split" + (f", {run.split_method} split)" if run.split_method else ")")
    results = card_metrics.eval_results(run, task_name, dataset_name, (datasets or ["esmloc"])[0]) if run.test else None

    card_data = ModelCardData(
        library_name="peft" if is_adapter else "transformers",
        pipeline_tag="text-classification",
        tags=[tag if tag != "esm2" else run.backbone_family for tag in TAGS] + (["lora", "peft"] if finetune == "lora" else []) + (["multi-label"] if multi_label else []),
        base_model=base_id,
        datasets=list(datasets) if datasets else None,
        **card_license(run, license),
        model_name=name if results else None,
        eval_results=results or None,
    )
    evaluation_header, evaluation_rows, location_header, location_rows = card_metrics.evaluation_table(run)
    epoch_header, epoch_rows = card_metrics.epoch_log(run)
    decision_rule, same_rule_everywhere = _decision_rule(run)
    load_ref = repo_id or name
    hub_url = (endpoint or hub_constants.ENDPOINT).rstrip("/")
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        title=title,
        summary=summary,
        is_adapter=is_adapter,
        multi_label=multi_label,
        output_description=output_description,
        base_model=base_id or (Path(run.base_model).name if run.base_model else None),
        base_model_id=base_id,
        base_model_text=base_text,
        backbone_name=backbone,
        backbone_text=_backbone_text(run),
        base_loadable=base_loadable,
        base_random=bool(run.base_model and run.base_model.startswith("random:")),
        adapter_saves=", ".join(f"`{m}`" for m in run.adapter_config.get("modules_to_save") or []),
        finetune_text=finetune_text,
        head_text=_head_text(run),
        **dict(zip(("long_proteins_text", "long_proteins_heading", "long_proteins_limitation"),
                   _long_proteins_texts(run.config))),
        load_ref=load_ref,
        clone_url=f"{hub_url}/{repo_id}" if repo_id else f"{hub_url}/<user>/{name}",
        clone_dir=name,
        space_url=f"{hub_url}/spaces/{space_id}" if space_id else None,
        positive_label=labels[-1],
        negative_label=labels[0],
        decision_rule=decision_rule,
        same_rule_everywhere=same_rule_everywhere,
        training_rows=_training_rows(run),
        lora_rows=_lora_rows(run),
        data_rows=_data_rows(run),
        epoch_header=epoch_header,
        epoch_rows=epoch_rows,
        evaluation_header=evaluation_header,
        evaluation_rows=evaluation_rows if run.test else [],
        location_header=location_header,
        location_rows=location_rows,
        plots=_plots(run),
        split_method=run.split_method,
        class_weights=_class_weights_text(run),
    )


def write_model_card(output_dir, **card_options) -> Path:
    """Writes the card into `output_dir/README.md` (and `adapter/README.md` for a LoRA run, replacing PEFT's blank
    template); returns the README path. Called by train.py at the end of every run, before any push."""
    output_dir = Path(output_dir)
    path = output_dir / CARD_FILE
    render_model_card(output_dir, **card_options).save(path)
    if (output_dir / ADAPTER_DIR / ADAPTER_FILES[0]).is_file():
        render_model_card(output_dir, what="adapter", **card_options).save(output_dir / ADAPTER_DIR / CARD_FILE)
    return path
