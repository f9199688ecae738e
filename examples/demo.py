"""`make demo`: the whole chain on the embedded default data.

connectome info -> (pretrained model, or a quick training run) -> evaluate with
a figure -> export NIR and Lava -> verify (NIR exact, Lava float exact, Lava
fixed point within tolerance) -> print the verification table.

Every step is a `dmn-neuro` CLI call, exactly as a user would type it.

    python examples/demo.py --out demo_out [--train] [--skip-lava]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRETRAINED = HERE / "pretrained" / "flywire_mb_navigator"
#: The same model after quantisation-aware fine-tuning onto the Loihi 2 grid
#: (dmn-neuro quantize): the one the fixed-point target is verified on.
PRETRAINED_LOIHI = HERE / "pretrained" / "flywire_mb_navigator_loihi"
QUICK = HERE / "configs" / "quick.yaml"


def sh(*args: str, capture: bool = False, echo: bool = True) -> str:
    cmd = [sys.executable, "-m", "dmn_neuro.cli", "--threads", "1", *args]
    print("\n$ dmn-neuro --threads 1 " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, text=True, stdout=subprocess.PIPE if capture else None)
    if capture and echo and res.stdout:
        print(res.stdout.rstrip())
    print(f"  ({time.perf_counter() - t0:.1f} s, exit {res.returncode})", flush=True)
    if res.returncode != 0 and "verify" not in args:
        sys.exit(res.returncode)
    return res.stdout or ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--train", action="store_true", help="train with examples/configs/quick.yaml instead of loading the pretrained model")
    ap.add_argument("--skip-lava", action="store_true", help="skip the Lava targets (no .venv-lava)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    sh("connectome", "info")
    if args.train or not (PRETRAINED / "model.safetensors").exists():
        sh("train", "--config", str(QUICK), "--out", str(out / "run"))
        ckpt = out / "run" / "checkpoints" / "best"
        sh("quantize", str(ckpt), "-o", str(out / "run" / "loihi"), "--finetune-episodes", "20")
        ckpt_loihi = out / "run" / "loihi"
    else:
        ckpt, ckpt_loihi = PRETRAINED, PRETRAINED_LOIHI
    ev = json.loads(sh("evaluate", str(ckpt), "--episodes", "50", "--out", str(out / "evaluation"), "--json", capture=True))
    noodor = json.loads(sh("evaluate", str(ckpt), "--episodes", "50", "--odor-removed", "--out", str(out / "evaluation"), "--json", capture=True))
    ev_loihi = json.loads(sh("evaluate", str(ckpt_loihi), "--episodes", "50", "--out", str(out / "evaluation_loihi"), "--json", capture=True))
    sh("export", str(ckpt), "--format", "nir", "-o", str(out / "export" / "model.nir"))
    targets = ["nir"] if args.skip_lava else ["nir", "lava", "lava-fixed"]
    if not args.skip_lava:
        sh("export", str(ckpt), "--format", "lava", "-o", str(out / "export" / "lava_float"))
        sh("export", str(ckpt_loihi), "--format", "lava", "--fixed-point", "-o", str(out / "export" / "lava_fixed"))
    results = {}
    for target in targets:
        model = ckpt_loihi if target == "lava-fixed" else ckpt
        text = sh("verify", str(model), "--target", target, "--steps", "1000", "--report", str(out / "verify" / target),
                  "--json", capture=True, echo=False)
        results[target] = json.loads(text)

    print("\n== summary ==")
    print(f"navigation success (50 held-out episodes): {ev['success_rate']:.0%}  |  odor removed: {noodor['success_rate']:.0%}"
          f"  |  KC sparsity {ev['kc_sparsity']:.3f} (target {ev['kc_sparsity_target']})")
    print(f"Loihi-grid model (after quantisation-aware fine-tuning): success {ev_loihi['success_rate']:.0%}")
    pops = list(next(iter(results.values()))["mismatch_fraction"])
    print(f"{'target':12s} {'passed':7s} " + " ".join(f"{p:>8s}" for p in pops))
    for target, r in results.items():
        print(f"{target:12s} {str(r['passed']):7s} " + " ".join(f"{100 * r['mismatch_fraction'][p]:7.3f}%" for p in pops))
    print(f"\nfigures and reports under {out}/ (evaluation/, verify/<target>/verification.png)")
    if not all(r["passed"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
