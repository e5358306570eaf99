"""report.html of a fine_tune run, rendered by headless Chromium (the Debian package)."""

import os
import re
import shutil
import subprocess

import pytest
from conftest import SAVED

from tftransfer import build_finetuner, fine_tune
from tftransfer.datasets import few_shot_split

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NAMES = ["five", "six", "seven", "eight", "nine"]


def _chromium(tmp_path, *arguments):
    """Runs headless Chromium with no network and a throwaway profile; its stdout."""
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed: `.ci/run` installs it (apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000"]
    done = subprocess.run([CHROMIUM, *flags, *arguments], capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout


def test_run_report_renders_in_chromium_with_its_rows_and_images(digits_target, tmp_path):
    x, y = digits_target
    x_train, y_train, x_rest, y_rest = few_shot_split(x, y, per_class=10, seed=0)
    x_val, y_val = x_rest[:40], y_rest[:40]
    model = build_finetuner(SAVED / "digits_cnn.keras", class_names=NAMES, learning_rate=1e-2)
    fine_tune(model, (x_train, y_train), (x_val, y_val), head_epochs=2, fine_tune_epochs=0,
              batch_size=10, output_dir=tmp_path / "run", verbose=0)
    report = tmp_path / "run" / "report.html"
    text = report.read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched from a network
    url = report.as_uri()
    dom = _chromium(tmp_path, "--dump-dom", url)
    rows = int(re.search(r'data-rows="(\d+)"', dom).group(1))
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    # 5 per-class rows, 9 top losses, one row per confused pair (from the rendered DOM).
    confused = len(re.findall(r"<tr>", dom.split('id="most-confused"')[1].split("</table>")[0]))
    assert rows == 5 + 9 + confused - 1  # the header row is in <thead>, not counted
    assert images == 3  # curves, confusion matrix, top losses with Grad-CAM: all decoded
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1000,1400", url)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
