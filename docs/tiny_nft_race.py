"""GRPO against DiffusionNFT by the clock, on the shapes world with the oracle reward (toy GenEval itself):
how long NFT takes to reach GRPO's 15-epoch held-out gain, each side's whole command timed — loading the
models, the evaluation before and the one after training included.

    python docs/tiny_nft_race.py out/race --seed=0            # ~5 minutes on 2 idle cores

It runs, one after the other on an otherwise idle machine, `train.py config/tiny.py` with
--reward="{'toy_geneval': 1.0}":
  GRPO  --epochs=15 --eval_every=15                   (evaluations at epochs 0 and 15)
  NFT   --objective=nft --epochs=E --eval_every=E     for E = 2, 3, 4, ... until its gain reaches GRPO's
and prints, for each, the held-out toy GenEval before → after, its gain and its wall-clock seconds; then the
first NFT run that reaches GRPO's gain, as a fraction of GRPO's seconds. Any other --key=value goes to every
run (e.g. --nft_t_fraction=0.99 for the published 9 of 10 times)."""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_run(out, args):
    """(held-out toy GenEval at the first and last evaluation, wall-clock seconds) of one train.py run."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), os.path.join(ROOT, "config", "tiny.py"),
                    "--reward={'toy_geneval': 1.0}", f"--out_dir={out}", "--overwrite=True", *args],
                   check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    evals = [r["eval/toy_geneval"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
             if "eval/toy_geneval" in r]
    return evals[0], evals[-1], seconds


def main(out, extra):
    b, a, grpo_s = timed_run(os.path.join(out, "grpo"), ["--epochs=15", "--eval_every=15", *extra])
    target = a - b
    print(f"| GRPO, 15 epochs | {b:.3f} → {a:.3f} | {target:+.3f} | {grpo_s:.0f} s | 1.00 |", flush=True)
    for e in range(2, 16):
        b, a, s = timed_run(os.path.join(out, f"nft_{e}"), ["--objective=nft", f"--epochs={e}",
                                                             f"--eval_every={e}", *extra])
        print(f"| NFT, {e} epochs | {b:.3f} → {a:.3f} | {a - b:+.3f} | {s:.0f} s | {s / grpo_s:.2f} |",
              flush=True)
        if a - b >= target:
            print(f"NFT reaches GRPO's 15-epoch gain ({target:+.3f}) after {e} epochs in {s / grpo_s:.2f} of "
                  "GRPO's wall-clock (loading and two evaluations included on both sides)")
            return
    print("NFT does not reach GRPO's 15-epoch gain within 15 epochs")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2:])
