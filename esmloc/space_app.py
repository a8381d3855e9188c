"""The esmloc demo as a Hugging Face Space (Gradio): `python app.py` serves the model MODEL on port 7860.

MODEL is a saved model directory or a hub repository id; the environment variable ESMLOC_MODEL overrides it.
`esmloc-push OUTPUT_DIR --hub_model_id you/model --space you/demo` uploads this file as the Space's app.py with
MODEL set to the model repository (esmloc/space.py). Locally: `esmloc-demo MODEL_DIR` (esmloc/webapp.py).
"""

import os


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from esmloc.webapp import build_app  # noqa: E402 (after the environment it reads)


MODEL = os.environ.get("ESMLOC_MODEL", "out/demo")

demo = build_app(MODEL)

if __name__ == "__main__":
    demo.launch()
