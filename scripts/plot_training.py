"""Plot the default model's training curves (both stages) from the trainer's JSONL logs.

    python scripts/plot_training.py trimode/data/default_model/train_log_stage1.jsonl \
        trimode/data/default_model/train_log_stage2.jsonl --out trimode/data/default_model/training_curves.png
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", help="train_log.jsonl files, in stage order")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    offset = 0
    series = {"ar_loss": [], "diff_ce": [], "eval_ar_loss": [], "eval_diff_ce": []}
    for path in args.logs:
        last = 0
        for line in open(path):
            rec = json.loads(line)
            step = offset + rec["step"]
            last = max(last, rec["step"])
            for key in series:
                if key in rec:
                    series[key].append((step, rec[key]))
        offset += last
        ax.axvline(offset, color="grey", lw=0.5)
    for key, pts in series.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-" if key.startswith("eval") else "-", label=key, ms=4)
    ax.set_xlabel("step (stages concatenated)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("trimode default model: AR loss and diffusion CE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
