"""The interactive demo: a Gradio app around a saved esmloc model.

One job: the app, its limits and the middleware that enforces them before a body is read belong to one
server; prediction, explanation and reading uploads are `esmloc.engine`, `esmloc.explain` and `esmloc.sequences`.

    esmloc-demo MODEL_DIR [--host 127.0.0.1] [--port 7860] [--max_sequences 20] [--max_chars 100000] ...
    ESMLOC_MODEL=MODEL_DIR ESMLOC_MAX_SEQUENCES=20 ... python app.py       # a Space

MODEL_DIR is a model directory saved by train.py, or a hub repository id (downloaded with `snapshot_download`, as a
Hugging Face Space does). Needs the `demo` extra: `pip install 'esmloc[demo]'`.

A user pastes sequences (raw, one per line, or FASTA) or uploads a FASTA/CSV file; the app shows the probability of
every label, the decision threshold and the predicted label, then, when asked, the per-residue explanation of a
chosen protein (`esmloc.explain`): the sequence coloured by occlusion score, a plot of the scores along the sequence
(position, residue and score on hover) and, for attention-pooling models, the pooling weights. The numbers are
esmloc-predict's: the same model loading, Engine, decision thresholds (MODEL_DIR/test_results.json) and label rule
(`esmloc.task`).

The API endpoint `predict` (`gradio_client.Client(url).predict(text, api_name="/predict")`) takes the same text and
returns one JSON object per protein: ACC, `probability_<label>` for every label (floats), and `predicted_label`
(`predicted_labels` for multi-label models), the columns of esmloc-predict's CSV.

The server is meant to face strangers, so every route (the page, the `predict` API, the upload, every event a client
can call through the queue or directly) holds to `Limits`, stated on the page:
- a request body larger than its route allows is refused from its Content-Length (413) before a byte of it is read
  (`RequestSizeLimit`, in front of every route); a body without a length is refused (411);
- pasted text is measured before it is parsed, and parsed in memory, never written to disk;
- an upload is read once and deleted (uploads never read are deleted after `UPLOAD_TTL_S` seconds);
- the queue holds `max_queue` requests, predictions run `concurrency` at a time, and no route runs them outside the
  queue; explanations (one forward pass per residue) run only when asked, for proteins up to `max_explain_residues`
  residues, one at a time outside the queue (a second one is answered "busy" at once), so that they never wait in
  or fill the queue predictions use.
Everything a user sent (FASTA headers, file names) and every message is shown as text, never as Markdown or HTML. A
model or a limit that cannot be used stops the start with one line (`esmloc-demo: error: ...`, `app.py: error:
...`) and exit status 2.
"""

import csv
import dataclasses
import io
import logging
import os
import threading
from pathlib import Path

import numpy as np

from esmloc import cli, loading, predictions, sequences, task
from esmloc.engine import Engine
from esmloc.errors import InputError
from esmloc.explain import ExplanationLimitError, Explainer, seen_positions
from esmloc.task import RESULTS_FILE, decision_thresholds


logger = logging.getLogger("esmloc.webapp")

TITLE = "esmloc: where does this protein live?"
UPLOAD_TTL_S = 300  # an upload no prediction reads is deleted after this long (gradio's delete_cache)
FRAMING_BYTES = 64 * 1024  # a request's JSON or multipart framing around the text or file it carries
JSON_BYTES_PER_CHAR = 6  # the most one character of text takes in a JSON body (a \u00XX escape)
ENV_PREFIX = "ESMLOC_"  # app.py reads the limits from ESMLOC_MAX_SEQUENCES, ESMLOC_MAX_CHARS, ...


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; esmloc-demo's `--max_sequences` ... options, app.py's
    `ESMLOC_MAX_SEQUENCES` ... variables. The defaults fit a 2-core CPU server."""

    max_sequences: int = dataclasses.field(default=20, metadata={"help": "proteins per request"})
    max_chars: int = dataclasses.field(default=100_000, metadata={"help": "characters of pasted text per request"})
    max_residues: int = dataclasses.field(
        default=40_000, metadata={"help": "residues per protein (titin, the longest known, has 34,350); beyond the "
                                          "model's window (1,022) a protein is cropped, and the page says so"})
    max_upload_bytes: int = dataclasses.field(default=1_000_000, metadata={"help": "bytes of an uploaded file"})
    max_explain_residues: int = dataclasses.field(
        default=1022, metadata={"help": "residues (as the model sees them) of a protein explained; an explanation "
                                        "runs alone, in strided occlusion windows (esmloc.explain: about 48 forward "
                                        "passes of a 1,022-residue protein)"})
    explain_time_budget_s: int = dataclasses.field(
        default=60, metadata={"help": "seconds one explanation may run before it is stopped and the page says so"})
    max_queue: int = dataclasses.field(default=20, metadata={"help": "requests waiting in the queue"})
    concurrency: int = dataclasses.field(
        default=1, metadata={"help": "predictions run at once (explanations: one at a time, outside the queue)"})

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field.name} must be a positive integer, got {value!r}")

    @classmethod
    def from_env(cls, environ=os.environ) -> "Limits":
        """The limits of the `ESMLOC_<NAME>` variables set (app.py's way); the defaults for the others."""
        values = {}
        for field in dataclasses.fields(cls):
            variable = ENV_PREFIX + field.name.upper()
            if variable in environ:
                text = environ[variable].strip().replace("_", "")
                if not text.isdigit() or int(text) < 1:
                    raise InputError(f"{variable}={environ[variable]!r}: not a positive integer")
                values[field.name] = int(text)
        return cls(**values)

    def body_limit(self, path: str) -> int:
        """The bytes a request to `path` may send: an upload's file and its framing, else the JSON of the longest
        text allowed."""
        if path.rstrip("/").endswith("/upload"):
            return self.max_upload_bytes + FRAMING_BYTES
        return JSON_BYTES_PER_CHAR * self.max_chars + FRAMING_BYTES

    def describe(self) -> str:
        return (f"Limits per request: {self.max_sequences} proteins, {self.max_chars:,} characters of pasted text, "
                f"{self.max_residues:,} residues per protein (longer than the model's window: cropped, and said), "
                f"uploads of {self.max_upload_bytes:,} bytes. Explanations: proteins of up to "
                f"{self.max_explain_residues:,} residues, one at a time on the server, at most "
                f"{self.explain_time_budget_s} s each. esmloc-predict handles files of any size.")


DEFAULT_LIMITS = Limits()


def add_limit_options(parser) -> None:
    """`--max_sequences N` ... on an argparse parser (esmloc-demo's), one per field of `Limits`."""
    group = parser.add_argument_group("limits", "what one request may ask of the server")
    for field in dataclasses.fields(Limits):
        group.add_argument(f"--{field.name}", type=positive_int, default=field.default, metavar="N",
                           help=f"{field.metadata['help']} (default {field.default:,})")


def limits_from_args(args) -> Limits:
    return Limits(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Limits)})


def positive_int(text: str) -> int:
    """argparse type of the limits: a positive integer (1_000 and 1000 alike)."""
    value = int(text.replace("_", ""))
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"  # what argparse calls it in "invalid positive integer value: '0'"


# --- reading the input: measured first, parsed in memory ----------------------------------------------------------


class NamedText(io.StringIO):
    """Text held in memory that esmloc's readers (`esmloc.sequences`) read as a file named `name` (their messages
    name it so): the pasted text is parsed without being written anywhere."""

    def __init__(self, text: str, name: str):
        super().__init__(text, newline="")
        self.name = name

    def __str__(self) -> str:
        return self.name


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


def _file_records(path, shown_as: str, read=sequences.read_sequences):
    """(ACC, sequence) of a FASTA or CSV file (by its name) through esmloc's own readers (which refuse binary and
    non-UTF-8 data); errors name the file as `shown_as`."""
    try:
        for record in read(path):
            yield record.acc, record.sequence
    except sequences.DataValidationError as error:
        raise InputError("; ".join(problem.replace(str(path), shown_as) for problem in error.problems)) from None
    except csv.Error as error:  # a cell over the csv module's field limit, ...
        raise InputError(f"{shown_as}: not a readable CSV file ({error})") from None


def _within_limits(records, limits: Limits) -> list[tuple[str, str]]:
    proteins = []
    for acc, sequence in records:
        if len(proteins) == limits.max_sequences:
            raise InputError(f"more than {limits.max_sequences} sequences: the demo predicts at most "
                             f"{limits.max_sequences} at a time; use esmloc-predict for files of any size")
        if len(sequence) > limits.max_residues:
            raise InputError(f"{acc}: {len(sequence):,} residues; this server reads proteins of up to "
                             f"{limits.max_residues:,} residues")
        proteins.append((acc, sequence))
    if not proteins:
        raise InputError("no sequence found in the input")
    return proteins


def upload_folder() -> Path:
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def read_upload(upload, limits: Limits = DEFAULT_LIMITS) -> list[tuple[str, str]]:
    """The proteins of an uploaded FASTA/CSV file within `limits`; the file is deleted once read, whatever it held
    (an upload is read once and leaves nothing behind). Only files in gradio's upload folder are read; InputError
    names the file by its name only."""
    path = Path(upload)
    shown = f"uploaded file {path.name}"
    if not path.resolve().is_relative_to(upload_folder()):
        raise InputError(f"{shown} is not an upload of this server")
    try:
        size = path.stat().st_size
        if size > limits.max_upload_bytes:
            raise InputError(f"{shown}: {size:,} bytes; this server reads uploads of up to "
                             f"{limits.max_upload_bytes:,} bytes: use esmloc-predict for files of any size")
        return _within_limits(_file_records(path, shown), limits)
    except FileNotFoundError:
        raise InputError(f"{shown} is no longer on the server (uploads are kept {UPLOAD_TTL_S // 60} minutes): "
                         "upload it again") from None
    finally:
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()  # gradio's folder of this upload (named by its hash)
        except OSError:
            pass  # another upload of the same content is still in it


def parse_proteins(text: str | None, upload: str | None = None, limits: Limits = DEFAULT_LIMITS
                   ) -> list[tuple[str, str]]:
    """(ACC, sequence) pairs from pasted text (FASTA when it starts with '>', else one raw sequence per line) or an
    uploaded FASTA/CSV file (by its name: .fasta/.fa/.faa/.fas/.fsa are FASTA; read once and deleted), within
    `limits`. Raises `InputError` naming the bad record, for an empty input and for anything over a limit; pasted
    text is measured before it is parsed, and parsed in memory."""
    if not isinstance(text, str | None) or not isinstance(upload, str | Path | None):
        raise InputError("the sequences must be text, and the upload a file")  # what a client may send instead
    if upload:
        return read_upload(upload, limits)
    if text and len(text) > limits.max_chars:
        raise InputError(f"{len(text):,} characters; this server reads at most {limits.max_chars:,} characters of "
                         "pasted text per request: use esmloc-predict for files of any size")
    if not (text and text.strip()):
        raise InputError("no sequence: paste one or more sequences (raw or FASTA) or upload a file")
    if text.lstrip().startswith(">"):
        return _within_limits(_file_records(NamedText(text, "pasted text"), "pasted text", sequences.read_fasta),
                              limits)
    return _within_limits(_raw_records(text), limits)


class DemoModel:
    """A saved model with everything esmloc-predict decides from its directory: thresholds, label rule, engine."""

    def __init__(self, model_dir, device="cpu", limits: Limits = DEFAULT_LIMITS):
        self.model_dir = Path(model_dir)
        self.model, self.tokenizer = loading.load_model_dir(self.model_dir, device)
        config = self.model.config
        self.names, self.multi_label = task.label_names(config), task.is_multi_label(config)
        self.thresholds, self.threshold_source = decision_thresholds(self.model_dir, config, None)
        # esmloc-predict's own words for where the threshold came from, naming the results file but not its folder.
        self.threshold_text = self.threshold_source.replace(str(self.model_dir / RESULTS_FILE), RESULTS_FILE)
        self.engine = Engine(self.model, self.tokenizer, progress=False)
        self.explainer = Explainer(self.model, self.tokenizer, max_residues_explained=limits.max_explain_residues,
                                   time_budget_s=limits.explain_time_budget_s)
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

    def describe(self) -> str:
        return (f"Model {self.model_dir.name} ({self.model.config.pooling} pooling; labels "
                f"{', '.join(self.names)}; reads {self.tokenizer.max_residues:,} residues). Decision threshold: "
                f"{self.threshold_text}.")


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


# --- the app ---------------------------------------------------------------------------------------------------


def build_app(model, device: str = "cpu", limits: Limits = DEFAULT_LIMITS):
    """The Gradio Blocks app for `model` (a model directory or a hub repository id), its queue bounded by `limits`.
    Serve it with `launch(app, limits)`, which enforces the limits on request bodies too."""
    import gradio as gr
    import pandas as pd

    demo_model = DemoModel(loading.resolve_model_dir(model), device=device, limits=limits)
    attention = demo_model.explainer.attention_pooling
    header = demo_model.header
    if demo_model.threshold_column is not None:
        header = header[:-1] + [f"threshold_{demo_model.names[1]}"] + header[-1:]
    no_explanation = (None, None, None)

    def on_predict(text, upload):
        """The page's prediction: message, table, the proteins to explain, and the upload cleared (it was read
        and deleted). Its inputs come as sent (not preprocessed): gr.File's preprocessing leaves an empty temporary
        file in gradio's cache at every call (gradio 6.31); gradio has checked that the upload's path is in its
        upload folder."""
        try:
            path = upload.get("path") if isinstance(upload, dict) else upload
            proteins = parse_proteins(text, path, limits)
        except InputError as error:
            return (f"Cannot predict: {error}", pd.DataFrame(columns=header), gr.update(choices=[], value=None), [],
                    None, "", *no_explanation)
        _, rows = demo_model.predict(proteins)
        if demo_model.threshold_column is not None:
            rows = [row[:-1] + [demo_model.threshold_column] + row[-1:] for row in rows]
        notes = [note for acc, sequence in proteins if (note := demo_model.crop_note(acc, sequence))]
        message = "\n".join([f"Predicted {len(proteins)} protein(s)."] + [f"- {note}" for note in notes])
        accs = [acc for acc, _ in proteins]
        return (message, pd.DataFrame(rows, columns=header), gr.update(choices=accs, value=accs[0]), proteins,
                None, "", *no_explanation)

    # One explanation at a time, and none waiting: it holds every core for seconds, so a second request is answered
    # at once instead of queueing (a queue of explanations would fill gradio's one queue and refuse predictions).
    explaining = threading.Lock()

    def on_explain(acc, proteins):
        """The explanation of one protein the session predicted, within the explanation limit."""
        sequence = dict(proteins or []).get(acc)
        if not sequence:
            return "Predict first, then choose a protein to explain.", *no_explanation
        seen = len(seen_positions(sequence, demo_model.tokenizer))
        if not explaining.acquire(blocking=False):
            return "Another explanation is running on this server: ask again in a few seconds.", *no_explanation
        try:
            explanation = demo_model.explainer.explain(sequence, acc=acc)
        except ExplanationLimitError as error:  # the explainer's limits are the server's (Limits)
            return f"{error}; esmloc-predict --explain explains any protein", *no_explanation
        finally:
            explaining.release()
        message = (f"{acc}: {explanation.label} log-odds {explanation.log_odds:+.2f}; occlusion scores of the "
                   f"{seen:,} residues the model sees")
        return message, *explanation_views(explanation)

    def predict(sequences: str) -> list[dict]:
        """One JSON object per protein (ACC, probability per label, predicted label), for gradio_client; the
        limits of the page apply."""
        try:
            return demo_model.api_rows(parse_proteins(sequences, limits=limits))
        except InputError as error:
            raise gr.Error(str(error), print_exception=False) from None

    predicting = {"concurrency_id": "predict", "concurrency_limit": limits.concurrency}
    with gr.Blocks(title=TITLE, delete_cache=(60, UPLOAD_TTL_S)) as app:
        gr.Markdown(f"# {TITLE}")
        # Text components only: a header, a file name or a message is never read as Markdown or HTML.
        gr.Textbox(value=f"{demo_model.describe()}\n{limits.describe()}", label="Model and limits",
                   interactive=False, elem_id="about", lines=2)
        with gr.Row():
            text = gr.Textbox(label="Sequences: raw (one per line) or FASTA", lines=8, elem_id="sequences")
            upload = gr.File(label="... or a FASTA / CSV file (ACC, Sequence)", type="filepath",
                             file_types=[".fasta", ".fa", ".faa", ".fas", ".fsa", ".csv", ".tsv"], elem_id="upload")
        button = gr.Button("Predict", variant="primary", elem_id="predict")
        message = gr.Textbox(label="Message", interactive=False, elem_id="message", lines=1, max_lines=30)
        table = gr.Dataframe(label="Predictions (probabilities as esmloc-predict writes them)", interactive=False,
                             elem_id="predictions", datatype="str")
        with gr.Row():
            chosen = gr.Dropdown(label="Protein to explain", choices=[], elem_id="chosen", scale=3)
            explain_button = gr.Button("Explain", elem_id="explain", scale=1)
        explain_message = gr.Textbox(label="Explanation", interactive=False, elem_id="explain_message")
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
        button.click(on_predict, [text, upload],
                     [message, table, chosen, state, upload, explain_message, residues, plot, weights],
                     api_name="predict_page", api_visibility="private", preprocess=False, **predicting)
        explain_button.click(on_explain, [chosen, state], [explain_message, residues, plot, weights],
                             api_name="explain", api_visibility="private", queue=False)
        gr.api(predict, api_name="predict", **predicting)
    # api_open=False: no route runs a queued event outside the queue (gradio opens them when not on a Space).
    app.queue(max_size=limits.max_queue, default_concurrency_limit=limits.concurrency, api_open=False)
    return app


class RequestSizeLimit:
    """ASGI middleware: a request whose body would exceed its route's limit (`Limits.body_limit`) is answered 413
    from its Content-Length, before any of the body is read; a body without a length (chunked) gets 411."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            declared, limit = headers.get(b"content-length"), self.limits.body_limit(scope["path"])
            refusal = None
            if declared is None and b"transfer-encoding" in headers:
                refusal = 411, "a request body needs a Content-Length on this server"
            elif declared is not None and (not declared.isdigit() or int(declared) > limit):
                refusal = 413, (f"request body of {declared.decode('latin-1')} bytes refused: this server accepts "
                                f"at most {limit:,} bytes here. {self.limits.describe()}")
            if refusal is not None:
                from starlette.responses import JSONResponse

                response = JSONResponse({"detail": refusal[1]}, status_code=refusal[0],
                                        headers={"Connection": "close"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def launch(app, limits: Limits = DEFAULT_LIMITS, **options):
    """Serves `app` (`build_app`) with `limits` enforced on every request body and upload; `options` go to
    gradio's `launch` (server_name, server_port, ...)."""
    from starlette.middleware import Middleware

    return app.launch(max_file_size=limits.max_upload_bytes,
                      app_kwargs={"middleware": [Middleware(RequestSizeLimit, limits=limits)]}, **options)


def space_app(model: str, prog: str = "python app.py"):
    """app.py's app: `build_app(model)` with the limits of the ESMLOC_* variables, and those limits. A model or a
    limit that cannot be used ends the process with one line (`PROG: error: ...`, exit status 2), through the tools'
    own wrapper (`esmloc.cli.run`)."""
    built = []

    def build(argv) -> None:
        limits = Limits.from_env()
        built.append((build_app(model, limits=limits), limits))

    status = cli.run(prog, build, [])
    if status:
        raise SystemExit(status)
    return built[0]
