"""esmloc-demo: serve the interactive demo (Gradio) of a saved model on this machine.

    esmloc-demo MODEL_DIR [--host 127.0.0.1] [--port 7860]

The app itself is esmloc.webapp (also what a Space's app.py serves); a missing or damaged model directory is one line
at start-up (exit 2), before any server starts.
"""

import os
import sys

from esmloc import cli


def serve(argv=None) -> int:
    parser = cli.ArgumentParser(prog="esmloc-demo", description="Serve the interactive esmloc demo (Gradio).")
    parser.add_argument("model", metavar="MODEL_DIR", help="a saved model directory, or a hub repository id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        raise cli.InputError(f"--port {args.port}: not a port number (1-65535)")
    device = cli.choose_device(args.device)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports to Gradio's servers
    try:
        from esmloc.webapp import build_app
        import gradio  # noqa: F401
    except ImportError:
        raise cli.EnvironmentProblem("the demo needs Gradio: pip install 'esmloc[demo]'") from None

    build_app(args.model, device=str(device)).launch(server_name=args.host, server_port=args.port)
    return 0


def main(argv=None) -> int:
    return cli.run("esmloc-demo", serve, argv)


if __name__ == "__main__":
    sys.exit(main())
