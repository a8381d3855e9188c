"""esmloc-demo: serve the interactive demo (Gradio) of a saved model on this machine.

    esmloc-demo MODEL_DIR [--host 127.0.0.1] [--port 7860] [--max_sequences 20] [--max_chars 100000] ...

The app itself is esmloc.webapp (also what a Space's app.py serves); a missing or damaged model directory is one line
at start-up (exit 2), before any server starts. The limits of a request (`esmloc.webapp.Limits`: proteins,
characters, residues, upload bytes, explained residues, queue, concurrency) are options with safe defaults.
"""

import os
import sys

from esmloc import cli
from esmloc.webapp import add_limit_options, limits_from_args


def serve(argv=None) -> int:
    parser = cli.ArgumentParser(prog="esmloc-demo", description="Serve the interactive esmloc demo (Gradio).")
    parser.add_argument("model", metavar="MODEL_DIR", help="a saved model directory, or a hub repository id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    add_limit_options(parser)
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        raise cli.InputError(f"--port {args.port}: not a port number (1-65535)")
    device = cli.choose_device(args.device)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports to Gradio's servers
    try:
        import gradio  # noqa: F401

        from esmloc.webapp import build_app, launch
    except ImportError:
        raise cli.EnvironmentProblem("the demo needs Gradio: pip install 'esmloc[demo]'") from None

    limits = limits_from_args(args)
    launch(build_app(args.model, device=str(device), limits=limits), limits, server_name=args.host,
           server_port=args.port)
    return 0


def main(argv=None) -> int:
    return cli.run("esmloc-demo", serve, argv)


if __name__ == "__main__":
    sys.exit(main())
