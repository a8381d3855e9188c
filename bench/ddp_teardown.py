"""Do two-process CPU training runs end? Counts the runs that hang after training, with esmloc's teardown
(`esmloc.cli.end_processes`) and with the order it replaced, side by side in one run, under CPU load.

    python bench/ddp_teardown.py --runs 400 --cycles 300     # 200 runs of each order, 2 at a time, 2 CPU burners
    nice -n 10 python bench/ddp_teardown.py --runs 400 --parallel 3 --log_dir ddp_logs
    python bench/ddp_teardown.py --smoke                     # 1 run and 2 cycles of each order (the test runs this)

Runs. A run is `torchrun --nproc_per_node 2 train.py` (gloo, OMP_NUM_THREADS=1, in a loopback-only network
namespace as the tests run it) on 60 synthetic proteins: the tiny architecture, full fine-tuning, one epoch. The two
orders differ only in how the run ends, after every output is saved:

- `old`: `trainer.accelerator.end_training()` (destroys the process group) while the Trainer still holds the
  DDP-wrapped model, which is freed afterwards, when `train()` returns: its reducer then holds the process group's
  last reference, and destroys gloo's process group itself;
- `new`: `esmloc.cli.end_processes(trainer)`: the wrapped model let go and collected first, then a barrier, then
  the process group destroyed.

The runs alternate between the orders (old, new, old, ...), `--parallel` at a time, beside `--burners` processes
that keep CPUs busy (oversubscription: the hang showed under load). A run still going after `--timeout` seconds
counts as hung (a normal run takes 30-90 s here): its workers' native stacks (gdb, where it can attach) and Python
stacks (faulthandler, on SIGABRT) go into `--log_dir`. "with every output saved": test_results.json and the model
were written, i.e. it hung in the teardown.

Cycles (`--cycles N`). The same ending isolated and repeated: per order, one two-process job sets up and tears down
N times (a gloo process group on a file store, a DDP-wrapped small model trained 3 steps, an all_gather of tensors
made in Python, then the teardown in that order: the old one frees the model when the cycle's function returns, the
new one calls `end_processes` on a trainer-shaped holder of the model). A cycle still going after 120 s counts as
hung (`--cycle_timeout`; faulthandler prints the stacks and ends the job); a job that hung is followed by another
until N cycles ran.

The exit status is 1 when a run or a cycle of the new order hung or failed.
"""

import argparse
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import REPO, command_line, load_average, machine_description, median, table, write_table


ORDERS = ("old", "new")


def run_worker(order: str, train_args: list[str]) -> int:
    """One process of a run (torchrun starts two): esmloc's train.py, ending in the given order."""
    from esmloc import cli
    from esmloc.commands import train

    if order == "old":
        cli.end_processes = lambda trainer=None: trainer.accelerator.end_training()  # what train.py did before
    return train.main(train_args)


def one_cycle(order: str, store_path: str) -> None:
    import gc
    import types

    import torch
    import torch.distributed as dist

    from esmloc import cli

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank, world_size=world_size)
    module = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2))
    trainer = types.SimpleNamespace(model=module, model_wrapped=torch.nn.parallel.DistributedDataParallel(module),
                                    accelerator=types.SimpleNamespace(free_memory=gc.collect))
    optimizer = torch.optim.AdamW(module.parameters())
    for _ in range(3):
        trainer.model_wrapped(torch.randn(32, 64)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    gathered = [torch.zeros(4) for _ in range(world_size)]
    dist.all_gather(gathered, torch.randn(4))
    dist.barrier()
    if order == "new":
        cli.end_processes(trainer)
    else:
        dist.destroy_process_group()  # the model is freed when this function returns


def cycles_worker(order: str, cycles: int, store_dir: str, timeout: float) -> int:
    """One process of a cycles job: `cycles` set-ups and teardowns; a cycle longer than `timeout` s ends the job."""
    import faulthandler

    for cycle in range(cycles):
        faulthandler.dump_traceback_later(timeout, exit=True)
        one_cycle(order, os.path.join(store_dir, f"store{cycle}"))
        faulthandler.cancel_dump_traceback_later()
        print(f"rank {os.environ['RANK']}: cycle {cycle} ended", flush=True)
    return 0


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
                            text=True, timeout=300)
    return result.stdout[-20000:] + result.stderr[-2000:]


def launch(prefix: list[str], worker_args: list[str], cwd: Path, timeout: float) -> tuple[str, str]:
    """Runs `torchrun --nproc_per_node 2 <this script> <worker_args>`; returns (ended / failed / hung, output). A
    launch still going after `timeout` s: its workers' native and Python stacks are added to the output."""
    import psutil  # accelerate's dependency

    command = prefix + [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", "29500", str(Path(__file__).resolve()),
                        *worker_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "PYTHONFAULTHANDLER": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
            return ("ended" if process.returncode == 0 else "failed"), output
        except subprocess.TimeoutExpired:
            workers = [child for child in psutil.Process(process.pid).children(recursive=True)
                       if "--worker" in child.cmdline()]
            stacks = [f"--- native stacks of pid {child.pid} ---\n{native_stacks(child.pid)}" for child in workers]
            for child in workers:
                child.send_signal(signal.SIGABRT)  # faulthandler prints the Python stacks
            time.sleep(5)
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            return "hung", output + "\n".join(stacks)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def one_run(index: int, order: str, data: Path, work: Path, prefix: list[str], timeout: float, log_dir: Path) -> dict:
    output_dir = work / f"run{index}"
    started = time.monotonic()
    outcome, log = launch(prefix, ["--worker", order, "--", "--train_file", str(data), "--output_dir", str(output_dir),
                                   "--finetune", "full", "--use_cpu", "--from_scratch", "tiny", "--num_train_epochs",
                                   "1", "--per_device_train_batch_size", "8", "--max_residues", "50",
                                   "--num_examples_to_show", "0"], work, timeout)
    seconds = time.monotonic() - started
    saved = (output_dir / "test_results.json").is_file() and (output_dir / "model.safetensors").is_file()
    if outcome != "ended":
        (log_dir / f"run{index:04d}_{order}_{outcome}.log").write_text(log)
    shutil.rmtree(output_dir, ignore_errors=True)
    return {"order": order, "outcome": outcome, "seconds": seconds, "saved": saved}


def cycle_jobs(order: str, cycles: int, timeout: float, work: Path, prefix: list[str], log_dir: Path) -> dict:
    """Jobs of `order` until `cycles` cycles ran: a job ends at its first cycle that did not end on both processes
    (hung: faulthandler's timeout; else failed, and no further job starts)."""
    ran = ended = hung = jobs = 0
    while ran < cycles:
        jobs += 1
        store_dir = Path(tempfile.mkdtemp(prefix=f"{order}_job{jobs}_", dir=work))
        outcome, log = launch(prefix, ["--cycles_worker", order, "--cycles", str(cycles - ran), "--store_dir",
                                       str(store_dir), "--cycle_timeout", str(timeout)],
                              work, timeout=(cycles - ran) * timeout + 300)
        done = min(len(re.findall(rf"^rank {rank}: cycle \d+ ended$", log, re.MULTILINE)) for rank in (0, 1))
        ended += done
        ran += done if outcome == "ended" else done + 1
        shutil.rmtree(store_dir, ignore_errors=True)
        if outcome != "ended":
            stuck = "Timeout (0:" in log
            hung += stuck
            (log_dir / f"cycles_{order}_job{jobs}_{'hung' if stuck else outcome}.log").write_text(log)
            if not stuck:
                break
    return {"order": order, "jobs": jobs, "ran": ran, "ended": ended, "hung": hung}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400, help="train.py runs in all, half of them in each order")
    parser.add_argument("--cycles", type=int, default=0, help="set-up/teardown cycles of each order (0: none)")
    parser.add_argument("--cycle_timeout", type=float, default=120, help="seconds after which a cycle counts as hung")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--burners", type=int, default=2, help="busy processes beside the runs")
    parser.add_argument("--timeout", type=float, default=300, help="seconds after which a run counts as hung")
    parser.add_argument("--log_dir", type=Path, default=None, help="logs of the runs that did not end (default: a "
                        "temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="1 run and 2 cycles of each order, no burners")
    parser.add_argument("--worker", choices=ORDERS, help=argparse.SUPPRESS)
    parser.add_argument("--cycles_worker", choices=ORDERS, help=argparse.SUPPRESS)
    parser.add_argument("--store_dir", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.worker:
        return run_worker(args.worker, [arg for arg in rest if arg != "--"])
    if args.cycles_worker:
        return cycles_worker(args.cycles_worker, args.cycles, args.store_dir, args.cycle_timeout)
    if args.smoke:
        args.runs, args.cycles, args.cycle_timeout, args.parallel, args.burners = 2, 2, 45, 1, 0

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
    results, cycles = [], []
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
        if args.cycles:
            with ThreadPoolExecutor(len(ORDERS)) as pool:  # both orders at once, under the same load
                cycles = list(pool.map(lambda order: cycle_jobs(order, args.cycles, args.cycle_timeout, work, prefix,
                                                                log_dir), ORDERS))
    finally:
        stop.set()
        for burner in burners:
            burner.join()
    print(f"load average after: {load_average()}; logs of what did not end: {log_dir}")

    rows = []
    for order in ORDERS:
        mine = [result for result in results if result["order"] == order]
        hung = [result for result in mine if result["outcome"] == "hung"]
        rows.append([order, len(mine), sum(r["outcome"] == "ended" for r in mine), len(hung),
                     sum(r["saved"] for r in hung), sum(r["outcome"] == "failed" for r in mine),
                     f"{median([r['seconds'] for r in mine if r['outcome'] == 'ended']) or 0:.0f}"])
    body = table(["teardown", "runs", "ended", "hung", "hung with every output saved", "failed",
                  "median s of an ended run"], rows)
    if cycles:
        body += (f"\n\nSet-up/teardown cycles ({args.cycles} of each order; a job ends at its first hung cycle):\n\n"
                 + table(["teardown", "jobs", "cycles", "ended", "hung"],
                         [[c["order"], c["jobs"], c["ran"], c["ended"], c["hung"]] for c in cycles]))
    print(body)
    write_table("ddp_teardown", "Two-process runs ended by the old and the new teardown order (train.py on CPU, gloo)",
                body, smoke=args.smoke)
    data.unlink()
    if args.log_dir is None and not any(log_dir.iterdir()):
        shutil.rmtree(work)
    new_runs = [result for result in results if result["order"] == "new"]
    new_cycles = [c for c in cycles if c["order"] == "new"]
    return 1 if any(r["outcome"] != "ended" for r in new_runs) or any(c["ended"] < c["ran"] for c in new_cycles) else 0


if __name__ == "__main__":
    sys.exit(main())
