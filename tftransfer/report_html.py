"""Self-contained `report.html` of a fine-tuning run or of a search.

One file that opens from disk with no network fetch: pictures are inlined as
base64 PNG and the only script is a few inline lines that sort tables when a
header is clicked and, once the page has loaded, record in the `<body>`'s
`data-rows` / `data-images` how many table rows it shows and how many images
the browser decoded (what the browser test reads back).

Example:

>>> write_run_report("runs/a", model, history, (x_val, y_val))
>>> write_search_report("searches/s/report.html", rows, "val_accuracy", "max")
"""

import base64
import html
import io
import math
import os

import numpy as np

from tftransfer import reports

_STYLE = """
body{font-family:sans-serif;margin:1.5em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}
th{background:#eef;cursor:pointer}td.t{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:4px}
.cards span{display:inline-block;background:#f4f4f8;padding:6px 12px;margin:3px;border-radius:4px}
"""

_SCRIPT = """
function sortBy(th){const table=th.closest('table'),body=table.tBodies[0];
const i=[...th.parentNode.children].indexOf(th),asc=th.dataset.asc!=='1';
[...table.querySelectorAll('th')].forEach(h=>delete h.dataset.asc);th.dataset.asc=asc?'1':'0';
const key=r=>{const t=r.children[i].textContent,n=parseFloat(t);return isNaN(n)?t:n};
[...body.rows].sort((a,b)=>{const x=key(a),y=key(b);return (x<y?-1:x>y?1:0)*(asc?1:-1)})
.forEach(r=>body.appendChild(r))}
document.querySelectorAll('th').forEach(th=>th.onclick=()=>sortBy(th));
window.addEventListener('load',()=>{const b=document.body;
b.dataset.rows=document.querySelectorAll('table tbody tr').length;
b.dataset.images=[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;});
"""


def png_data(figure_writer):
    """`figure_writer(buffer)` writes a PNG; returns it as a `data:` URI."""
    buffer = io.BytesIO()
    figure_writer(buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _image(uri, alt):
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _cell(value):
    if isinstance(value, float):
        text = "" if math.isnan(value) else f"{value:.4g}"
        return f"<td>{text}</td>"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"<td>{value}</td>"
    return f'<td class="t">{html.escape("" if value is None else str(value))}</td>'


def table(headers, rows, table_id):
    """An HTML table whose columns sort on a click of their header."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return (f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def page(title, sections):
    """The whole document: `sections` is a list of `(heading, html)`."""
    parts = [f"<h2>{html.escape(h)}</h2>\n{body}" for h, body in sections if body]
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}'
            f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
            + "\n".join(parts) + f"\n<script>{_SCRIPT}</script></body></html>\n")


def write(path, text):
    """Writes `text` to `path` through a temporary file and a rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- a run


def _cards(values):
    return '<div class="cards">' + "".join(
        f"<span>{html.escape(k)}: <b>{v:.4g}</b></span>" for k, v in values.items()) + "</div>"


def _final_metrics(history):
    hist = getattr(history, "history", None) or {}
    return {k: float(v[-1]) for k, v in hist.items() if v and k != "learning_rate"}


def _top_losses_section(result, k):
    rows = result.top_losses(k)
    if result.is_text:  # a text model: the texts themselves, shortened, instead of pictures
        cells = [(r["index"], _snippet(result.images[r["index"]]), r["label"], r["predicted"],
                  r["score"], r["loss"]) for r in rows]
        return table(["index", "text", "true", "predicted", "score", "loss"], cells, "top-losses")
    picture = _image(png_data(lambda buf: result.plot_top_losses(buf, k=k)),
                     "top losses with Grad-CAM")
    files = any(r["path"] for r in rows)  # a folder's rows name their files
    cells = [(r["index"], *([r["path"]] if files else []), r["label"], r["predicted"],
              r["score"], r["loss"]) for r in rows]
    headers = ["index", *(["file"] if files else []), "true", "predicted", "score", "loss"]
    return picture + table(headers, cells, "top-losses")


def _snippet(text, limit=160):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def run_report(model, history, validation, class_names=None, top_k=9, title=None):
    """The HTML of a fine-tuning run.

    Args:
        model: The trained classifier (a `FineTuner`).
        history: The `History` `fine_tune` returned, or None.
        validation: Labelled data `interpret` takes, or None.
        class_names: Optional list of names.
        top_k: Integer, how many top losses to show. Defaults to `9`.
        title: Optional title.

    Returns:
        The HTML text.
    """
    from tftransfer.interpret import interpret

    sections = [("Final epoch", _cards(_final_metrics(history)))]
    if history is not None and getattr(history, "history", None):
        sections.append(("Curves", _image(png_data(
            lambda buf: reports.plot_curves(history, buf)), "training curves")))
    if validation is not None and getattr(model, "task", "classification") == "classification":
        result = interpret(model, validation, class_names=class_names)
        evaluation = reports.evaluate_classifier(model, (result.images, result.labels),
                                                 result.class_names)
        sections += [
            ("Validation", _cards({"accuracy": evaluation["accuracy"],
                                   "macro F1": evaluation["macro_f1"]})),
            ("Per class", table(["class", "precision", "recall", "f1", "support"],
                                [(c["name"], c["precision"], c["recall"], c["f1"], c["support"])
                                 for c in evaluation["per_class"]], "per-class")),
            ("Confusion matrix", _image(png_data(
                lambda buf: reports.plot_confusion_matrix(evaluation, buf)), "confusion matrix")),
            ("Most confused", table(["true", "predicted", "count"],
                                    result.most_confused()[:20], "most-confused")),
            ("Top losses", _top_losses_section(result, min(top_k, len(result.labels)))),
        ]
    return page(title or "tftransfer run", sections)


def write_run_report(output_dir, model, history, validation, class_names=None, top_k=9):
    """Writes `run_report` to `output_dir/report.html` (atomically). Returns its path."""
    title = f"tftransfer run: {os.path.basename(os.path.abspath(output_dir))}"
    return write(os.path.join(output_dir, "report.html"),
                 run_report(model, history, validation, class_names, top_k, title))


# ---------------------------------------------------------------- a search


def _hyperparameter_plot(buf, rows, objective):
    """One panel per hyperparameter: its value against the objective."""
    plt = reports._pyplot()
    names = sorted({k for r in rows for k in r["values"] if not k.startswith("tuner/")})
    done = [r for r in rows if r["score"] is not None]
    cols = max(1, min(3, len(names)))
    nrows = max(1, (len(names) + cols - 1) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    for ax, name in zip(axes.ravel(), names):
        ax.set_visible(True)
        values = [r["values"].get(name) for r in done]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = values if numeric else [str(v) for v in values]
        ax.plot(labels, [r["score"] for r in done], "o")
        if numeric and values and min(values) > 0 and max(values) / min(values) > 50:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(objective)
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)


def search_report(rows, objective, direction="max", best=None, title="tftransfer search"):
    """The HTML of a search: a sortable trial table and hyperparameter plots.

    Args:
        rows: Trial rows (`tftransfer.search.report.trial_row`).
        objective: String, the objective's name.
        direction: `"max"` or `"min"`.
        best: Optional best row.
        title: String.

    Returns:
        The HTML text.
    """
    names = sorted({k for r in rows for k in r["values"] if not k.startswith("tuner/")})
    cells = [(r["trial_id"], r["status"], math.nan if r["score"] is None else r["score"],
              math.nan if r["seconds"] is None else r["seconds"],
              *[r["values"].get(n) for n in names]) for r in rows]
    summary = {"trials": len(rows)}
    if best is not None:
        summary[f"best {objective}"] = best["score"]
    sections = [
        (f"Objective: {objective} ({direction})", _cards(summary)),
        ("Trials (click a header to sort)",
         table(["trial", "status", objective, "seconds", *names], cells, "trials")),
    ]
    if any(r["score"] is not None for r in rows) and names:
        sections.append(("Hyperparameters against the objective", _image(
            png_data(lambda buf: _hyperparameter_plot(buf, rows, objective)),
            "hyperparameters vs objective")))
    return page(title, sections)


def write_search_report(path, rows, objective, direction="max", best=None):
    """Writes `search_report` to `path` (atomically). Returns `path`."""
    return write(path, search_report(rows, objective, direction, best))
