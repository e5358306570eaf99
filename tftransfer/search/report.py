"""Trial lines, the ranked table (`report.md`) and the score plot (`trials.png`)."""

import math
import os


def id_key(trial_id):
    """Sort key of trial ids ("9" before "10")."""
    return (len(trial_id), trial_id)


def _value(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def hp_text(values):
    """`name=value` pairs of a trial's searched hyperparameters."""
    return " ".join(f"{k}={_value(v)}" for k, v in values.items() if not k.startswith("tuner/"))


def _reason(message):
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def trial_row(trial, seconds):
    """A dict describing one finished KerasTuner trial.

    Args:
        trial: A `keras_tuner` `Trial`.
        seconds: Wall-clock seconds of the trial, or None if unknown.

    Returns:
        Dict with `trial_id`, `status`, `score`, `seconds`, `values`, `reason`.
    """
    score = trial.score
    if score is not None and (not isinstance(score, (int, float)) or math.isnan(score)):
        score = None
    return {"trial_id": trial.trial_id, "status": str(trial.status), "score": score,
            "seconds": seconds, "values": dict(trial.hyperparameters.values),
            "reason": _reason(trial.message) if str(trial.status) != "COMPLETED" else ""}


def trial_line(row):
    """The one line printed when a trial ends."""
    score = "-" if row["score"] is None else f"{row['score']:.4f}"
    seconds = "-" if row["seconds"] is None else f"{row['seconds']:.1f}s"
    line = (f"trial {row['trial_id']} | {row['status']:<9} | score {score} | {seconds} | "
            f"{hp_text(row['values']) or '(fixed settings)'}")
    return line + (f" | {row['reason']}" if row["reason"] else "")


def ranked(rows, direction="max"):
    """Completed trials best first, then the others in trial order."""
    done = [r for r in rows if r["score"] is not None and r["status"] == "COMPLETED"]
    rest = [r for r in rows if r not in done]
    done.sort(key=lambda r: r["score"], reverse=direction == "max")
    return done + sorted(rest, key=lambda r: id_key(r["trial_id"]))


def table(rows, objective, direction="max"):
    """The ranked Markdown table of all trials."""
    head = f"| rank | trial | status | {objective} | seconds | hyperparameters |"
    lines = [head, "| ---: | --- | --- | ---: | ---: | --- |"]
    for rank, r in enumerate(ranked(rows, direction), start=1):
        score = "" if r["score"] is None else f"{r['score']:.4f}"
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        hps = hp_text(r["values"]).replace("|", "/") or "(fixed settings)"
        if r["reason"]:
            hps += f" ({r['reason'][:120].replace('|', '/')})"
        lines.append(f"| {rank} | {r['trial_id']} | {r['status']} | {score} | {seconds} | {hps} |")
    return "\n".join(lines)


def write_markdown(path, rows, objective, direction="max", best=None):
    """Writes `report.md`: the ranked table and the best trial."""
    text = [f"# Hyperparameter search\n\nObjective: `{objective}` ({direction}). "
            f"Trials: {len(rows)}.\n", table(rows, objective, direction), ""]
    if best:
        text.append(f"Best trial: {best['trial_id']} ({objective} = {best['score']:.4f}).\n")
    with open(path, "w") as f:
        f.write("\n".join(text))


def write_plot(path, rows, objective, direction="max"):
    """Writes `trials.png`: score per trial (in trial order) and best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: id_key(r["trial_id"]))
    xs = list(range(1, len(rows) + 1))
    scores = [r["score"] if r["score"] is not None else math.nan for r in rows]
    best, current = [], math.nan
    pick = max if direction == "max" else min
    for s in scores:
        current = s if math.isnan(current) else (current if math.isnan(s) else pick(current, s))
        best.append(current)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, scores, "o", label=objective)
    ax.plot(xs, best, "-", label="best so far")
    failed = [x for x, r in zip(xs, rows) if r["score"] is None]
    if failed:
        ax.plot(failed, [min((s for s in scores if not math.isnan(s)), default=0)] * len(failed),
                "x", color="red", label="failed")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.legend(loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
