"""esmloc-push: publish a train.py output directory to a hub repository (and optionally a demo Space).

    esmloc-push OUTPUT_DIR --hub_model_id user/name [--hub_private_repo] [--hub_endpoint URL] [--push_adapter]

What a repository gets, and how the push fails, is esmloc.publish's; this module is the command line around it.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

from esmloc import cli, publish, space
from esmloc.card import DEFAULT_LICENSE, PublishError
from esmloc.run_files import as_hub_model_id
from esmloc.errors import EnvironmentProblem, InputError


@dataclass
class PushArguments:
    hub_model_id: str = field(metadata={"help": "The repository to push to: user/name or org/name."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repository private."})
    hub_endpoint: str | None = field(
        default=None,
        metadata={"help": "The hub to push to (default: HF_ENDPOINT, else https://huggingface.co). The token is "
                  "the one of `hf auth login` or HF_TOKEN; it is never printed."},
    )
    push_adapter: bool = field(
        default=False,
        metadata={"help": "Push the LoRA adapter (OUTPUT_DIR/adapter) with its own card instead of the merged model."},
    )
    license: str | None = field(default=None, metadata={
        "help": f"The card's license (a hub license id). Default: {DEFAULT_LICENSE} for an ESM-2 backbone; for ESM C the "
                "license the backbone checkpoint declared (its sizes differ), else 'other' (esmloc.card.card_license)."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "The card's base_model hub id, when the run's ESM-2 checkpoint was a local folder."},
    )
    datasets: list[str] | None = field(default=None, metadata={"help": "Hub dataset ids for the card's metadata."})
    commit_message: str | None = field(default=None)
    space: str | None = field(
        default=None,
        metadata={"help": "Also create or update this Gradio Space (user/name) serving the pushed model "
                  "(esmloc.space); the model card links to it."},
    )

    def __post_init__(self):
        cli.require(as_hub_model_id(self.hub_model_id) == self.hub_model_id,
                    f"--hub_model_id must be a full repository id, user/name or org/name, got {self.hub_model_id!r}")
        cli.require(self.space is None or as_hub_model_id(self.space) == self.space,
                    f"--space must be a full Space id, user/name or org/name, got {self.space!r}")


def parse_arguments(argv=None) -> tuple[Path, PushArguments]:
    parser = cli.DataclassParser(PushArguments, prog="esmloc-push",
                                 description="Push a train.py output directory to a Hugging Face hub repository.")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="A train.py --output_dir.")
    arguments, rest = parser.parse(argv)
    return Path(rest.output_dir), arguments


def push(argv=None) -> int:
    """Prints the repository's URL (and the Space's) on stdout: the command's result."""
    output_dir, args = parse_arguments(argv)
    what = "adapter" if args.push_adapter else "merged"
    try:  # what the directory lacks is the user's to fix (exit 2); what the hub answers is not (exit 1)
        publish.files_to_push(output_dir, what)
    except PublishError as error:
        raise InputError(f"{output_dir}: {error}" if str(output_dir) not in str(error) else str(error)) from None
    card_options = {"license": args.license, "base_model": args.base_model, "datasets": args.datasets,
                    "space_id": args.space}
    try:
        url = publish.push_output_dir(output_dir, args.hub_model_id, private=args.hub_private_repo,
                                      endpoint=args.hub_endpoint, what=what, commit_message=args.commit_message,
                                      card_options={k: v for k, v in card_options.items() if v is not None})
    except PublishError as error:
        raise EnvironmentProblem(str(error)) from None
    print(url)
    if args.space:
        endpoint = publish.resolve_endpoint(args.hub_endpoint)
        try:
            print(space.push_space(args.space, args.hub_model_id, publish.HfApi(endpoint=endpoint), endpoint,
                             private=args.hub_private_repo))
        except (httpx2.HTTPError, OSError, ValueError) as error:
            raise EnvironmentProblem(f"the model is at {url}, but the Space failed: "
                                     + publish.failure_message(error, endpoint, args.space, "")) from None
    return 0


def main(argv=None) -> int:
    return cli.run("esmloc-push", push, argv)


if __name__ == "__main__":
    sys.exit(main())
