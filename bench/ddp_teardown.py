"""Do two-process CPU training runs end? Counts the runs that hang after training, with esmloc's teardown
(`esmloc.cli.end_processes`) and with the order it replaced, side by side in one run, under CPU load.

    python bench/ddp_teardown.py --runs 400                  # 200 runs of each order, 2 at a time, 2 CPU burners
    nice -n 10 python bench/ddp_teardown.py --runs 600 --parallel 3 --burners 2 --log_dir ddp_logs
    python bench/ddp_teardown.py --smoke                     # one run of each order, no burners (the test runs this)

A run is `torchrun --nproc_per_node 2 train.py` (gloo, OMP_NUM_THREADS=1, in a loopback-only network namespace as
the tests run it) on 60 synthetic proteins: the tiny architecture, full fine-tuning, one epoch. The two orders
differ only in how the run ends, after every output is saved:

- `old`: `trainer.accelerator.end_training()` (destroys the process group) while the Trainer still holds the
  DDP-wrapped model, which is freed afterwards, when `train()` returns: its reducer's reference was the process
  group's last, so gloo's process group was destroyed inside the reducer's destructor;
- `new`: `esmloc.cli.end_processes(trainer)`: the wrapped model let go and collected first, then a barrier, then
  the process group destroyed.

The runs alternate between the orders (old, new, old, ...), `--parallel` at a time, beside `--burners` processes
that keep CPUs busy (oversubscription: the hang showed under load). A run still going after `--timeout` seconds
counts as hung (a normal run takes 30-90 s here): its workers' Python stacks (faulthandler, on SIGABRT) and, where
gdb can attach, native stacks of every thread go into `--log_dir` (taken before anything is killed). Its outputs
are checked: "outputs saved" means test_results.json and the model were written, i.e. it hung in the teardown.
The exit status is 1 when a `new` run hung or failed.
"""

import argparse
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import REPO, command_line, load_average, machine_description, median, table


ORDERS = ("old", "new")


def worker(order: str, train_args: list[str]) -> int:
    """One process of a run (torchrun starts two): esmloc's train.py, ending in the given order."""
    from esmloc import cli, train

    if order == "old":
        cli.end_processes = lambda trainer=None: trainer.accelerator.end_training()  # what train.py did before
    return train.main(train_args)


def loopback_only_prefix() -> list[str] | None:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import loopback_only_prefix  # the store of torch.distributed then listens on lo only

    return loopback_only_prefix()


def burn(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def native_stacks(pid: int) -> str:
    if not shutil.which("gdb"):
        return "(no gdb)"
    result = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 30"], capture_output=True,
                            text=True, timeout=120)
    return result.stdout[-20000:] + result.stderr[-2000:]


def one_run(index: int, order: str, data: Path, work: Path, prefix: list[str], timeout: float, log_dir: Path) -> dict:
    import psutil  # accelerate's dependency

    output_dir = work / f"run{index}"
    command = prefix + [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", "29500", str(Path(__file__).resolve()),
                        "--worker", order, "--", "--train_file", str(data), "--output_dir", str(output_dir),
                        "--finetune", "full", "--use_cpu", "--from_scratch", "tiny", "--num_train_epochs", "1",
                        "--per_device_train_batch_size", "8", "--max_residues", "50", "--num_examples_to_show", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "PYTHONFAULTHANDLER": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    started = time.monotonic()
    with subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as process:
        try:
            log, _ = process.communicate(timeout=timeout)
            outcome = "ended" if process.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            outcome = "hung"
            workers = [child for child in psutil.Process(process.pid).children(recursive=True)
                       if "--worker" in child.cmdline()]
            stacks = [f"--- native stacks of pid {child.pid} ---\n{native_stacks(child.pid)}" for child in workers]
            for child in workers:
                child.send_signal(signal.SIGABRT)  # faulthandler prints the Python stacks
            time.sleep(5)
            os.killpg(process.pid, signal.SIGKILL)
            log, _ = process.communicate()
            log += "\n".join(stacks)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    seconds = time.monotonic() - started
    saved = (output_dir / "test_results.json").is_file() and (output_dir / "model.safetensors").is_file()
    if outcome != "ended":
        (log_dir / f"run{index:04d}_{order}_{outcome}.log").write_text(log)
    shutil.rmtree(output_dir, ignore_errors=True)
    return {"order": order, "outcome": outcome, "seconds": seconds, "saved": saved}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400, help="runs in all, half of them in each order")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--burners", type=int, default=2, help="busy processes beside the runs")
    parser.add_argument("--timeout", type=float, default=300, help="seconds after which a run counts as hung")
    parser.add_argument("--log_dir", type=Path, default=None, help="logs of hung and failed runs (default: a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="one run of each order, one at a time, no burners")
    parser.add_argument("--worker", choices=ORDERS, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.worker:
        return worker(args.worker, [arg for arg in rest if arg != "--"])
    if args.smoke:
        args.runs, args.parallel, args.burners = 2, 1, 0

    prefix = loopback_only_prefix()
    if prefix is None:
        print("SKIPPED: cannot create a loopback-only network namespace (unshare/ip); a PyTorch rendezvous store "
              "would listen on all interfaces")
        return 0
    work = Path(tempfile.mkdtemp(prefix="ddp_teardown_"))
    log_dir = args.log_dir or work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from esmloc.demo import write_demo_csv

    data = write_demo_csv(work / "proteins.csv", n_rows=60, seed=3)
    print(f"command: {command_line()}\nmachine: {machine_description()}\nload average before: {load_average()}")

    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=burn, args=(stop,), daemon=True) for _ in range(args.burners)]
    for burner in burners:
        burner.start()
    results = []
    try:
        with ThreadPoolExecutor(args.parallel) as pool:
            futures = [pool.submit(one_run, index, ORDERS[index % 2], data, work, prefix, args.timeout, log_dir)
                       for index in range(args.runs)]
            for done, future in enumerate(futures, 1):
                results.append(future.result())
                if done % 10 == 0 or done == args.runs:
                    counts = "; ".join(f"{order}: " + ", ".join(
                        f"{sum(r['order'] == order and r['outcome'] == outcome for r in results)} {outcome}"
                        for outcome in ("ended", "hung", "failed")) for order in ORDERS)
                    print(f"{done}/{args.runs} runs ({counts})", file=sys.stderr, flush=True)
    finally:
        stop.set()
        for burner in burners:
            burner.join()
    print(f"load average after: {load_average()}; logs of the runs that did not end: {log_dir}")

    rows = []
    for order in ORDERS:
        mine = [result for result in results if result["order"] == order]
        hung = [result for result in mine if result["outcome"] == "hung"]
        rows.append([order, len(mine), sum(r["outcome"] == "ended" for r in mine), len(hung),
                     sum(r["saved"] for r in hung), sum(r["outcome"] == "failed" for r in mine),
                     f"{median([r['seconds'] for r in mine if r['outcome'] == 'ended']) or 0:.0f}"])
    print(table(["teardown", "runs", "ended", "hung", "hung with every output saved", "failed",
                 "median s of an ended run"], rows))
    data.unlink()
    if args.log_dir is None and not any(log_dir.iterdir()):
        shutil.rmtree(work)
    new = [result for result in results if result["order"] == "new"]
    return 1 if any(result["outcome"] != "ended" for result in new) else 0


if __name__ == "__main__":
    sys.exit(main())
