"""The seven command-line tools, one module each, at the top of esmloc's import graph: a command imports library
modules (and `esmloc.cli`, the layer they all stand on), never another command, and nothing but `bench/` imports a
command. Every tool's `main` runs through `esmloc.cli.run`.

| tool | module |
| --- | --- |
| train.py, esmloc-train | `train` |
| esmloc-predict | `predict` |
| esmloc-embed | `embed` |
| esmloc-pretrain | `pretrain` |
| esmloc-dataset | `dataset` |
| esmloc-push | `push` |
| esmloc-demo | `demo` |
"""
