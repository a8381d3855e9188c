"""esmloc on a CUDA GPU (issue 25): the padding-free engine against the CPU fp32 reference at fp32, bf16 and fp16 with
every attention that runs there; results that do not depend on batch-mates; train.py on CUDA (frozen, LoRA, full)
leaving models whose CPU and GPU predictions agree; esmloc-predict and esmloc-embed on CUDA against CPU; GPU memory
that stays flat over a proteome-sized predict.

Marked `cuda` and skipped without a GPU ("no GPU"): bench/gpu_check.py runs them on the GPU machine
(`pytest -m cuda tests/test_cuda.py`). Each comparison prints its largest error (`-rA` shows them), so that the
tolerances below can be tightened from what the GPU measured.
"""

import copy
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from configuration_esmloc import ESM2_ARCHITECTURES, EsmLocConfig
from esmloc import loading, varlen_attention
from esmloc.demo import write_demo_csv
from esmloc.engine import Engine
from esmloc.saving import save_model, tokenizer_for
from modeling_esmloc import EsmForLocalization

from conftest import PROTEINS, REPO, tiny_model


pytestmark = pytest.mark.cuda  # skipped without a GPU by conftest.py (NO_GPU, a reason CI allows)

# Per protein, ||x - reference|| / ||reference|| of its last hidden states against the stock EsmModel on the CPU in
# fp32 with the protein alone (ESM-2 8M architecture, random weights, 6 layers). fp32: TF32 is off for matmuls
# (torch's default), so far under 1e-4; bf16 keeps 8 significant bits (2^-8 = 4e-3 per rounding) through 6 layers;
# fp16 keeps 11. Not measured on a GPU before: the tests print what they see.
RELATIVE_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 6e-3}
# Class probabilities (absolute) of a tiny model, GPU against CPU.
PROBABILITY_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 5e-3}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Lengths around flex attention's 128-token tiles and flash attention's blocks, one cropped (1100 residues), one with
# a <mask> token (token dropout: the padded fallback), a run of equal lengths.
LENGTHS = [1, 2, 30, 126, 127, 128, 129, 300, 300, 300, 700, 1022]


def random_sequences(lengths, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
    return [letters[rng.integers(0, len(letters), int(length))].tobytes().decode() for length in lengths]


SEQUENCES = PROTEINS + random_sequences(LENGTHS, 0) + ["A" * 1100, "MK<mask>TAYIAKQR"]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().float().cpu(), reference.detach().float().cpu()
    return float((value - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def esm2_8m():
    """(CPU model, its CUDA copy, tokenizer, each protein's CPU fp32 hidden states computed alone)."""
    torch.manual_seed(0)
    cpu = EsmForLocalization(EsmLocConfig(esm_config=dict(ESM2_ARCHITECTURES["esm2_t6_8M"]))).eval()
    tokenizer = tokenizer_for(cpu.config)
    with torch.inference_mode():
        reference = [cpu.esm(**tokenizer([s], return_tensors="pt")).last_hidden_state[0] for s in SEQUENCES]
    return cpu, copy.deepcopy(cpu).cuda(), tokenizer, reference


def attention_or_skip(attention: str, dtype: torch.dtype, head_size: int) -> None:
    if attention != "auto":
        problem = varlen_attention.attention_problem(attention, "cuda", dtype, head_size)
        if problem:
            pytest.skip(problem)


ATTENTIONS = ["auto", *varlen_attention.ATTENTION_MODES]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_engine_matches_the_cpu_fp32_reference(attention, precision, esm2_8m):
    if attention == "flex" and precision != "bf16":
        pytest.skip("flex: bf16 only (each dtype compiles its own kernel: tens of seconds of the GPU run)")
    _, model, tokenizer, reference = esm2_8m
    attention_or_skip(attention, DTYPES[precision], 16)
    engine = Engine(model, tokenizer, device="cuda", precision=precision, attention=attention,
                    max_tokens_per_batch=2048, progress=False)
    chosen = engine.attention_mode()
    errors = {}
    for indices, lengths, hidden in engine.hidden_state_batches(engine.encode(SEQUENCES)):
        assert hidden.is_cuda and not hidden.isnan().any()
        start = 0
        for index, length in zip(indices, lengths):
            errors[int(index)] = relative_error(hidden[start:start + length], reference[index])
            start += length
    assert sorted(errors) == list(range(len(SEQUENCES)))
    worst = max(errors, key=errors.get)
    print(f"{attention} (runs {chosen}), {precision}: largest relative error {errors[worst]:.1e} (protein {worst})")
    assert errors[worst] <= RELATIVE_TOLERANCE[precision], errors


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_results_do_not_depend_on_batch_mates(attention, precision, esm2_8m):
    """Each protein alone, all in large batches, and shuffled into other batches: the same features (within the
    rounding of differently sized matrix products), so no protein attends to another."""
    if attention == "flex" and precision != "bf16":
        pytest.skip("flex: bf16 only (compile time)")
    _, model, tokenizer, _ = esm2_8m
    attention_or_skip(attention, DTYPES[precision], 16)

    def features(sequences, budget):
        return Engine(model, tokenizer, device="cuda", precision=precision, attention=attention,
                      max_tokens_per_batch=budget, progress=False).embed(sequences, "mean")

    alone = features(SEQUENCES, 1)
    order = np.random.default_rng(1).permutation(len(SEQUENCES))
    worst = 0.0
    for budget, sequences, back in ((65536, SEQUENCES, np.arange(len(SEQUENCES))),
                                    (900, [SEQUENCES[i] for i in order], np.argsort(order))):
        batched = features(sequences, budget)[back]
        worst = max(worst, max(relative_error(torch.from_numpy(b), torch.from_numpy(a))
                               for a, b in zip(alone, batched)))
    print(f"{attention}, {precision}: largest relative difference between batchings {worst:.1e}")
    assert worst <= {"fp32": 1e-5, "bf16": RELATIVE_TOLERANCE["bf16"]}[precision]


@pytest.fixture(scope="module")
def proteins_csv(tmp_path_factory):
    return write_demo_csv(tmp_path_factory.mktemp("data") / "proteins.csv", n_rows=160, seed=3)


def probabilities(model_dir, device, precision) -> np.ndarray:
    model, tokenizer = loading.load_model_dir(model_dir, device)
    sequences = SEQUENCES[:4] + SEQUENCES[-6:-1]
    return Engine(model, tokenizer, device=device, precision=precision, progress=False).predict_probabilities(sequences)


# What a GPU user runs: frozen (features cached by the engine on CUDA), LoRA with bf16 autocast and gradient
# checkpointing, full fine-tuning in bf16.
@pytest.mark.parametrize("mode, extra", [("frozen", []), ("lora", ["--bf16", "--gradient_checkpointing"]),
                                         ("full", ["--bf16"])])
def test_train_on_cuda_leaves_a_model_whose_cpu_and_gpu_predictions_agree(mode, extra, proteins_csv, tmp_path):
    output_dir = tmp_path / f"run_{mode}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--train_file", str(proteins_csv),
                             "--output_dir", str(output_dir), "--finetune", mode, "--from_scratch", "tiny",
                             "--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--max_residues", "200",
                             "--num_examples_to_show", "0", "--feature_cache_dir", str(tmp_path / "cache"), *extra],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    cpu = probabilities(output_dir, "cpu", "fp32")
    gpu = probabilities(output_dir, "cuda", "fp32")
    gpu_auto = probabilities(output_dir, "cuda", "auto")
    print(f"train.py {mode} {' '.join(extra)}: CPU vs GPU fp32 {np.abs(cpu - gpu).max():.1e}, "
          f"vs GPU auto {np.abs(cpu - gpu_auto).max():.1e}")
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=PROBABILITY_TOLERANCE["fp32"])
    np.testing.assert_allclose(gpu_auto, cpu, rtol=0, atol=PROBABILITY_TOLERANCE["bf16"])
    # The run's own test predictions (the engine on CUDA at auto precision) against the saved model on the CPU.
    written = pd.read_csv(output_dir / "test_predictions.csv")
    model, tokenizer = loading.load_model_dir(output_dir, "cpu")
    test = pd.read_csv(proteins_csv).set_index("ACC").loc[written["ACC"], "Sequence"].tolist()
    expected = Engine(model, tokenizer, progress=False).predict_probabilities(test)
    columns = [column for column in written.columns if column.startswith("probability_")]
    np.testing.assert_allclose(written[columns].to_numpy(), expected, rtol=0, atol=PROBABILITY_TOLERANCE["bf16"])


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = save_model(tiny_model(max_residues=1022), root / "model")
    fasta = root / "proteins.fasta"
    fasta.write_text("".join(f">P{i}\n{sequence}\n" for i, sequence in enumerate(SEQUENCES[:-1])))
    return model_dir, fasta, root


def run_cli(module, args, cwd) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", module, *map(str, args), "--no_progress"], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_predict_on_cuda_equals_cpu(saved_model):
    model_dir, fasta, root = saved_model
    outputs = {}
    for name, options in (("cpu", ["--device", "cpu"]), ("cuda_fp32", ["--device", "cuda", "--precision", "fp32"]),
                          ("cuda_auto", ["--device", "cuda"])):
        run_cli("esmloc.commands.predict", [model_dir, fasta, "-o", root / f"{name}.csv", *options], root)
        outputs[name] = pd.read_csv(root / f"{name}.csv")
    columns = [column for column in outputs["cpu"].columns if column.startswith("probability_")]
    for name, precision in (("cuda_fp32", "fp32"), ("cuda_auto", "bf16")):
        assert outputs[name]["ACC"].tolist() == outputs["cpu"]["ACC"].tolist()
        difference = np.abs(outputs[name][columns].to_numpy() - outputs["cpu"][columns].to_numpy()).max()
        print(f"esmloc-predict {name} vs cpu: {difference:.1e}")
        # The CSV holds 6 decimals: half a unit of the last one on top of the tolerance.
        assert difference <= PROBABILITY_TOLERANCE[precision] + 5e-7


def test_embed_on_cuda_equals_cpu(saved_model):
    model_dir, fasta, root = saved_model
    run_cli("esmloc.commands.embed", [model_dir, fasta, "-o", root / "cpu.parquet", "--device", "cpu"], root)
    run_cli("esmloc.commands.embed", [model_dir, fasta, "-o", root / "cuda.parquet", "--device", "cuda", "--precision", "fp32"],
            root)
    cpu, gpu = (pd.read_parquet(root / name) for name in ("cpu.parquet", "cuda.parquet"))
    assert gpu["ACC"].tolist() == cpu["ACC"].tolist() and gpu["sequence_sha256"].tolist() == cpu["sequence_sha256"].tolist()
    worst = max(relative_error(torch.tensor(g), torch.tensor(c)) for g, c in zip(gpu["embedding"], cpu["embedding"]))
    print(f"esmloc-embed cuda fp32 vs cpu: largest relative difference {worst:.1e}")
    assert worst <= RELATIVE_TOLERANCE["fp32"]


def test_a_proteome_sized_predict_keeps_gpu_memory_flat():
    """20,000 proteins of DeepLoc-like lengths take no more GPU memory than 2,000: batches are bounded by the token
    budget and results leave the GPU batch by batch."""
    torch.manual_seed(0)
    model = EsmForLocalization(EsmLocConfig(esm_config=dict(ESM2_ARCHITECTURES["esm2_t6_8M"]))).cuda().eval()
    tokenizer = tokenizer_for(model.config)
    lengths = np.minimum(np.random.default_rng(2).lognormal(6.0, 0.6, 20_000).astype(int), 1022) + 1
    sequences = random_sequences(lengths, 3)
    engine = Engine(model, tokenizer, device="cuda", progress=False)
    engine.predict_probabilities(sequences[:500])  # warm-up: cuBLAS workspaces, the kernel check
    peaks = {}
    for count in (2_000, 20_000):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = engine.predict_probabilities(sequences[:count])
        assert result.shape == (count, 2) and np.isfinite(result).all()
        peaks[count] = (torch.cuda.max_memory_allocated() - before) / 2**20
        assert torch.cuda.memory_allocated() - before < 2**20  # nothing left behind on the GPU
    print(f"peak GPU memory above the weights ({engine.attention_mode()}, budget {engine.max_tokens_per_batch}): "
          + ", ".join(f"{count} proteins {peak:.0f} MiB" for count, peak in peaks.items()))
    assert peaks[20_000] <= 1.05 * peaks[2_000] + 16
