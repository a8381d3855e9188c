"""The files of a Hugging Face Space (Gradio) that serves a pushed esmloc model, and their push.

    esmloc-push out/ --hub_model_id you/esmloc-mito --space you/esmloc-mito-demo    # the model, then its Space
    python -m esmloc.space you/esmloc-mito --output_dir space/                       # the files, to look at first

A Space gets:
- `app.py`: the repository's top-level `app.py` (shipped in the package as `esmloc/space_app.py`), with its one
  `MODEL = os.environ.get("ESMLOC_MODEL", ...)` line pointing at the model repository;
- `README.md`: the Space card, whose front matter (`sdk: gradio`, `app_file: app.py`, `models: [model repo]`) makes
  the Hub list the Space on the model's page;
- `requirements.txt`: esmloc's own requirements and those of its `demo` extra, read from the installed package;
- the code `app.py` runs: the `esmloc` package and the three model modules, as installed here (esmloc need not be
  on a package index for the Space to build).
"""

import re
import sys
from importlib import metadata, resources
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, SpaceCard, SpaceCardData

from esmloc import cli


TEMPLATE = "space_app.py"
MODEL_LINE = re.compile(r'^MODEL = os\.environ\.get\("ESMLOC_MODEL", "[^"\n]*"\)$', re.MULTILINE)
MODEL_MODULES = ("configuration_esmloc", "modeling_esmloc", "tokenization_esmloc")
PACKAGE_FILES = ("*.py", "metrics/*.py", "model_card.md")
DEMO_EXTRA = "demo"


def app_source(model_repo_id: str) -> str:
    """The Space's app.py: the template with MODEL set to `model_repo_id`."""
    template = resources.files("esmloc").joinpath(TEMPLATE).read_text(encoding="utf-8")
    if len(MODEL_LINE.findall(template)) != 1:
        raise RuntimeError(f"esmloc/{TEMPLATE} must hold exactly one line {MODEL_LINE.pattern!r}")
    return MODEL_LINE.sub(lambda _: f'MODEL = os.environ.get("ESMLOC_MODEL", "{model_repo_id}")', template)


def requirements() -> str:
    """requirements.txt: the installed esmloc's requirements, with those of the `demo` extra."""
    lines = []
    for requirement in metadata.requires("esmloc") or []:
        name, _, marker = requirement.partition(";")
        if not marker or re.search(rf"""extra\s*==\s*["']{DEMO_EXTRA}["']""", marker):
            lines.append(name.strip())
    return "\n".join(lines) + "\n"


def space_card(model_repo_id: str, space_id: str | None = None, endpoint: str = "https://huggingface.co") -> str:
    """README.md of the Space: front matter pointing at the model repository, and a short description."""
    import gradio

    name = (space_id or model_repo_id).split("/")[-1]
    data = SpaceCardData(title=name, sdk="gradio", sdk_version=gradio.__version__, app_file="app.py",
                         models=[model_repo_id], license="apache-2.0", pinned=False, emoji="🧬",
                         colorFrom="green", colorTo="blue", short_description="Protein subcellular localisation")
    body = (f"# {name}\n\nAn interactive demo of [{model_repo_id}]({endpoint.rstrip('/')}/{model_repo_id}), an "
            "esmloc model (ESM-2 fine-tuned for protein subcellular localisation): paste protein sequences (raw or "
            "FASTA) or upload a FASTA file to get the probability of each label, the predicted label at the model's "
            "tuned threshold, and a per-residue explanation.\n\nScript it with `gradio_client`: "
            f'`Client("{space_id or "<this space>"}").predict(">P1\\nMLRTSSLF...", api_name="/predict")`.\n')
    return str(SpaceCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _package_sources() -> dict[str, Path]:
    package = Path(str(resources.files("esmloc")))
    files = {}
    for pattern in PACKAGE_FILES:
        for path in sorted(package.glob(pattern)):
            if path.is_file() and path.name != TEMPLATE:
                files[f"esmloc/{path.relative_to(package).as_posix()}"] = path
    for module in MODEL_MODULES:
        files[f"{module}.py"] = Path(sys.modules[module].__file__ if module in sys.modules
                                     else __import__(module).__file__)
    return files


def space_files(model_repo_id: str, space_id: str | None = None, endpoint: str = "https://huggingface.co"
                ) -> dict[str, bytes]:
    """{path in the Space repository: content} for a Space serving `model_repo_id`."""
    files = {name: path.read_bytes() for name, path in _package_sources().items()}
    files["app.py"] = app_source(model_repo_id).encode("utf-8")
    files["requirements.txt"] = requirements().encode("utf-8")
    files["README.md"] = space_card(model_repo_id, space_id, endpoint).encode("utf-8")
    return dict(sorted(files.items()))


def write_space(model_repo_id: str, output_dir, space_id: str | None = None) -> Path:
    """Writes the Space's files into `output_dir` (to look at, or to push by hand)."""
    output_dir = Path(output_dir)
    for name, content in space_files(model_repo_id, space_id).items():
        (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (output_dir / name).write_bytes(content)
    return output_dir


def push_space(space_id: str, model_repo_id: str, api: HfApi, endpoint: str, private: bool | None = False) -> str:
    """Creates (or updates) the Gradio Space `space_id` serving `model_repo_id`, in one commit; returns its URL.
    Errors are the client's (the caller words them)."""
    files = space_files(model_repo_id, space_id, endpoint)
    api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    api.create_commit(space_id, repo_type="space", commit_message=f"esmloc demo of {model_repo_id}",
                      operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=content)
                                  for name, content in files.items()])
    return f"{endpoint.rstrip('/')}/spaces/{space_id}"


def write_command(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m esmloc.space", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_repo_id", help="the model repository the Space serves (user/name)")
    parser.add_argument("--output_dir", required=True, help="where to write the Space's files")
    parser.add_argument("--space", default=None, help="the Space's id (user/name), for its card")
    args = parser.parse_args(argv)
    cli.check_output_dir(args.output_dir, "--output_dir")
    print(write_space(args.model_repo_id, args.output_dir, args.space))
    return 0


def main(argv=None) -> int:
    return cli.run("python -m esmloc.space", write_command, argv)


if __name__ == "__main__":
    sys.exit(main())
