"""The model a training run fine-tunes, and how: where its backbone comes from, what is trained (`FINETUNE_MODES`),
and what the run saves at the end.

- `build_model`: from a stock ESM-2 or ESM C checkpoint (hub id or directory), an esmloc model directory (training
  goes on from it), or random weights of a named architecture (`configuration_esmloc.ARCHITECTURES`).
- `prepare_finetuning`: `frozen` trains the head only (the backbone never changes, so its features can be cached:
  `uses_feature_cache`), `lora` PEFT LoRA adapters on the backbone's linear layers (`LORA_TARGET_MODULES`, per
  family) plus the head, `full` everything.
- `trained_model`: the model to save once the Trainer is done (for LoRA: merged, its adapter kept beside).
"""

import warnings
from pathlib import Path

from configuration_esmloc import ARCHITECTURES, EsmLocConfig, backbone_family
from esmloc import loading
from esmloc.errors import InputError
from esmloc.run_files import ADAPTER_DIR
from modeling_esmloc import EsmForLocalization


FINETUNE_MODES = ("frozen", "lora", "full")
# Learning rates that work for each mode when --learning_rate is not given: a head alone tolerates a large
# step, LoRA adapters a medium one, the whole backbone only a small one.
DEFAULT_LEARNING_RATES = {"frozen": 1e-3, "lora": 5e-4, "full": 5e-5}
# Modules trained in full (and saved with a LoRA adapter) whatever the mode: the head.
HEAD_MODULES = ["pooler", "classifier"]
# LoRA's default targets per backbone family (--lora_target_modules overrides them): every linear layer of each
# transformer block. ESM-2: the attention's query/key/value and the three `dense` layers (attention output,
# intermediate, output); ESM C (transformers' EsmcAttention and EsmcMLP): q/k/v/o_proj and the SwiGLU projections.
LORA_TARGET_MODULES = {
    "esm2": ["query", "key", "value", "dense"],
    "esmc": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def build_model(model_args, label_config: dict) -> EsmForLocalization:
    """The model to train (`model_args`: train.py's ModelArguments): from a stock ESM-2 or ESM C checkpoint, an esmloc
    model directory, or random weights; its head as the arguments and `label_config` (id2label, problem_type, class
    weights) say."""
    head_config = dict(
        pooling=model_args.pooling,
        classifier_dropout=model_args.classifier_dropout,
        max_residues=model_args.max_residues,
        crop=model_args.crop,
        long_proteins=model_args.long_proteins,
        window_overlap=model_args.window_overlap,
        attn_implementation=model_args.attn_implementation,
        **label_config,
    )
    if model_args.from_scratch:
        esm_config = dict(ARCHITECTURES[model_args.from_scratch])
        return EsmForLocalization(EsmLocConfig(esm_config=esm_config,
                                               esm_name_or_path=f"random:{model_args.from_scratch}", **head_config))
    source = loading.local_or_hub(model_args.model_name_or_path, "--model_name_or_path")
    if isinstance(source, Path) and loading.model_kind(source) == "esmloc":  # an esmloc model: continue from it
        return EsmForLocalization.from_pretrained(source, **head_config)
    return loading.from_hub(lambda name: EsmForLocalization.from_esm(name, **head_config), str(source))


def prepare_finetuning(model: EsmForLocalization, model_args):
    """Freezes or wraps the model per --finetune; returns the model the Trainer trains. For LoRA without
    --lora_target_modules, the backbone family's `LORA_TARGET_MODULES` (written back to `model_args`, so that the run
    record and the card name them)."""
    if model_args.finetune == "frozen":
        model.esm.requires_grad_(False)
        return model
    if model_args.finetune == "full":
        return model
    from peft import LoraConfig, get_peft_model

    if not model_args.lora_target_modules:
        model_args.lora_target_modules = list(LORA_TARGET_MODULES[backbone_family(model.config)])
    names = {name.rsplit(".", 1)[-1] for name, _ in model.esm.named_modules()}
    missing = [target for target in model_args.lora_target_modules if target not in names]
    if missing:
        raise InputError(f"--lora_target_modules {' '.join(missing)}: no such module in this "
                         f"{backbone_family(model.config)} backbone (its defaults: "
                         f"{' '.join(LORA_TARGET_MODULES[backbone_family(model.config)])})")
    lora_config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        modules_to_save=HEAD_MODULES,
    )
    with warnings.catch_warnings():
        # peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` alias: a warning for peft, not users.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora_config)


def uses_feature_cache(model_args) -> bool:
    """Whether the run trains the head on cached backbone features (a frozen backbone, unless --no_feature_cache)."""
    return model_args.finetune == "frozen" and model_args.feature_cache


def trained_model(trainer, model, model_args, output_dir: Path):
    """The model to save: what the best checkpoint holds (the Trainer restored it), merged with its adapters for
    LoRA (the adapter itself is kept in output_dir/adapter)."""
    if uses_feature_cache(model_args):
        # The Trainer trained (and restored) the head modules the model shares.
        return model.to(trainer.args.device)
    final_model = trainer.model
    if model_args.finetune == "lora":
        if trainer.is_world_process_zero():
            final_model.save_pretrained(output_dir / ADAPTER_DIR)
        final_model = final_model.merge_and_unload()
    return final_model
