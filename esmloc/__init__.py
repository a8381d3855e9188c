"""esmloc: predict where a protein lives in the cell from its sequence with ESM-2, the Hugging Face way.

The model itself lives in the three remote-code modules at the top level (they ship inside every saved model);
this package holds what the command-line tools and benchmarks share. Importing it registers the model with the
Auto classes, so saved models also load in-process without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from configuration_esmloc import ESM2_ARCHITECTURES, EsmLocConfig
from modeling_esmloc import EsmForLocalization
from tokenization_esmloc import EsmLocTokenizer, crop_sequence, normalize_sequence


__version__ = "0.1.0"

AutoConfig.register(EsmLocConfig.model_type, EsmLocConfig, exist_ok=True)
AutoModel.register(EsmLocConfig, EsmForLocalization, exist_ok=True)
AutoModelForSequenceClassification.register(EsmLocConfig, EsmForLocalization, exist_ok=True)
AutoTokenizer.register(EsmLocConfig, slow_tokenizer_class=EsmLocTokenizer, exist_ok=True)

__all__ = [
    "ESM2_ARCHITECTURES",
    "EsmForLocalization",
    "EsmLocConfig",
    "EsmLocTokenizer",
    "crop_sequence",
    "normalize_sequence",
]
