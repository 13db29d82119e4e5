"""How many torch threads a training process should use on this CPU, measured.

Times one SGD step of the Fashion-MNIST autoencoder (notebook 04's model, batch 100) in a fresh process
for each torch thread count, alone and beside ``--busy`` other processes (by default each training the same
model with the same thread count: a second worker or a second notebook), under OpenMP's default wait policy and under
``OMP_WAIT_POLICY=PASSIVE``. Every configuration runs in its own subprocess, one after another, so the
numbers are side by side on the same machine in the same minutes.

    python benchmarks/threads.py                 # threads 1..cores, busy 0 and 1
    python benchmarks/threads.py --rival spin   # the busy process is a Python loop instead
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP_TIMER = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[3])
from companion.models import fmnist_autoencoder
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
model = fmnist_autoencoder()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x = torch.rand(100, 1, 28, 28)
def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), x).backward()
    opt.step()
for _ in range(20):
    step()
times = []
for _ in range(int(sys.argv[2])):
    tic = time.perf_counter(); step(); times.append(time.perf_counter() - tic)
times.sort()
print(times[len(times) // 2] * 1e3)
"""

SPIN = "while True:\n    pass\n"
# a second training process with the same thread count: two workers, or a notebook beside a worker
RIVAL = STEP_TIMER.replace("int(sys.argv[2])", "10**9")


def median_step_ms(threads: int, steps: int, busy: int, passive: bool, rival: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("OMP_WAIT_POLICY", None)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    code = SPIN if rival == "spin" else RIVAL
    spinners = [subprocess.Popen([sys.executable, "-c", code, str(threads), "0", REPO], env=env)
                for _ in range(busy)]
    try:
        time.sleep(3 if busy else 0)  # the rivals past their imports
        out = subprocess.run([sys.executable, "-c", STEP_TIMER, str(threads), str(steps), REPO], env=env,
                             check=True, capture_output=True, text=True).stdout
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    return float(out.strip().splitlines()[-1])


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=list(range(1, cores + 1)))
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="other processes spinning one core each")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rival", choices=("torch", "spin"), default="torch",
                        help="what each busy process runs: the same training step with the same threads "
                             "(a second worker), or a pure-Python loop on one core")
    args = parser.parse_args()
    print(f"Fashion-MNIST autoencoder, batch 100, SGD step; median over {args.steps} steps; "
          f"{cores} usable cores; torch threads from OMP_NUM_THREADS; busy = other processes running "
          f"{'the same step with the same threads' if args.rival == 'torch' else 'a Python loop'}")
    print(f"{'threads':>7} {'busy':>4} {'default wait (ms)':>18} {'PASSIVE wait (ms)':>18}")
    for busy in args.busy:
        for threads in args.threads:
            active = median_step_ms(threads, args.steps, busy, False, args.rival)
            passive = median_step_ms(threads, args.steps, busy, True, args.rival)
            print(f"{threads:>7} {busy:>4} {active:>18.2f} {passive:>18.2f}", flush=True)


if __name__ == "__main__":
    main()
