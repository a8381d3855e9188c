"""Deprecated: the old name of `esmloc.saving` (saving a model directory that loads anywhere); importing it warns.

It re-exports `save_model`, `tokenizer_for` and `crop_mismatch` for one release; import them from `esmloc.saving`.
"""

import warnings

from esmloc.saving import crop_mismatch, save_model, tokenizer_for


warnings.warn("esmloc.export is deprecated and will be removed in the next release: import save_model, tokenizer_for "
              "and crop_mismatch from esmloc.saving", DeprecationWarning, stacklevel=2)

__all__ = ["crop_mismatch", "save_model", "tokenizer_for"]
