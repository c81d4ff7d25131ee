"""Train deepIRIS² on the Mg II database and write ``iris_lab/data/deepiris2.safetensors``.

The networks (one per quantity, one σ network per quantity, and the χ²
emulator) are trained on ``iris_lab/data/mgii_database.nc`` (80/20 seeded
split, early stopping on the validation loss). Training resumes from
``build/deepiris2.ckpt/`` when it was interrupted. The weight file carries its
provenance (database attrs, command, package versions, date) in the
safetensors metadata.

Run::

    OMP_NUM_THREADS=2 python scripts/train_deepiris2.py
    python scripts/train_deepiris2.py --database other.nc --out weights.safetensors
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from iris_lab.methods.deep import QUANTITIES, DeepIRIS2

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--database", default=str(ROOT / "iris_lab" / "data" / "mgii_database.nc"))
    p.add_argument("--out", default=str(ROOT / "iris_lab" / "data" / "deepiris2.safetensors"))
    p.add_argument("--checkpoint-dir", default=str(ROOT / "build" / "deepiris2.ckpt"))
    p.add_argument("--hidden", default="96,96", help="hidden widths, comma separated")
    p.add_argument("--components", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-epochs", type=int, default=400)
    p.add_argument("--patience", type=int, default=40)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    model = DeepIRIS2(hidden_sizes=tuple(int(h) for h in args.hidden.split(",")),
                      n_components=args.components, dropout=args.dropout, lr=args.lr,
                      batch_size=args.batch_size, max_epochs=args.max_epochs,
                      patience=args.patience, seed=args.seed, device=args.device,
                      checkpoint_dir=args.checkpoint_dir)
    model.fit(args.database)
    command = "python scripts/train_deepiris2.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:])
    out = model.save(args.out, provenance={
        "command": command.strip(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "database_file": Path(args.database).name, "torch": torch.__version__,
        "numpy": np.__version__})
    val = np.asarray(model.history_["validation"])
    names = [*QUANTITIES, *(f"sigma_{q}" for q in QUANTITIES), "emulator"]
    print(f"entries used: {model.n_entries_} (validation {model.validation_indices_.size}); "
          f"epochs run: {len(val)}")
    print(f"{'network':>22} {'best epoch':>10} {'validation MSE (standardised)':>30}")
    for k, name in enumerate(names):
        print(f"{name:>22} {model.best_epoch_[name]:>10d} {model.best_validation_loss_[k]:>30.4f}")
    print(f"χ² threshold (validation {model.chi2_quantile:.1%} quantile): "
          f"{model.chi2_threshold_:.4g}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
