"""Publishing a trained model: the exact set of files a hub repository gets, and the push.

(The command `esmloc-push OUTPUT_DIR --hub_model_id user/name` is esmloc.commands.push.)

`files_to_push` is an explicit allow-list: a repository gets a complete, self-contained model (config with a local
`auto_map`, the three remote-code files, weights, tokenizer, card, metrics, plots) and never a checkpoint folder or a
pickle. `push_output_dir` makes one commit of exactly those files and the model card (`esmloc.card`) to the endpoint
given (`--hub_endpoint`, else `HF_ENDPOINT`, else the Hub); the token comes from the usual login or `HF_TOKEN` and is
never printed, logged or written: huggingface_hub's errors never carry it (they name the URL and the server's
message, and its debug output masks the authorization header), and the server's message, which an endpoint may make
an echo of the request's headers, reaches a failure message only through `esmloc.cli.redact_secrets`;
tests/test_publish.py checks both against real local servers.
"""

import logging
import os
from pathlib import Path

# huggingface_hub 2's HTTP client: a request that gets no answer raises its errors (HfHubHTTPError, an answer with an
# error status, is one of them too).
import httpx2
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub import constants as hub_constants

from esmloc import cli, loading
from esmloc.errors import InputError
from esmloc.saving import MODEL_FILES, OPTIONAL_TOKENIZER_FILES, REMOTE_CODE_FILES, TOKENIZER_FILES
# The card's names, here too for compatibility: they were esmloc.publish's before esmloc.card existed.
from esmloc.card import (  # noqa: F401
    CARD_FILE,
    CARD_KINDS,
    CARD_MARKER,
    DEFAULT_LICENSE,
    PublishError,
    render_model_card,
    template_path,
    write_model_card,
)
from esmloc.run_files import (  # noqa: F401
    ADAPTER_DIR,
    ADAPTER_FILES,
    PREDICTIONS_FILE,
    RUN_INFO_FILE,
    RunRecord,
    as_hub_model_id,
)


logger = logging.getLogger("esmloc.publish")

PUSH_TARGETS = CARD_KINDS
# The run's record: pushed when present. trainer_state.json holds the per-epoch validation log the card shows.
RECORD_FILES = (RUN_INFO_FILE, "trainer_state.json", PREDICTIONS_FILE)
RESULTS_SUFFIX = "_results.json"
# Never pushed, whatever the allow-list says: pickles (arbitrary code on load) and optimizer/trainer state.
NEVER_PUSHED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")


# --- what a repository gets ----------------------------------------------------------------------------------------


def files_to_push(output_dir, what: str = "merged") -> dict[str, Path]:
    """The files a hub repository gets from `output_dir`, as {path in the repository: local path}, sorted.

    An explicit allow-list: `config.json`, `model.safetensors` (merged) or `adapter_config.json` +
    `adapter_model.safetensors` from `adapter/` (adapter), the three remote-code files, the tokenizer files, the card
    `README.md`, `*_results.json`, `run_info.json`, `trainer_state.json`, `test_predictions.csv` and the plots
    (`*.png`). Checkpoint folders, pickles (`*.bin`, `*.pt`, `*.pth`, `*.pkl`, ...) and anything else stay local.
    Raises `PublishError` when a file a loadable model needs is missing. The card itself may be missing (the push
    renders it).
    """
    if what not in CARD_KINDS:
        raise ValueError(f"what must be one of {CARD_KINDS}, got {what!r}")
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise PublishError(f"{output_dir} is not a directory")
    if what == "merged":
        try:  # a stock ESM-2 save or a truncated weights file: said before anything is uploaded
            loading.check_model_dir(output_dir)
        except InputError as error:
            raise PublishError(str(error)) from None
    files = {}
    required = (*MODEL_FILES[:1], *REMOTE_CODE_FILES, *TOKENIZER_FILES)
    if what == "merged":
        required = (*required, MODEL_FILES[1])
    else:
        adapter_dir = output_dir / ADAPTER_DIR
        missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
        if missing:
            raise PublishError(f"{adapter_dir} lacks {', '.join(missing)}: only --finetune lora runs have an adapter")
        files.update({name: adapter_dir / name for name in ADAPTER_FILES})
    missing = [name for name in required if not (output_dir / name).is_file()]
    if missing:
        raise PublishError(f"{output_dir} is not a complete saved esmloc model: missing {', '.join(missing)}")
    optional = [*OPTIONAL_TOKENIZER_FILES, *RECORD_FILES]
    optional += sorted(path.name for path in output_dir.glob(f"*{RESULTS_SUFFIX}"))
    optional += sorted(path.name for path in output_dir.glob("*.png"))
    for name in (*required, *optional):
        if (output_dir / name).is_file():
            files[name] = output_dir / name
    card = (output_dir / ADAPTER_DIR / CARD_FILE) if what == "adapter" else (output_dir / CARD_FILE)
    if card.is_file():
        files[CARD_FILE] = card
    for name in files:
        if name.endswith(NEVER_PUSHED_SUFFIXES) or "/" in name:
            raise PublishError(f"refusing to push {name}")  # a guard against future edits of the allow-list
    return dict(sorted(files.items()))


def card_for_push(output_dir, repo_id: str, what: str = "merged", endpoint: str | None = None,
                  **card_options) -> bytes:
    """The README.md a push sends.

    The card rendered for `repo_id` (its loading code names the repository) when the output directory's card is the
    one `write_model_card` wrote, unedited, or is missing (or, for the adapter, is PEFT's blank template); a card
    edited or written by hand is sent as it is. The local file is never changed."""
    output_dir = Path(output_dir)
    local = (output_dir / ADAPTER_DIR / CARD_FILE) if what == "adapter" else (output_dir / CARD_FILE)
    if local.is_file():
        text = local.read_text(encoding="utf-8")
        generated = CARD_MARKER in text and text.strip() == str(render_model_card(output_dir, what=what)).strip()
        peft_template = what == "adapter" and CARD_MARKER not in text
        if not (generated or peft_template):
            logger.info("%s was edited or written by hand: pushing it as it is", local)
            return local.read_bytes()
    card = render_model_card(output_dir, what=what, repo_id=repo_id, endpoint=endpoint, **card_options)
    return (str(card).rstrip("\n") + "\n").encode("utf-8")


# --- the push ------------------------------------------------------------------------------------------------------


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The endpoint a push goes to: `endpoint`, else `HF_ENDPOINT` (read now, not at import), else the Hub."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or hub_constants.ENDPOINT).rstrip("/")


# What a failed model push leaves as it was, and how to retry (the end of every failure message).
MODEL_UNCHANGED = "The local output directory is unchanged: push it again with esmloc-push."


def failure_message(error: Exception, endpoint: str, repo_id: str, unchanged: str, token: str | None = None) -> str:
    """Why a push failed, what to check and `unchanged`; whatever the endpoint answered, no token (`token`, HF_TOKEN,
    the token file's) is in it: an endpoint may echo the request's Authorization header in its error text."""
    where = f"pushing to {endpoint}/{repo_id} failed"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(status, int):
        server = getattr(error, "server_message", None) or ""
        detail = f"HTTP {status}" + (f": {server.strip()}" if server.strip() else "")
        hints = {
            401: "the endpoint did not accept the credentials: log in with `hf auth login` or set HF_TOKEN to a token "
                 "with write access",
            403: f"the token may be read-only, or may not allow writing to the namespace {repo_id.split('/')[0]!r}",
            404: "the endpoint has no such repository or no upload API (mirrors such as hf-mirror.com are read-only: "
                 "push to https://huggingface.co, i.e. unset HF_ENDPOINT or pass --hub_endpoint)",
            405: "the endpoint does not accept uploads (a read-only mirror?): push to https://huggingface.co",
            429: "the endpoint is rate limiting: wait and push again",
        }
        hint = hints.get(status, "check the endpoint, the repository id and the token's write access")
    elif isinstance(error, (httpx2.HTTPError, OSError)):
        detail = f"{type(error).__name__}: {error}"
        hint = "the endpoint could not be reached: check the network, a proxy, and HF_ENDPOINT / --hub_endpoint"
    elif isinstance(error, ValueError):
        detail = f"{type(error).__name__}: {error}"
        hint = "check the repository id (user/name or org/name)"
    else:
        detail = type(error).__name__
        hint = "check the endpoint, the repository id and the token's write access"
    return cli.redact_secrets(f"{where} ({detail}); {hint}. The token is never shown. {unchanged}", token)


def push_output_dir(
    output_dir,
    repo_id: str,
    private: bool | None = False,
    endpoint: str | None = None,
    token: str | None = None,
    what: str = "merged",
    api: HfApi | None = None,
    commit_message: str | None = None,
    card_options: dict | None = None,
) -> str:
    """Pushes a run's output directory to the hub repository `repo_id` in ONE commit; returns the repository URL.

    `what="merged"` pushes the model (`files_to_push(output_dir, "merged")`), `what="adapter"` the LoRA adapter
    with its own card naming the base model. The endpoint is `endpoint`, else `HF_ENDPOINT`, else the Hub; the token
    is `token`, else the standard login / `HF_TOKEN`. The repository is created if needed (`private` applies to a new
    repository; a request for a private push into an existing public one is refused). Any failure raises
    `PublishError` with a message naming the endpoint, the repository and what to check, never the token; the output
    directory is never modified.
    """
    output_dir = Path(output_dir)
    endpoint = resolve_endpoint(endpoint)
    card_options = card_options or {}
    if as_hub_model_id(repo_id) != repo_id:
        raise PublishError(f"--hub_model_id must be a full repository id, user/name or org/name, got {repo_id!r}")
    files = files_to_push(output_dir, what)
    if what == "adapter":
        base = RunRecord(output_dir).base_model or ""
        if not (card_options.get("base_model") or as_hub_model_id(base) or Path(base).expanduser().is_dir()):
            raise PublishError(
                f"the adapter of {output_dir} cannot be used without its base model, and the run started from "
                f"{base or 'an unrecorded base'!s}, which cannot be loaded by name: push the merged model instead")
    readme = card_for_push(output_dir, repo_id, what, endpoint, **card_options)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=readme if name == CARD_FILE else str(path))
        for name, path in files.items()
    ]
    if CARD_FILE not in files:
        operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=readme))
    operations.sort(key=lambda operation: operation.path_in_repo)
    logger.info("Pushing %d files of %s (%s) to %s/%s", len(operations), output_dir, what, endpoint, repo_id)

    commit_message = commit_message or f"Upload esmloc {'LoRA adapter' if what == 'adapter' else 'model'}"
    return commit_to_hub(repo_id, operations, commit_message, private=private, endpoint=endpoint, token=token, api=api)


def commit_to_hub(
    repo_id: str,
    operations: list[CommitOperationAdd],
    commit_message: str,
    *,
    repo_type: str = "model",
    private: bool | None = False,
    endpoint: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
    unchanged: str = MODEL_UNCHANGED,
) -> str:
    """Creates the repository if needed and makes ONE commit of `operations`; returns the repository URL.

    The push of both a model (`push_output_dir`) and a dataset (`esmloc.dataset_hub.push_dataset_dir`). The
    endpoint is `endpoint`, else `HF_ENDPOINT`, else the Hub. `private` applies to a new repository; a private push
    into an existing public one is refused. Any failure raises `PublishError` naming the endpoint and repository,
    what to check and `unchanged` (what was left as it was, how to retry), never the token."""
    endpoint = resolve_endpoint(endpoint)
    url = f"{endpoint}/{'' if repo_type == 'model' else f'{repo_type}s/'}{repo_id}"
    try:
        api = api if api is not None else HfApi(endpoint=endpoint, token=token or None)
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        if private:
            visibility = api.repo_info(repo_id, repo_type=repo_type)
            if getattr(visibility, "private", None) is False:
                raise PublishError(
                    f"{url} already exists and is public, but a private push was asked for: make it private first "
                    f"(or choose another repository id). Nothing was pushed. {unchanged}")
        api.create_commit(repo_id, operations=operations, commit_message=commit_message, repo_type=repo_type)
    except PublishError:
        raise
    except (httpx2.HTTPError, OSError, ValueError) as error:
        raise PublishError(failure_message(error, endpoint, repo_id, unchanged, token)) from None
    logger.info("Pushed to %s", url)
    return url
