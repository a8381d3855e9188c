"""train.py --gradient_checkpointing: with --finetune lora and full every backbone layer runs its forward again in
the backward pass (what checkpointing trades for memory, with LoRA's frozen embeddings too); --finetune frozen, whose
head trains on cached features, runs and says it has nothing to checkpoint."""

import json

import pytest
from transformers.models.esm.modeling_esm import EsmIntermediate

from configuration_esmloc import ESM2_ARCHITECTURES
from esmloc.demo import write_demo_csv
from esmloc.commands.train import main as train_main


QUICK = ["--from_scratch", "tiny", "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
         "--max_residues", "100", "--num_examples_to_show", "0", "--disable_tqdm", "true", "--no_feature_cache"]


@pytest.fixture(scope="module")
def proteins_csv(tmp_path_factory):
    return write_demo_csv(tmp_path_factory.mktemp("data") / "proteins.csv", n_rows=80, seed=3)


def layer_forwards(monkeypatch, argv) -> tuple[int, int]:
    """(forwards of the backbone's feed-forward blocks in training mode, training steps) of one train.py run in this
    process (evaluation runs in eval mode, and the engine's parity check once per process)."""
    calls = []
    original = EsmIntermediate.forward
    monkeypatch.setattr(EsmIntermediate, "forward",
                        lambda self, hidden: calls.append(self.training) or original(self, hidden))
    assert train_main([str(arg) for arg in argv]) == 0
    monkeypatch.undo()
    output_dir = argv[argv.index("--output_dir") + 1]
    return sum(calls), json.loads((output_dir / "trainer_state.json").read_text())["global_step"]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gradient_checkpointing_recomputes_every_layer(mode, proteins_csv, tmp_path, monkeypatch):
    common = ["--train_file", proteins_csv, "--finetune", mode, *QUICK]
    plain, steps = layer_forwards(monkeypatch, [*common, "--output_dir", tmp_path / "plain"])
    checkpointed, same_steps = layer_forwards(monkeypatch, [*common, "--output_dir", tmp_path / "checkpointed",
                                                            "--gradient_checkpointing"])
    layers = ESM2_ARCHITECTURES["tiny"]["num_hidden_layers"]
    assert steps == same_steps > 0
    assert checkpointed - plain == layers * steps  # one more forward per layer and training step
    # Same seed, same data: the checkpointed run trains the same model (the recomputation is exact in fp32).
    predictions = [(tmp_path / run / "test_predictions.csv").read_text() for run in ("plain", "checkpointed")]
    assert predictions[0] == predictions[1]


def test_frozen_cached_features_have_nothing_to_checkpoint(proteins_csv, tmp_path, capsys):
    argv = ["--train_file", proteins_csv, "--finetune", "frozen", "--output_dir", tmp_path / "frozen",
            *[arg for arg in QUICK if arg != "--no_feature_cache"], "--gradient_checkpointing",
            "--feature_cache_dir", tmp_path / "cache"]
    assert train_main([str(arg) for arg in argv]) == 0  # the Trainer once called the head's missing method
    assert "--gradient_checkpointing: nothing to checkpoint" in capsys.readouterr().err
    assert (tmp_path / "frozen" / "model.safetensors").is_file()
