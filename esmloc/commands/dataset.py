"""esmloc-dataset: share the dataset on a hub.

    esmloc-dataset export DATA_FILES... --output_dir DIR [--dataset_config mitochondrion deeploc] [--split_method ...]
    esmloc-dataset push DIR --hub_dataset_id user/name [--private] [--hub_endpoint URL]

`export` validates and splits with the dataset builder and writes a hub-ready folder (Parquet + dataset card);
`push` uploads such a folder in one commit (esmloc.dataset_hub). Each prints its result (the folder, the URL).
"""

import sys

from esmloc import cli, data, dataset_hub
from esmloc.card import PublishError
from esmloc.errors import EnvironmentProblem, InputError


def data_files(arguments: list[str]):
    """DATA_FILES as the builder takes them: `split=path` for each of train, validation and test keeps given splits,
    plain paths are one pool."""
    named = [argument.partition("=") for argument in arguments]
    if all(sep for _, sep, _ in named):
        files = {}
        for split, _, path in named:
            if split not in dataset_hub.SPLITS:
                raise InputError(f"{split}={path}: the split must be one of {', '.join(dataset_hub.SPLITS)}")
            files.setdefault(split, []).append(path)
        return files
    if any(sep and split in dataset_hub.SPLITS for split, sep, _ in named):
        raise InputError("give either plain files (one pool, split) or split=file for each of train, validation and "
                         "test, not both")
    return arguments if len(arguments) > 1 else arguments[0]


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="esmloc-dataset", description="Share the esmloc dataset on a hub: export "
                                "validated splits as Parquet with a dataset card, then push them.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    export = commands.add_parser("export", help="Validate, split and write a hub-ready dataset folder.")
    export.add_argument("data_files", nargs="+", metavar="DATA_FILES",
                        help="CSV/TSV files (one pool, split per --split_method), or train=FILE validation=FILE "
                             "test=FILE (kept as given).")
    export.add_argument("--output_dir", required=True, help="The folder to write; must not exist or be empty.")
    export.add_argument("--dataset_config", nargs="+", default=["mitochondrion"], choices=dataset_hub.CONFIGS,
                        help="The config(s) to export (default: mitochondrion).")
    export.add_argument("--split_method", choices=data.SPLIT_METHODS, default=None,
                        help="As in train.py: stratified (70/10/20, seeded), partition or given.")
    export.add_argument("--seed", type=int, default=42, help="Seed of the stratified split (train.py's --seed).")
    export.add_argument("--validation_partitions", type=int, nargs="+", default=None)
    export.add_argument("--test_partitions", type=int, nargs="+", default=None)
    export.add_argument("--license", default=dataset_hub.DEFAULT_LICENSE, help="The card's licence (a hub licence id).")
    export.add_argument("--source", default=None, help="Where the data files come from, for the card.")
    export.add_argument("--pretty_name", default=None)
    export.add_argument("--hub_dataset_id", default=None, help="The repository the card's loading code names.")
    export.add_argument("--cache_dir", default=None)
    push = commands.add_parser("push", help="Upload an exported folder to a dataset repository in one commit.")
    push.add_argument("dataset_dir", metavar="DIR", help="A folder written by esmloc-dataset export.")
    push.add_argument("--hub_dataset_id", required=True, help="The repository: user/name or org/name.")
    push.add_argument("--private", action="store_true", help="Create the repository private.")
    push.add_argument("--hub_endpoint", default=None,
                      help="The hub to push to (default: HF_ENDPOINT, else https://huggingface.co). The token is the "
                           "one of `hf auth login` or HF_TOKEN; it is never printed.")
    push.add_argument("--commit_message", default=None)
    return parser


def dataset(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "export":
        files = data_files(args.data_files)
        cli.check_output_dir(args.output_dir, "--output_dir")
        try:
            result = dataset_hub.export_dataset(
                files, args.output_dir, args.dataset_config, split_method=args.split_method, seed=args.seed,
                validation_partitions=args.validation_partitions, test_partitions=args.test_partitions,
                license=args.license, source=args.source, pretty_name=args.pretty_name,
                hub_dataset_id=args.hub_dataset_id, cache_dir=args.cache_dir)
        except dataset_hub.DatasetError as error:
            raise InputError(str(error)) from None
        except ValueError as error:  # split options the data cannot satisfy (too few proteins, absent partitions)
            if isinstance(error, InputError):
                raise
            raise InputError(f"{', '.join(map(str, args.data_files))}: {error}") from None
    else:
        try:
            result = dataset_hub.push_dataset_dir(args.dataset_dir, args.hub_dataset_id, private=args.private,
                                                  endpoint=args.hub_endpoint, commit_message=args.commit_message)
        except dataset_hub.DatasetError as error:
            raise InputError(str(error)) from None
        except PublishError as error:
            raise EnvironmentProblem(str(error)) from None
    print(result)
    return 0


def main(argv=None) -> int:
    return cli.run("esmloc-dataset", dataset, argv)


if __name__ == "__main__":
    sys.exit(main())
