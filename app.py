"""The esmloc demo as a Hugging Face Space (Gradio): `python app.py` serves the model MODEL on port 7860.

MODEL is a saved model directory or a hub repository id; the environment variable ESMLOC_MODEL overrides it. Its
default is where `python train.py` saves a model.
`esmloc-push OUTPUT_DIR --hub_model_id you/model --space you/demo` uploads this file as the Space's app.py with
MODEL set to the model repository (esmloc/space.py). Locally: `esmloc-demo MODEL_DIR` (esmloc/webapp.py).

The limits of a request (esmloc.webapp.Limits) come from ESMLOC_MAX_SEQUENCES, ESMLOC_MAX_CHARS,
ESMLOC_MAX_RESIDUES, ESMLOC_MAX_UPLOAD_BYTES, ESMLOC_MAX_EXPLAIN_RESIDUES, ESMLOC_MAX_QUEUE and ESMLOC_CONCURRENCY
(the Space's variables), else esmloc-demo's defaults.
"""

import os


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from esmloc.webapp import launch, space_app  # noqa: E402 (after the environment it reads)


MODEL = os.environ.get("ESMLOC_MODEL", "./esmloc_output")

demo, limits = space_app(MODEL)

if __name__ == "__main__":
    launch(demo, limits)
