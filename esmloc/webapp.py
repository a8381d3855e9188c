"""The interactive demo: a Gradio app around a saved esmloc model.

    esmloc-demo MODEL_DIR [--host 127.0.0.1] [--port 7860]      # or: ESMLOC_MODEL=MODEL_DIR python app.py

MODEL_DIR is a model directory saved by train.py, or a hub repository id (downloaded with `snapshot_download`, as a
Hugging Face Space does). Needs the `demo` extra: `pip install 'esmloc[demo]'`.

A user pastes sequences (raw, one per line, or FASTA) or uploads a FASTA/CSV file; the app shows the probability of
every label, the decision threshold and the predicted label, then, for a chosen protein, its per-residue
explanation (`esmloc.explain`): the sequence coloured by occlusion score, a plot of the scores along the sequence
(position, residue and score on hover) and, for attention-pooling models, the pooling weights. The numbers are
esmloc-predict's: the same model loading, Engine, decision thresholds (MODEL_DIR/test_results.json) and label rule
(`esmloc.predict`). At most `MAX_SEQUENCES` proteins per request: files of any size go to esmloc-predict.

The API endpoint `predict` (`gradio_client.Client(url).predict(text, api_name="/predict")`) takes the same text and
returns one JSON object per protein: ACC, `probability_<label>` for every label (floats), and `predicted_label`
(`predicted_labels` for multi-label models), the columns of esmloc-predict's CSV.
"""

import argparse
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from esmloc import loading, predictions, sequences, task
from esmloc.cli import InputError
from esmloc.engine import Engine
from esmloc.explain import Explainer, seen_positions
from esmloc.task import RESULTS_FILE, decision_thresholds


logger = logging.getLogger("esmloc.webapp")

MAX_SEQUENCES = 20  # proteins per interactive request; explaining one costs a forward pass per residue
TITLE = "esmloc: where does this protein live?"


def resolve_model_dir(model: str) -> Path:
    """A local model directory, or a hub repository id downloaded to the local cache (a Space's case)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model))


def _raw_records(text: str):
    """Raw sequences, one per non-empty line, named sequence_1, sequence_2, ..."""
    count = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        count += 1
        acc = f"sequence_{count}"
        try:
            sequence, _ = sequences.validate_sequence(line)
        except ValueError as error:
            raise InputError(f"pasted text, line {line_number} ({acc}): {error}") from None
        yield acc, sequence


def _file_records(path: Path, shown_as: str):
    """The records of a FASTA or CSV file through esmloc's own reader; errors name the file as `shown_as`."""
    try:
        for record in sequences.read_sequences(path):
            yield record.acc, record.sequence
    except sequences.DataValidationError as error:
        raise InputError("; ".join(problem.replace(str(path), shown_as) for problem in error.problems)) from None


def parse_proteins(text: str | None, upload: str | None = None, limit: int = MAX_SEQUENCES) -> list[tuple[str, str]]:
    """(ACC, sequence) pairs from pasted text (FASTA when it starts with '>', else one raw sequence per line) or an
    uploaded FASTA/CSV file (by its name: .fasta/.fa/.faa/.fas/.fsa are FASTA). Raises `InputError` naming the bad
    record, for an empty input and for more than `limit` proteins."""
    if upload:
        upload = Path(upload)
        records = _file_records(upload, f"uploaded file {upload.name}")
    elif text and text.strip():
        if text.lstrip().startswith(">"):
            folder = tempfile.mkdtemp(prefix="esmloc-demo-")
            path = Path(folder) / "pasted.fasta"
            path.write_text(text.strip() + "\n", encoding="utf-8")
            records = _file_records(path, "pasted text")
        else:
            records = _raw_records(text)
    else:
        raise InputError("no sequence: paste one or more sequences (raw or FASTA) or upload a file")
    proteins = []
    for record in records:
        if len(proteins) == limit:
            raise InputError(f"more than {limit} sequences: the demo predicts at most {limit} at a time; use "
                             "esmloc-predict for files of any size")
        proteins.append(record)
    if not proteins:
        raise InputError("no sequence found in the input")
    return proteins


class DemoModel:
    """A saved model with everything esmloc-predict decides from its directory: thresholds, label rule, engine."""

    def __init__(self, model_dir, device="cpu"):
        self.model_dir = Path(model_dir)
        self.model, self.tokenizer = loading.load_model_dir(self.model_dir, device)
        config = self.model.config
        self.names, self.multi_label = task.label_names(config), task.is_multi_label(config)
        self.thresholds, self.threshold_source = decision_thresholds(self.model_dir, config, None)
        # esmloc-predict's own words for where the threshold came from, naming the results file but not its folder.
        self.threshold_text = self.threshold_source.replace(str(self.model_dir / RESULTS_FILE), RESULTS_FILE)
        self.engine = Engine(self.model, self.tokenizer, progress=False)
        self.explainer = Explainer(self.model, self.tokenizer)
        self.header = predictions.columns(self.names, self.multi_label)
        # The table also shows a binary model's threshold (a multi-label model's are listed above the table).
        single = self.thresholds is not None and len(self.thresholds) == 1
        self.threshold_column = f"{self.thresholds[0]:.4g}" if single else None

    def predict(self, proteins: list[tuple[str, str]]) -> tuple[np.ndarray, list[list[str]]]:
        """The probabilities (n, labels) and esmloc-predict's CSV rows (ACC, probabilities as written, label)."""
        probabilities = self.engine.predict_probabilities([sequence for _, sequence in proteins])
        return probabilities, predictions.rows([acc for acc, _ in proteins], probabilities, self.names,
                                               self.multi_label, self.thresholds)

    def api_rows(self, proteins) -> list[dict]:
        probabilities, rows = self.predict(proteins)
        return [{**dict(zip(self.header, row)), **{name: float(value) for name, value
                                                   in zip(self.header[1:-1], values)}}
                for row, values in zip(rows, probabilities)]

    def crop_note(self, acc: str, sequence: str) -> str | None:
        """What the tokenizer crops away from a protein longer than the model's input, or None."""
        positions = seen_positions(sequence, self.tokenizer)
        if len(positions) == len(sequence):
            return None
        hidden = np.flatnonzero(~np.isin(np.arange(len(sequence)), positions)) + 1
        return (f"{acc}: {len(sequence)} residues; the model sees {len(positions)} ({self.tokenizer.crop} crop): "
                f"residues {hidden[0]}-{hidden[-1]} are cropped away and not scored")


def explanation_views(explanation):
    """(highlighted residues, occlusion-score table, pooling-weight table or None) for the app's components."""
    import pandas as pd

    scale = float(np.abs(explanation.attributions).max()) or 1.0
    score = dict(zip(explanation.positions.tolist(), (explanation.attributions / scale).tolist()))
    highlighted = [(residue, score.get(index)) for index, residue in enumerate(explanation.sequence)]
    residues = [explanation.sequence[i] for i in explanation.positions]
    positions = explanation.positions + 1
    scores = pd.DataFrame({"position": positions, "residue": residues,
                           "score": explanation.attributions.astype(float)})
    weights = None
    if explanation.pooling_weights is not None:
        weights = pd.DataFrame({"position": positions, "residue": residues,
                                "weight": explanation.pooling_weights.astype(float)})
    return highlighted, scores, weights


def example_inputs() -> list[str]:
    """Proteins to click: synthetic ones from esmloc.demo (made up; the demo data's positives start with a
    targeting-peptide-like presequence): a positive, a negative, both at once, and one longer than 1022 residues."""
    from esmloc.demo import demo_rows

    rows = demo_rows(400, seed=0)
    positive = next(row for row in rows if row["Mitochondrion"] and len(row["Sequence"]) < 300)
    negative = next(row for row in rows if not row["Mitochondrion"] and len(row["Sequence"]) < 300)
    long_one = next(row for row in rows if len(row["Sequence"]) > 1022)
    fasta = [f">{positive['ACC']} synthetic, with a presequence\n{positive['Sequence']}",
             f">{negative['ACC']} synthetic, without\n{negative['Sequence']}"]
    return fasta + ["\n".join(fasta), f">{long_one['ACC']} synthetic, {len(long_one['Sequence'])} residues\n"
                                       f"{long_one['Sequence']}"]


def build_app(model, device: str = "cpu"):
    """The Gradio Blocks app for `model` (a model directory or a hub repository id)."""
    import gradio as gr
    import pandas as pd

    demo_model = DemoModel(resolve_model_dir(model), device=device)
    labels = ", ".join(f"`{name}`" for name in demo_model.names)
    attention = demo_model.explainer.attention_pooling

    def on_predict(text, upload):
        try:
            proteins = parse_proteins(text, upload)
        except InputError as error:
            return (f"**Cannot predict:** {error}", pd.DataFrame(columns=demo_model.header),
                    gr.update(choices=[], value=None), [])
        _, rows = demo_model.predict(proteins)
        header = demo_model.header
        if demo_model.threshold_column is not None:
            header = header[:-1] + [f"threshold_{demo_model.names[1]}"] + header[-1:]
            rows = [row[:-1] + [demo_model.threshold_column] + row[-1:] for row in rows]
        notes = [note for acc, sequence in proteins if (note := demo_model.crop_note(acc, sequence))]
        message = "\n".join([f"Predicted {len(proteins)} protein(s)."] + [f"- {note}" for note in notes])
        accs = [acc for acc, _ in proteins]
        return (message, pd.DataFrame(rows, columns=header),
                gr.update(choices=accs, value=accs[0]), proteins)

    def on_explain(acc, proteins):
        sequence = dict(proteins or []).get(acc)
        if not sequence:
            return None, None, None
        highlighted, scores, weights = explanation_views(demo_model.explainer.explain(sequence, acc=acc))
        return highlighted, scores, weights

    def predict(sequences: str) -> list[dict]:
        """One JSON object per protein (ACC, probability per label, predicted label), for gradio_client."""
        try:
            return demo_model.api_rows(parse_proteins(sequences))
        except InputError as error:
            raise gr.Error(str(error)) from None

    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"# {TITLE}\n\nModel `{demo_model.model_dir.name}` ({demo_model.model.config.pooling} pooling; "
                    f"labels {labels}). Decision threshold: {demo_model.threshold_text}. Up to {MAX_SEQUENCES} "
                    "proteins per request; esmloc-predict handles files of any size.")
        with gr.Row():
            text = gr.Textbox(label="Sequences: raw (one per line) or FASTA", lines=8, elem_id="sequences")
            upload = gr.File(label="... or a FASTA / CSV file (ACC, Sequence)", type="filepath",
                             file_types=[".fasta", ".fa", ".faa", ".fas", ".fsa", ".csv", ".tsv"], elem_id="upload")
        button = gr.Button("Predict", variant="primary", elem_id="predict")
        message = gr.Markdown(elem_id="message")
        table = gr.Dataframe(label="Predictions (probabilities as esmloc-predict writes them)", interactive=False,
                             elem_id="predictions")
        chosen = gr.Dropdown(label="Explain protein", choices=[], elem_id="chosen")
        residues = gr.HighlightedText(
            label="Residues coloured by occlusion score (red: evidence for the label, blue: against; uncoloured: "
                  "cropped away)", elem_id="residues", show_legend=False)
        plot = gr.ScatterPlot(x="position", y="score", tooltip=["position", "residue", "score"],
                              label="Occlusion score: drop in log-odds when residues i-2..i+2 are hidden",
                              elem_id="scores", height=260)
        weights = gr.ScatterPlot(x="position", y="weight", tooltip=["position", "residue", "weight"],
                                 label="Attention-pooling weight", elem_id="weights", height=220, visible=attention)
        state = gr.State([])
        gr.Examples(examples=[[example] for example in example_inputs()], inputs=[text], label="Example proteins")
        button.click(on_predict, [text, upload], [message, table, chosen, state], api_visibility="private")
        chosen.change(on_explain, [chosen, state], [residues, plot, weights], api_visibility="private")
        gr.api(predict, api_name="predict")
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(prog="esmloc-demo", description="Serve the interactive esmloc demo (Gradio).")
    parser.add_argument("model", metavar="MODEL_DIR", help="a saved model directory, or a hub repository id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports to Gradio's servers
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    build_app(args.model, device=args.device).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
