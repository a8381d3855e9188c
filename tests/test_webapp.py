"""The demo app (esmloc/webapp.py): input parsing, and the running app driven through its API (gradio_client) and in
a real headless Chromium (Debian's chromium + chromium-driver through Selenium): the table equals esmloc-predict's
output, the explanation plot is drawn when asked, bad input gets a message naming the record, and what a user sent
is shown as text. tests/test_demo_hostile.py drives the server as a hostile client would."""

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from esmloc.demo import demo_rows
from esmloc.webapp import InputError, Limits, parse_proteins

from conftest import REPO, free_port


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ROWS = demo_rows(400, seed=0)
LONG = next(row for row in ROWS if len(row["Sequence"]) > 1022)
POSITIVE = next(row for row in ROWS if row["Mitochondrion"] and len(row["Sequence"]) < 300)
NEGATIVE = next(row for row in ROWS if not row["Mitochondrion"] and len(row["Sequence"]) < 300)
PROTEINS = [(row["ACC"], row["Sequence"]) for row in (POSITIVE, NEGATIVE, LONG)]
FASTA = "\n".join(f">{acc}\n{sequence}" for acc, sequence in PROTEINS)
SCREENSHOTS = os.environ.get("ESMLOC_SCREENSHOT_DIR")  # also keep the screenshots there (the README's come so)


# --- input parsing --------------------------------------------------------------------------------------------------


def test_raw_and_fasta_text_are_read_and_bad_records_are_named():
    assert parse_proteins("MKTAYIAK\n\n  mlrtsslf \n") == [("sequence_1", "MKTAYIAK"), ("sequence_2", "MLRTSSLF")]
    assert parse_proteins(">sp|P12345|X_HUMAN one\nMKTA\nYIAK\n>two\nMLR") == [("P12345", "MKTAYIAK"),
                                                                                ("two", "MLR")]
    with pytest.raises(InputError, match=r"pasted text, line 2 \(sequence_2\): character 'J' at position 3"):
        parse_proteins("MKT\nMKJL")
    with pytest.raises(InputError, match=r"pasted text, line 3, ACC 'P2': empty sequence"):
        parse_proteins(">P1\nMKT\n>P2\n>P3\nMKL")
    limit = Limits().max_sequences
    with pytest.raises(InputError, match=f"more than {limit} sequences"):
        parse_proteins("\n".join(["MKT"] * (limit + 1)))
    with pytest.raises(InputError, match="no sequence"):
        parse_proteins("  \n")
    with pytest.raises(InputError, match="5 characters; this server reads at most 4 characters"):
        parse_proteins(">P1\nM", limits=Limits(max_chars=4))
    with pytest.raises(InputError, match="P1: 5 residues; this server reads proteins of up to 4 residues"):
        parse_proteins(">P1\nMKTAY", limits=Limits(max_residues=4))
    with pytest.raises(InputError, match="the sequences must be text"):
        parse_proteins(["MKT"])


def test_an_upload_is_read_once_and_deleted_and_other_files_are_left_alone(tmp_path, monkeypatch):
    pytest.importorskip("gradio", reason="the demo needs the demo extra: pip install -e '.[demo]'")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    upload = tmp_path / "uploads" / "0a1b2c" / "mine.csv"  # where gradio puts an upload: a folder named by its hash
    upload.parent.mkdir(parents=True)
    upload.write_text("ACC,Seq\nP1,MKT\n")
    with pytest.raises(InputError, match=r"uploaded file mine.csv, line 1: missing column\(s\) \['Sequence'\]") as error:
        parse_proteins("", str(upload))
    assert str(tmp_path) not in str(error.value)
    assert not upload.exists() and not upload.parent.exists()
    upload.parent.mkdir()
    upload.write_text("ACC,Sequence\nP1,MKT\n")
    assert parse_proteins("", str(upload)) == [("P1", "MKT")] and not upload.exists()
    mine = tmp_path / "mine.fasta"  # a file of the server's disk, named as if uploaded: neither read nor deleted
    mine.write_text(">P1\nMKT\n")
    with pytest.raises(InputError, match="uploaded file mine.fasta is not an upload of this server"):
        parse_proteins("", str(mine))
    assert mine.read_text() == ">P1\nMKT\n"


# --- a trained model, esmloc-predict's answer, and the running app ------------------------------------------------


def train_demo_model(workdir: Path, architecture: str) -> Path:
    """A real train.py run (a tiny random backbone of `architecture`, frozen, cropped to 128 residues in the
    middle): test_results.json holds the tuned threshold the app must use."""
    data = workdir / "proteins.csv"
    with data.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["ACC", "Mitochondrion", "Sequence"])
        writer.writeheader()
        writer.writerows(demo_rows(80, seed=1))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(workdir / "hf_home"),
           "PYTHONPATH": ""}
    output_dir = workdir / "model"
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--from_scratch", architecture, "--train_file",
                             str(data), "--output_dir", str(output_dir), "--max_residues", "128", "--num_train_epochs",
                             "2", "--num_examples_to_show", "0"], cwd=workdir, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test_threshold_tuned" in (output_dir / "test_results.json").read_text()
    return output_dir


def predict_rows(model_dir: Path, workdir: Path) -> list[dict]:
    """esmloc-predict's rows for PROTEINS."""
    fasta = workdir / "proteins.fasta"
    fasta.write_text(FASTA + "\n")
    output = workdir / "predictions.csv"
    result = subprocess.run([sys.executable, "-m", "esmloc.commands.predict", str(model_dir), str(fasta), "-o",
                             str(output), "--no_progress"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    with output.open(newline="") as handle:
        return list(csv.DictReader(handle))


@contextlib.contextmanager
def running_demo(model_dir: Path, log_dir: Path):
    """`esmloc-demo MODEL_DIR --host 127.0.0.1 --port P` as its own process, its URL once it answers; stopped at the
    end."""
    pytest.importorskip("gradio", reason="the demo needs the demo extra: pip install -e '.[demo]'")
    port = free_port()
    log = (log_dir / "server.log").open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "no_proxy": "127.0.0.1"}
    server = subprocess.Popen([sys.executable, "-m", "esmloc.commands.demo", str(model_dir), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"the demo did not start:\n{Path(log.name).read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    assert server.returncode is not None


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    return train_demo_model(tmp_path_factory.mktemp("webapp"), "tiny")


@pytest.fixture(scope="module")
def predicted(trained_model, tmp_path_factory) -> list[dict]:
    return predict_rows(trained_model, tmp_path_factory.mktemp("predict"))


@pytest.fixture(scope="module")
def app_url(trained_model, tmp_path_factory):
    with running_demo(trained_model, tmp_path_factory.mktemp("server")) as url:
        yield url


@pytest.fixture(scope="module")
def esmc_demo(tmp_path_factory) -> dict:
    """The same on an ESM C backbone: the trained model, esmloc-predict's rows, the running demo's URL."""
    workdir = tmp_path_factory.mktemp("webapp_esmc")
    model_dir = train_demo_model(workdir, "esmc_tiny")
    assert json.loads((model_dir / "config.json").read_text())["esm_config"]["model_type"] == "esmc"
    with running_demo(model_dir, workdir) as url:
        yield {"trained_model": model_dir, "predicted": predict_rows(model_dir, workdir), "app_url": url}


@pytest.mark.slow
def test_api_endpoint_returns_esmloc_predicts_numbers(app_url, predicted):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    rows = client.predict(FASTA, api_name="/predict")
    assert [row["ACC"] for row in rows] == [row["ACC"] for row in predicted]
    for mine, theirs in zip(rows, predicted, strict=True):
        assert set(mine) == set(theirs)
        assert mine["predicted_label"] == theirs["predicted_label"]
        for column in ("probability_Other", "probability_Mitochondrion"):
            assert isinstance(mine[column], float) and mine[column] == pytest.approx(float(theirs[column]), abs=1e-6)
    with pytest.raises(Exception, match=r"line 1 \(sequence_1\): character 'J' at position 3"):
        client.predict("MKJ", api_name="/predict")


# --- in a real browser -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests need selenium (the test extra)")
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(f"no Chromium here ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium chromium-driver "
                    "(.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1500",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def submit(browser, url, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    box = WebDriverWait(browser, 60).until(lambda page: page.find_element(By.CSS_SELECTOR, "#sequences textarea"))
    box.clear()
    box.send_keys(text)
    browser.find_element(By.CSS_SELECTOR, "#predict").click()
    return WebDriverWait(browser, 120).until(lambda page: message_text(page, "message") or None)


def message_text(browser, elem_id: str) -> str:
    """The text of a message box (a read-only textbox: its value, as typed text, never rendered)."""
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").get_attribute("value").strip()


HEADER = ["ACC", "probability_Other", "probability_Mitochondrion", "threshold_Mitochondrion", "predicted_label"]


def table_rows(browser) -> list[list[str]]:
    """The prediction table's cells as the page shows them (its text, one cell a line after the header)."""
    from selenium.webdriver.common.by import By

    lines = [line.strip() for line in browser.find_element(By.CSS_SELECTOR, "#predictions").text.splitlines()]
    lines = [line for line in lines if line]
    if lines[-len(HEADER) - 1:] == HEADER or HEADER[-1] not in lines:
        return []
    cells = lines[lines.index(HEADER[-1]) + 1:]
    assert lines[lines.index(HEADER[0]):lines.index(HEADER[-1]) + 1] == HEADER
    return [cells[start:start + len(HEADER)] for start in range(0, len(cells), len(HEADER))]


def save_screenshot(browser, tmp_path, name) -> Path:
    path = tmp_path / name
    browser.save_screenshot(str(path))
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(SCREENSHOTS) / name)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["esm2", "esmc"])
def test_browser_shows_esmloc_predicts_table_and_the_explanation_plot(backbone, browser, request, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if backbone == "esm2":
        app_url, predicted, trained_model = (request.getfixturevalue(name)
                                             for name in ("app_url", "predicted", "trained_model"))
    else:
        demo = request.getfixturevalue("esmc_demo")
        app_url, predicted, trained_model = demo["app_url"], demo["predicted"], demo["trained_model"]

    message = submit(browser, app_url, FASTA)
    assert message.startswith("Predicted 3 protein(s).")
    acc, sequence = PROTEINS[2]
    assert f"{acc}: {len(sequence)} residues; the model sees 128 (middle crop): residues 65-{len(sequence) - 64} " \
           "are cropped away" in message
    rows = WebDriverWait(browser, 30).until(lambda page: len(table_rows(page)) == 3 and table_rows(page))
    threshold = json.loads((trained_model / "test_results.json").read_text())["test_threshold_tuned"]
    for shown, theirs in zip(rows, predicted, strict=True):
        # The very strings esmloc-predict wrote (6 significant digits), the tuned threshold, the same label.
        assert shown == [theirs["ACC"], theirs["probability_Other"], theirs["probability_Mitochondrion"],
                         f"{threshold:.4g}", theirs["predicted_label"]]
    # Nothing is explained until asked; then the chosen protein (the first): its residues and the plot of the scores
    # (drawn by Vega).
    assert not browser.find_elements(By.CSS_SELECTOR, "#residues .token .text")
    browser.find_element(By.CSS_SELECTOR, "#explain").click()
    residues = WebDriverWait(browser, 60).until(
        lambda page: page.find_elements(By.CSS_SELECTOR, "#residues .token .text") or None)
    assert "".join(span.text.strip() for span in residues) == PROTEINS[0][1]
    plot = WebDriverWait(browser, 60).until(
        lambda page: page.find_elements(By.CSS_SELECTOR, "#scores canvas, #scores svg.marks") or None)[0]
    assert plot.size["width"] > 200 and plot.size["height"] > 100
    path = save_screenshot(browser, tmp_path, "demo_app.png" if backbone == "esm2" else "demo_app_esmc.png")
    assert path.stat().st_size > 20_000


@pytest.mark.slow
def test_browser_shows_a_message_naming_the_bad_record(app_url, browser, tmp_path):
    message = submit(browser, app_url, ">P1\nMKTAYIAK\n>P2\n>P3\nMKJL")
    assert "Cannot predict" in message and "ACC 'P2': empty sequence" in message
    assert "Traceback" not in browser.page_source
    message = submit(browser, app_url, ">P1\nMKTAYIAK\n>P3\nMKJL")
    assert "ACC 'P3': character 'J' at position 3" in message
    save_screenshot(browser, tmp_path, "demo_app_bad_input.png")


def test_browser_shows_what_a_user_sent_as_text(app_url, browser, tmp_path):
    """FASTA headers holding Markdown and HTML, in the table, the protein list and the messages: shown as typed,
    never rendered (no element made from them)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    acc = "**P1**<b>bold</b><img_src=x>_x_"
    message = submit(browser, app_url, f">{acc}\n{PROTEINS[0][1]}")
    assert message.startswith("Predicted 1 protein(s).\n- " + f"{acc}: {len(PROTEINS[0][1])} residues; the model")
    rows = WebDriverWait(browser, 30).until(lambda page: len(table_rows(page)) == 1 and table_rows(page))
    assert rows[0][0] == acc
    chosen = browser.find_element(By.CSS_SELECTOR, "#chosen input").get_attribute("value")
    assert chosen == acc
    for elem_id in ("predictions", "chosen", "message", "about"):
        assert not browser.find_elements(By.CSS_SELECTOR, f"#{elem_id} b, #{elem_id} strong, #{elem_id} img, "
                                                          f"#{elem_id} em"), elem_id
    message = submit(browser, app_url, ">*P2*<i>x</i>\nMKJ")
    assert message == "Cannot predict: pasted text, line 1, ACC '*P2*<i>x</i>': character 'J' at position 3 is not " \
                      "a residue of the ESM-2 alphabet (LAGVSERTIDPKQNFYMHWCXBUZO)"
    assert not browser.find_elements(By.CSS_SELECTOR, "#message i, #message em")
    save_screenshot(browser, tmp_path, "demo_app_text.png")
