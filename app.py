"""The esmloc demo as a Hugging Face Space (Gradio): `python app.py` serves the model MODEL on port 7860.

MODEL is a saved model directory or a hub repository id; the environment variable ESMLOC_MODEL overrides it. Its
default is where `python train.py` saves a model. `esmloc-push OUTPUT_DIR --hub_model_id you/model --space you/demo`
uploads this file as the Space's app.py with MODEL set to the model repository (esmloc/space.py). Locally:
`esmloc-demo MODEL_DIR` (esmloc/webapp.py).
"""

import os
import sys


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from esmloc import cli  # noqa: E402 (after the environment gradio reads)
from esmloc.webapp import build_app  # noqa: E402


MODEL = os.environ.get("ESMLOC_MODEL", "./esmloc_output")

if __name__ == "__main__":
    # A model that cannot be opened is one line (and exit status 2), not a traceback.
    sys.exit(cli.run("python app.py", lambda argv: build_app(MODEL).launch()))
else:  # imported (gradio's reload mode, a test): the app as `demo`, unstarted
    demo = build_app(MODEL)
