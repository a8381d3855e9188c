"""The CPU peer `esm-cpp` (PyPI: a C++ ESM-2 inference engine), run side by side with esmloc's engine.

esm-cpp needs numpy < 2 and is no dependency of esmloc: `ensure_environment()` installs it into its own virtual
environment under bench/results/ (git-ignored) the first time, and the peer runs there, in a subprocess, with this
file as its script. What the peer gets is what esmloc's engine gets: the same backbone weights (written as the
`EsmForMaskedLM` safetensors layout esm-cpp loads, with the rotary `inv_freq` buffers transformers 5 no longer saves)
and the same token ids (esmloc's tokenizer: normalised and cropped as the model's config says).

Facts (esm-cpp 0.2.1, measured here): hidden states only through `forward_with_hidden_states`, one protein per call;
`layer_norm_eps` fixed at 1e-5 (ESM-2's value); INT8 (`quantize_weights`, per-tensor activations) for ESM-2 150M and
larger; threads from ESM_NUM_THREADS at first load.

    peer venv python bench/peer_esm_cpp.py WEIGHTS.safetensors IDS.json OUT.npy [--int8]

writes the mean-pooled last hidden states (residues only, as esmloc pools) to OUT.npy and prints the seconds the
forward passes took (load and quantisation excluded) as JSON on its last line.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path


ESM_CPP_REQUIREMENT = "esm-cpp==0.2.1"
# esm-cpp quantises only the larger models (its README: 150M and up).
INT8_MIN_LAYERS = 30


def environment_dir() -> Path:
    return Path(__file__).resolve().parent / "results" / "esm-cpp-venv"


def ensure_environment(quiet: bool = True) -> Path:
    """The peer's Python (a venv with esm-cpp), created on first use; needs PyPI access that once."""
    python = environment_dir() / "bin" / "python"
    check = [str(python), "-c", "import esm_cpp"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"installing {ESM_CPP_REQUIREMENT} into {environment_dir()} (its own environment: it needs numpy < 2)",
          file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(environment_dir())], check=True)
    subprocess.run([str(python), "-m", "pip", "install", *(["-q"] if quiet else []), ESM_CPP_REQUIREMENT],
                   check=True)
    subprocess.run(check, check=True)
    return python


def write_masked_lm_weights(esm, path: Path) -> Path:
    """`esm` (an EsmModel) as an `EsmForMaskedLM`-layout safetensors file esm-cpp loads: `esm.*` tensors, each
    layer's rotary `inv_freq` (transformers 5 keeps one non-persistent copy on the model), and an untrained LM head
    (esm-cpp loads one; hidden states do not depend on it)."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"esm.{name}": tensor.detach().contiguous().float() for name, tensor in esm.state_dict().items()
               if not name.startswith("contact_head.")}
    inv_freq = esm.rotary_embeddings.inv_freq.detach().float().contiguous()
    for index in range(esm.config.num_hidden_layers):
        tensors[f"esm.encoder.layer.{index}.attention.self.rotary_embeddings.inv_freq"] = inv_freq.clone()
    hidden, vocab = esm.config.hidden_size, esm.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    tensors.update({
        "lm_head.dense.weight": torch.randn(hidden, hidden, generator=generator) * 0.02,
        "lm_head.dense.bias": torch.zeros(hidden),
        "lm_head.layer_norm.weight": torch.ones(hidden),
        "lm_head.layer_norm.bias": torch.zeros(hidden),
        "lm_head.decoder.weight": esm.embeddings.word_embeddings.weight.detach().float().contiguous().clone(),
        "lm_head.bias": torch.zeros(vocab),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def run_peer(python: Path, weights: Path, token_ids: list[list[int]], work_dir: Path, int8: bool = False,
             threads: int | None = None):
    """Runs the peer once on `token_ids`; returns (mean embeddings (n, hidden), seconds of forward passes)."""
    import numpy as np

    work_dir.mkdir(parents=True, exist_ok=True)
    ids_file, out_file = work_dir / "ids.json", work_dir / "embeddings.npy"
    ids_file.write_text(json.dumps(token_ids))
    env = dict(os.environ)
    if threads:
        env["ESM_NUM_THREADS"] = str(threads)
    result = subprocess.run([str(python), __file__, str(weights), str(ids_file), str(out_file),
                             *(["--int8"] if int8 else [])], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"esm-cpp failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    seconds = json.loads(result.stdout.strip().splitlines()[-1])["seconds"]
    return np.load(out_file), seconds


def _peer_main(argv):
    """Runs inside the peer's environment (numpy < 2, esm_cpp; no torch)."""
    import esm_cpp
    import numpy as np

    weights, ids_file, out_file = argv[:3]
    model = esm_cpp.Model.load_from_safetensors(weights)
    if "--int8" in argv:
        model.quantize_weights()
    token_ids = json.loads(Path(ids_file).read_text())
    out = np.zeros((len(token_ids), model.config.hidden_size), dtype=np.float32)
    start = time.perf_counter()
    for index, ids in enumerate(token_ids):
        _, hidden_states = model.forward_with_hidden_states(np.asarray(ids, dtype=np.int32))
        last = np.asarray(hidden_states[-1]).reshape(len(ids), -1)
        out[index] = last[1:-1].mean(axis=0) if len(ids) > 2 else last[0]
    seconds = time.perf_counter() - start
    np.save(out_file, out)
    print(json.dumps({"seconds": seconds, "isa": esm_cpp.current_isa()}))


if __name__ == "__main__":
    _peer_main(sys.argv[1:])
