"""A PNG of the training curves: loss and learning rate (SFT, reward), or reward and KL (PPO)."""

from __future__ import annotations

from pathlib import Path

from ftl.track.metrics import read_metrics


def plot_curves(metrics_path: Path, out_path: Path, title: str = "") -> Path | None:
    rows = read_metrics(metrics_path)
    main_key, side_key = ("loss", "lr") if any("loss" in r for r in rows) else ("reward", "kl")
    train = [r for r in rows if main_key in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps, losses = [r["step"] for r in train], [r[main_key] for r in train]
    ax_loss.plot(steps, losses, alpha=0.35, label=f"train {main_key}")
    ax_loss.plot(steps, smooth(losses), label=f"train {main_key} (EMA 0.8)")
    evals = [r for r in rows if "eval/loss" in r]
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o-", label="validation loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(main_key)
    ax_loss.legend()
    ax_lr.plot([r["step"] for r in train], [r[side_key] for r in train], color="tab:orange")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel({"lr": "learning rate", "kl": "KL to reference (nats)"}[side_key])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    out, last = [], values[0]
    for v in values:
        last = weight * last + (1 - weight) * v
        out.append(last)
    return out
