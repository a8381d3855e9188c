"""The demo server under hostile use (esmloc/webapp.py): a real `esmloc-demo` process on 127.0.0.1 with small limits,
driven the way a hostile client would, through every route: the page's own events called directly through the queue
(join + data), the REST routes, the upload route, raw sockets and gradio_client. Each limit on each route, uploads,
explanations, the queue, the files left on disk after many requests, and the start-up errors. Every loop is
bounded and every server is stopped at the end."""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from configuration_esmloc import ESM2_ARCHITECTURES, EsmLocConfig
from esmloc.saving import save_model
from esmloc.webapp import DemoModel, Limits
from modeling_esmloc import EsmForLocalization

from conftest import tiny_model


pytest.importorskip("gradio", reason="the demo needs the demo extra: pip install -e '.[demo]'")

LIMITS = {"max_sequences": 5, "max_chars": 5000, "max_residues": 1000, "max_upload_bytes": 20_000,
          "max_explain_residues": 50, "max_queue": 4}
WINDOW = 64  # residues the test model reads: longer proteins are cropped
TIMEOUT = 120  # seconds any one request may take


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_env(tmp: Path) -> dict:
    """The server's environment: its own temporary folders (gradio's uploads and everything else), no network."""
    for name in ("gradio", "tmp"):
        (tmp / name).mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "no_proxy": "127.0.0.1",
            "GRADIO_TEMP_DIR": str(tmp / "gradio"), "TMPDIR": str(tmp / "tmp"), "PYTHONPATH": "",
            "TOKENIZERS_PARALLELISM": "false"}


def start_server(model_dir: Path, tmp: Path, **limits):
    """`esmloc-demo MODEL_DIR --port P --max_... N` as its own process, once it answers; stop with `stop_server`."""
    port = free_port()
    options = [item for name, value in limits.items() for item in (f"--{name}", str(value))]
    log = (tmp / "server.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "esmloc.commands.demo", str(model_dir), "--host", "127.0.0.1",
                                "--port", str(port), *options], stdout=log, stderr=subprocess.STDOUT,
                               env=server_env(tmp), cwd=tmp)
    server = SimpleNamespace(process=process, port=port, url=f"http://127.0.0.1:{port}/", log=log, tmp=tmp,
                             uploads=tmp / "gradio", temp=tmp / "tmp")
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(server.url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_server(server)
            pytest.fail(f"the demo did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    with urllib.request.urlopen(server.url + "config", timeout=30) as response:
        server.config = json.load(response)
    return server


def stop_server(server):
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    server.log.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model(tiny_model(max_residues=WINDOW), tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    server = start_server(model_dir, tmp_path_factory.mktemp("server"), **LIMITS)
    try:
        yield server
    finally:
        stop_server(server)


# --- a hostile client: raw HTTP ------------------------------------------------------------------------------------


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, body text) of one HTTP request."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        connection.request(method, path, body, headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def post_json(server, path: str, payload) -> tuple[int, str]:
    return request(server, "POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"})


def fn_index(server, api_name: str) -> int:
    return next(d["id"] for d in server.config["dependencies"] if d.get("api_name") == api_name)


def component(server, elem_id: str) -> dict:
    return next(c for c in server.config["components"] if c.get("props", {}).get("elem_id") == elem_id)


def join(server, api_name: str, data: list, session: str | None = None) -> tuple[int, str, str]:
    """Puts an event on the queue as the page does (fn_index, session_hash): (status, answer, session)."""
    session = session or uuid.uuid4().hex[:12]
    status, text = post_json(server, "/gradio_api/queue/join",
                             {"data": data, "fn_index": fn_index(server, api_name), "session_hash": session,
                              "event_data": None, "trigger_id": None})
    return status, text, session


def results(server, session: str, count: int = 1) -> list[dict]:
    """The `process_completed` messages of the session's next `count` events (the queue's event stream)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    done = []
    try:
        connection.request("GET", f"/gradio_api/queue/data?session_hash={session}")
        stream = connection.getresponse()
        assert stream.status == 200
        while len(done) < count:
            line = stream.readline()
            assert line, f"the event stream ended after {len(done)} of {count} results"
            if line.startswith(b"data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    done.append(message)
    finally:
        connection.close()
    return done


def call(server, api_name: str, data: list, session: str | None = None) -> tuple[dict, str]:
    """One page event through the queue: (its completion message, session)."""
    status, text, session = join(server, api_name, data, session)
    assert status == 200, text
    return results(server, session)[0], session


def predict_page(server, text: str, upload=None, session=None) -> tuple[list, str]:
    """The page's Predict button: (its outputs: message, table, choices, state, upload, ..., session)."""
    message, session = call(server, "predict_page", [text, upload], session)
    assert message["success"], message
    return message["output"]["data"], session


def explain(server, acc: str, session: str) -> list:
    """The page's Explain button, called as the page calls it (outside the queue): its outputs."""
    status, text = post_json(server, "/gradio_api/run/explain",
                             {"data": [acc, None], "fn_index": fn_index(server, "explain"), "session_hash": session})
    assert status == 200, text
    return json.loads(text)["data"]


def api_predict(server, text: str):
    """The documented API, through gradio_client: the rows, or the error it raises."""
    from gradio_client import Client

    client = Client(server.url, verbose=False)
    try:
        return client.predict(text, api_name="/predict")
    except Exception as error:  # noqa: BLE001 (the client's error is the answer under test)
        return error


def upload(server, name: str, content: bytes) -> tuple[int, str]:
    """POST /gradio_api/upload (multipart, as the page sends a file): (status, answer)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return request(server, "POST", "/gradio_api/upload", body,
                   {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def file_data(path: str, name: str) -> dict:
    return {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def files_under(*folders: Path) -> dict[Path, int]:
    return {path: path.stat().st_size for folder in folders for path in folder.rglob("*") if path.is_file()}


def server_rss(server) -> int:
    import psutil

    return psutil.Process(server.process.pid).memory_info().rss


def fasta(*records: tuple[str, str]) -> str:
    return "\n".join(f">{acc}\n{sequence}" for acc, sequence in records)


PROTEIN = "MLRTSSLFTRRVQPSLFSRNILRLQSTAAIPKAGLEVSSGK"  # 41 residues: inside the window and the explanation limit


# --- limits, stated and enforced -----------------------------------------------------------------------------------


def test_the_page_states_the_limits(server):
    about = component(server, "about")["props"]["value"]
    for stated in ("5 proteins", "5,000 characters", "1,000 residues per protein", "uploads of 20,000 bytes",
                   "proteins of up to 50 residues"):
        assert stated in about, about


BODY_ROUTES = ["/gradio_api/queue/join", "/gradio_api/call/predict", "/gradio_api/call/v2/predict",
               "/gradio_api/run/predict", "/gradio_api/run/explain", "/gradio_api/upload"]


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_a_body_over_the_limit_is_refused_before_it_is_read(server, path):
    """A request announcing 50 MB gets its answer (413, naming the limits) before it has sent them: the server reads
    none of it. Without the limit, the server waits for the 50 MB."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       f"Content-Length: 50000000\r\n\r\n".encode() + b'{"data": ["' + b"M" * 1000)
        answer = b""
        try:
            while b"}" not in answer:
                chunk = client.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            pytest.fail(f"no answer within 10 s: the server is reading the 50 MB body ({answer[:200]!r})")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    detail = json.loads(body)["detail"]
    assert "request body of 50000000 bytes refused" in detail and "5,000 characters" in detail


def test_a_50_mb_request_costs_the_server_no_memory(server):
    """The whole 50 MB sent by a client that sends it all (httpx reads the early answer): refused, the server's memory
    unchanged (it grew by 200 MB and the text was predicted before the limit)."""
    import httpx

    before = server_rss(server)
    body = json.dumps({"data": ["M" * 50_000_000]}).encode()
    try:
        status = httpx.post(server.url + "gradio_api/call/predict", content=body, timeout=TIMEOUT,
                            headers={"Content-Type": "application/json"}).status_code
    except httpx.TransportError:  # the server closed the connection after its answer, before the client had sent all
        status = 413
    assert status == 413
    assert server_rss(server) - before < 20 * 2**20


def test_a_body_without_a_length_is_refused(server):
    """Chunked bodies would have no length to check in advance."""
    def chunks():
        yield b'{"data": ["MKT"]}'

    status, text = request(server, "POST", "/gradio_api/call/predict", chunks(),
                           {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    assert status == 411 and "Content-Length" in text


OVER_LIMITS = {
    "characters": ("M" * 5001, "5,001 characters; this server reads at most 5,000 characters of pasted text"),
    "sequences": ("\n".join(["MKT"] * 6), "more than 5 sequences"),
    "residues": (fasta(("long", "M" * 1001)), "long: 1,001 residues; this server reads proteins of up to 1,000"),
    "empty": ("  \n", "no sequence: paste one or more sequences"),
    "bad residue": (fasta(("P1", "MKJ")), "pasted text, line 1, ACC 'P1': character 'J' at position 3"),
}


@pytest.mark.parametrize("case", OVER_LIMITS)
def test_the_page_refuses_what_is_over_a_limit_with_a_message(server, case):
    text, expected = OVER_LIMITS[case]
    outputs, _ = predict_page(server, text)
    assert outputs[0].startswith("Cannot predict: ") and expected in outputs[0], outputs[0]
    assert outputs[1]["data"] == [] and outputs[2]["choices"] == []


@pytest.mark.parametrize("case", OVER_LIMITS)
def test_the_api_refuses_what_is_over_a_limit_with_a_clear_error(server, case):
    text, expected = OVER_LIMITS[case]
    error = api_predict(server, text)
    assert isinstance(error, Exception) and expected in str(error), error


def test_proteins_longer_than_the_window_are_cropped_and_said(server):
    outputs, _ = predict_page(server, fasta(("P1", PROTEIN), ("long", "M" + "A" * 999)))
    assert outputs[0].startswith("Predicted 2 protein(s).")
    assert f"long: 1000 residues; the model sees {WINDOW} (middle crop)" in outputs[0]
    rows = api_predict(server, fasta(("P1", PROTEIN), ("long", "M" + "A" * 999)))
    assert [row["ACC"] for row in rows] == ["P1", "long"]


def test_queued_events_cannot_skip_the_queue(server):
    """The REST routes that run an event directly refuse the queued ones (gradio opens them off a Space), so neither
    the page's Predict nor the API gets around the queue's size and concurrency limits."""
    for api_name in ("predict_page", "predict"):
        status, text = post_json(server, f"/gradio_api/run/{api_name}",
                                 {"data": ["MKT", None][:2 if api_name == "predict_page" else 1],
                                  "session_hash": uuid.uuid4().hex[:12]})
        assert status == 404 and "join the queue" in text, (api_name, status, text[:300])


def test_the_queue_is_bounded(server):
    """More joins than the queue holds, at once from one client: the extra ones are refused (503, 'Queue is full')
    and every accepted one is answered."""
    session = uuid.uuid4().hex[:12]
    text = fasta(*[(f"P{i}", PROTEIN * 20) for i in range(5)])
    statuses = []
    for _ in range(30):
        status, answer, _ = join(server, "predict_page", [text, None], session)
        statuses.append(status)
        if status == 503:
            assert "Queue is full. Max size is 4" in answer
    assert 503 in statuses, statuses
    completed = results(server, session, statuses.count(200))
    assert all(message["success"] for message in completed)


# --- explanations --------------------------------------------------------------------------------------------------


def test_explanations_run_only_when_asked_and_within_their_limit(server):
    outputs, session = predict_page(server, fasta(("P1", PROTEIN), ("P2", PROTEIN + "A" * 20)))
    assert outputs[-3:] == [None, None, None]  # predicting explains nothing
    message, highlighted, scores, _ = explain(server, "P1", session)
    assert message.startswith("P1: Mitochondrion log-odds") and f"{len(PROTEIN)} residues" in message
    assert "".join(token["token"] for token in highlighted) == PROTEIN and len(scores["data"]) == len(PROTEIN)
    message, *views = explain(server, "P2", session)
    assert message == (f"P2: {len(PROTEIN) + 20} residues are more than the 50 residues explanations are limited to "
                       "(max_residues_explained); esmloc-predict --explain explains any protein")
    assert views == [None, None, None]


def test_the_explanation_event_called_directly_explains_only_what_the_session_predicted(server):
    """A client calling the explanation event itself, without predicting first or naming a protein its session
    never sent, gets an error or a message, and no computation."""
    message, *views = explain(server, None, uuid.uuid4().hex[:12])
    assert message == "Predict first, then choose a protein to explain." and views == [None, None, None]
    _, predicted = predict_page(server, fasta(("P1", PROTEIN)))
    for acc, session in (("P1", uuid.uuid4().hex[:12]), ("NOT_PREDICTED", predicted)):
        status, text = post_json(server, "/gradio_api/run/explain",
                                 {"data": [acc, None], "fn_index": fn_index(server, "explain"),
                                  "session_hash": session})
        assert status == 500 and f"Value: {acc} is not in the list of choices" in json.loads(text)["error"]


def test_the_explainer_enforces_the_servers_explanation_limits(tmp_path):
    """The explanation limits are the explainer's own (one place decides): its length limit and time budget."""
    demo = DemoModel(save_model(tiny_model(max_residues=64), tmp_path / "model"),
                     limits=Limits(max_explain_residues=7, explain_time_budget_s=3))
    assert (demo.explainer.max_residues_explained, demo.explainer.time_budget_s) == (7, 3)


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """A server whose model (ESM-2 8M's architecture, random weights) reads 1,022 residues and explains them all: one
    explanation of a 1,022-residue protein takes seconds (about 48 forward passes)."""
    config = EsmLocConfig(esm_config=dict(ESM2_ARCHITECTURES["esm2_t6_8M"]), max_residues=1022)
    model = save_model(EsmForLocalization(config).eval(), tmp_path_factory.mktemp("model1022") / "model")
    server = start_server(model, tmp_path_factory.mktemp("slow_server"), max_explain_residues=1022)
    try:
        yield server
    finally:
        stop_server(server)


def test_an_explanation_starves_neither_predictions_nor_the_queue(slow_server):
    """Two explanations asked at once: one runs, the other is answered at once (busy) instead of waiting; a
    prediction asked then is answered before the explanation ends (explanations neither wait in the prediction
    queue nor fill it)."""
    long_protein = (PROTEIN * 60)[:1022]
    _, session = predict_page(slow_server, fasta(("long", long_protein)))
    answers = []

    def explanation():
        outputs = explain(slow_server, "long", session)
        answers.append((time.monotonic(), outputs))

    threads = [threading.Thread(target=explanation) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 300
        while not answers and time.monotonic() < deadline:
            time.sleep(0.05)
        busy_at, (message, *views) = answers[0]
        assert message.startswith("Another explanation is running on this server"), message
        assert views == [None, None, None]
        rows = api_predict(slow_server, fasta(("P1", PROTEIN)))
        predicted_at = time.monotonic()
        assert rows[0]["ACC"] == "P1"
    finally:
        for thread in threads:
            thread.join(timeout=600)
    explained_at, (message, *views) = answers[1]
    assert message.startswith("long: ") and len(views[1]["data"]) == len(long_protein)
    assert busy_at < predicted_at < explained_at, "the prediction waited for the explanation"


# --- uploads ---------------------------------------------------------------------------------------------------


def test_an_upload_is_read_once_and_deleted(server):
    content = fasta(("P1", PROTEIN), ("P2", PROTEIN[::-1])).encode()
    status, text = upload(server, "mine.fasta", content)
    assert status == 200, text
    path = json.loads(text)[0]
    assert Path(path).is_file() and Path(path).is_relative_to(server.uploads)
    outputs, _ = predict_page(server, "", file_data(path, "mine.fasta"))
    assert outputs[0] == "Predicted 2 protein(s)." and [row[0] for row in outputs[1]["data"]] == ["P1", "P2"]
    assert outputs[4] is None  # the page's upload is cleared: the file is gone
    assert not Path(path).exists() and not Path(path).parent.exists()
    outputs, _ = predict_page(server, "", file_data(path, "mine.fasta"))
    assert "is no longer on the server" in outputs[0] or not outputs[1]["data"]


@pytest.mark.parametrize("size, refused_by", [(200_000, "request body of"), (30_000, "File size exceeded")])
def test_an_upload_over_the_limit_is_refused_and_not_kept(server, size, refused_by):
    """Over the body limit: refused from its length; under it but over the file limit: gradio stops writing it and
    removes what it wrote."""
    before = files_under(server.uploads, server.temp)
    status, text = upload(server, "big.fasta", b">P1\n" + b"M" * size)
    assert status == 413 and refused_by in text, (status, text[:300])
    assert files_under(server.uploads, server.temp) == before


@pytest.mark.parametrize("name, content, expected", [
    ("binary.fasta", bytes(range(256)) * 4, "uploaded file binary.fasta: binary data (a NUL byte at offset 0)"),
    ("latin1.csv", "ACC,Sequence\nPé,MKT\n".encode("latin-1"), "uploaded file latin1.csv: not UTF-8 text (byte 0xe9"),
    ("empty.fasta", b"", "no sequence found in the input"),
    ("cells.csv", b"ACC,Sequence\nP1,MKT\nP2,MKJ\n", "uploaded file cells.csv, line 3, ACC 'P2': character 'J'"),
    ("huge_cell.csv", b"ACC,Sequence\nP1," + b"M" * 19_000 + b"\n", "P1: 19,000 residues; this server reads"),
])
def test_every_bad_upload_gets_a_message(server, name, content, expected):
    status, text = upload(server, name, content)
    assert status == 200, text
    path = json.loads(text)[0]
    outputs, _ = predict_page(server, "", file_data(path, name))
    assert expected in outputs[0] and "Traceback" not in outputs[0], outputs[0]
    assert not Path(path).exists()


def test_a_path_outside_the_upload_folder_is_neither_read_nor_deleted(server, tmp_path):
    """A client naming a file of the server's disk as its upload: gradio refuses it; the file is untouched."""
    secret = tmp_path / "secret.fasta"
    secret.write_text(">SECRET_ACC\nMKT\n")
    message, _ = call(server, "predict_page", ["", file_data(str(secret), "secret.fasta")])
    assert "SECRET_ACC" not in json.dumps(message)
    assert secret.read_text() == ">SECRET_ACC\nMKT\n"


# --- nothing left behind -------------------------------------------------------------------------------------------


def test_no_request_leaves_a_file_behind(server):
    """Many requests of every kind (pasted raw and FASTA text, uploads predicted, bad uploads, the API,
    explanations, refusals): not one file more in the server's temporary folders once they are answered."""
    rounds = 20
    before = files_under(server.uploads, server.temp)
    for index in range(rounds):
        outputs, session = predict_page(server, f">P{index} **round {index}**\n{PROTEIN}")
        assert outputs[0] == "Predicted 1 protein(s)."
        assert explain(server, f"P{index}", session)[0].startswith(f"P{index}: ")
        predict_page(server, f"{PROTEIN}\n{PROTEIN[::-1]}")
        predict_page(server, "M" * 5001)
        for name, content in ((f"round{index}.fasta", fasta((f"U{index}", PROTEIN)).encode()),
                              (f"round{index}.csv", b"\x00\x01binary")):
            status, text = upload(server, name, content)
            assert status == 200, text
            predict_page(server, "", file_data(json.loads(text)[0], name))
        assert api_predict(server, fasta((f"A{index}", PROTEIN)))[0]["ACC"] == f"A{index}"
    after = files_under(server.uploads, server.temp)
    new = {str(path): size for path, size in after.items() if path not in before}
    print(f"{rounds * 7} requests: {len(new)} new files, {sum(new.values())} bytes")
    assert new == {}


# --- everything shown is text ------------------------------------------------------------------------------------


def test_every_component_showing_user_input_or_messages_is_text(server):
    """The page's outputs are text components (no Markdown or HTML component, the table's cells plain strings);
    tests/test_webapp.py checks what a browser shows."""
    by_id = {c["id"]: c for c in server.config["components"]}
    for api_name in ("predict_page", "explain"):
        dependency = next(d for d in server.config["dependencies"] if d.get("api_name") == api_name)
        types = {by_id[output]["type"] for output in dependency["outputs"]}
        assert not types & {"markdown", "html"}, types
    table = component(server, "predictions")["props"]
    assert table["datatype"] == "str" or set(table["datatype"]) == {"str"}
    outputs, _ = predict_page(server, fasta(("**P1**<b>bold</b>", PROTEIN)))
    assert outputs[1]["data"][0][0] == "**P1**<b>bold</b>"


# --- start-up errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, expected", [
    (["--max_chars", "0"], "argument --max_chars: invalid positive integer value: '0'"),
    (["--max_queue", "lots"], "argument --max_queue: invalid positive integer value: 'lots'"),
    (["--max_sequences", "1_000"], "no such directory"),  # a limit written 1_000 is read; then the model is missing
])
def test_a_limit_that_cannot_be_used_is_one_line_and_exit_2(options, expected, tmp_path, capsys):
    """(tests/test_cli.py checks esmloc-demo's model directory errors.)"""
    from esmloc.commands import demo

    assert demo.main([str(tmp_path / "no_model"), *options]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("esmloc-demo: error: ") and expected in error[-1], error


@pytest.mark.parametrize("model, variable, value, expected", [
    ("nowhere/at-all/x", None, None, "python app.py: error: model nowhere/at-all/x: no such directory"),
    (None, "ESMLOC_MAX_CHARS", "lots", "python app.py: error: ESMLOC_MAX_CHARS='lots': not a positive integer"),
])
def test_the_space_app_says_what_cannot_be_used_in_one_line(model_dir, monkeypatch, capsys, model, variable, value,
                                                           expected):
    """app.py's `space_app(MODEL)` (tests/test_space.py runs app.py itself)."""
    from esmloc.webapp import space_app

    if variable:
        monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_:
        space_app(model or str(model_dir))
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [expected]
