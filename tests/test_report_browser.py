"""report.html as a person sees it: a tiny `dpokit demo` run's report opened in headless Chromium.

The page must load without console errors, failed requests or script errors; every plot image must load with a
non-zero natural size; the numbers in the key-results box and the evaluation table must equal eval.json's as
the page formats them. A full-page screenshot stays in the run folder (report.png) for a person to look at.

Chromium is Debian's `chromium` (.ci/run installs it when apt is there), driven by Playwright (a dev extra)
through `executable_path`, so no browser download is needed. Without a Chromium (or DPOKIT_CHROMIUM pointing at
one) the test skips and says why.
"""

import json
import os
import re
import shutil

import pytest

from dpokit.cli import main

TASK = ["--reward", "conftest:letter_reward", "--limit", "6", "--samples", "3", "--k", "2",
        "--max-new-tokens", "8", "--epochs", "1", "--batch-size", "2"]
NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")
WIDTH = 1280  # a laptop window: the page must fit it without horizontal scrolling


def find_chromium() -> str | None:
    """DPOKIT_CHROMIUM when set, else the first Chromium-like browser on PATH."""
    if os.environ.get("DPOKIT_CHROMIUM"):
        return os.environ["DPOKIT_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def same_as_shown(shown: str, value: float, scale: float = 1.0) -> None:
    """`shown` (a number as the page prints it) is `value`·scale rounded to the decimals shown, sign included."""
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    spec = ("+" if shown.startswith("+") else "") + f".{decimals}f"
    assert shown == format(value * scale, spec), (shown, value)


def numbers(text: str) -> list[str]:
    return NUMBER.findall(text)


def flat_scalars(result: dict, prefix: str = "") -> dict:
    """eval.json's scalars under "/"-joined keys (the evaluation table's rows); lists left out."""
    out = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{prefix}{key}/"))
        elif value is None or isinstance(value, (str, int, float, bool)):
            out[f"{prefix}{key}"] = value
    return out


def check_headline(rows: dict[str, str], result: dict) -> None:
    """Each key-results row against eval.json: the numbers in the page, in order, are eval.json's."""
    g = result["generation"]
    pol, ref = g["policy"], g["reference"]
    expected = {  # row label (prefix) -> [(eval.json value, scale)] in the order the row prints them
        "win rate of policy over reference": [(g["win_rate"], 100), (g.get("win_rate_ci95"), 100)],
        "mean reward": [(pol["reward_mean"], 1), (pol.get("reward_ci95"), 1),
                        (ref["reward_mean"], 1), (ref.get("reward_ci95"), 1)],
        "KL(π‖π_ref)": [(g["kl_mean"], 1), (g.get("kl_ci95"), 1)],
        "mean completion length": [(pol["length_mean"], 1), (ref["length_mean"], 1)],
        "prompts × samples per prompt": [(g["prompts"], 1), (g["samples_per_prompt"], 1)],
        "held-out preference accuracy": [(result["eval/rewards/accuracies"], 100)],
        "held-out reward margin": [(result["eval/rewards/margins"], 1)],
        "log-prob shift": [(result["eval/logps/chosen_shift"], 1), (result["eval/logps/rejected_shift"], 1)],
    }
    for label, values in expected.items():
        matches = [text for name, text in rows.items() if name.startswith(label)]
        assert len(matches) == 1, f"key results: no single row '{label}…' in {list(rows)}"
        values = [(v, s) for v, s in values if v is not None]
        shown = numbers(matches[0])
        assert len(shown) == len(values), (label, matches[0], values)
        for text, (value, scale) in zip(shown, values):
            same_as_shown(text, value, scale)


def look(html_path, screenshot) -> dict:
    """Open `html_path` in headless Chromium at WIDTH px; return what the browser complained about and what the
    page shows (images, key-results rows, evaluation table, page width, title); save a full-page screenshot."""
    from playwright.sync_api import sync_playwright
    seen = {"problems": []}  # console errors and warnings, script errors, failed loads
    complain = seen["problems"].append
    with sync_playwright() as p:
        # --no-sandbox: CI and containers run as root, where Chromium's sandbox refuses to start;
        # --disable-dev-shm-usage: a container's /dev/shm is often too small for the renderer
        browser = p.chromium.launch(executable_path=find_chromium(), headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 900})
            page.set_default_timeout(20_000)
            page.on("console", lambda m: m.type in ("error", "warning") and complain(f"console {m.type}: {m.text}"))
            page.on("pageerror", lambda e: complain(f"page error: {e}"))
            page.on("requestfailed", lambda r: complain(f"failed to load {r.url}: {r.failure}"))
            response = page.goto(html_path.as_uri(), wait_until="load")
            if response is not None and not response.ok:
                complain(f"{html_path} answered {response.status}")
            seen["images"] = page.eval_on_selector_all(
                "img", "imgs => imgs.map(i => ({src: i.getAttribute('src'), alt: i.alt, complete: i.complete, "
                       "w: i.naturalWidth, h: i.naturalHeight, shownW: i.getBoundingClientRect().width}))")
            seen["headline"] = dict(page.eval_on_selector_all(
                ".headline tr", "rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))"))
            seen["evaluation"] = page.evaluate(  # the first table after the "Evaluation" heading
                "() => { let e = [...document.querySelectorAll('h2')].find(h => h.textContent === 'Evaluation');"
                " while (e && e.tagName !== 'TABLE') e = e.nextElementSibling;"
                " return e ? [...e.rows].slice(1).map(r => [...r.cells].map(c => c.innerText.trim())) : null; }")
            seen["scroll_width"] = page.evaluate("document.documentElement.scrollWidth")
            seen["title"] = page.title()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return seen


def check_page(seen: dict, run_dir, result: dict) -> None:
    """What a person would see wrong: complaints, missing or broken plots, a page wider than the window,
    key results or evaluation values that are not eval.json's."""
    assert not seen["problems"], seen["problems"]
    assert seen["title"] == f"dpokit report: {run_dir.name}"
    # the demo draws training curves and the reward histogram; each must be a real, decoded image on the page
    images = seen["images"]
    assert {i["alt"] for i in images} >= {"training curves", "reward histogram"}, images
    for image in images:
        assert image["complete"] and image["w"] > 0 and image["h"] > 0, image
        assert (run_dir / image["src"]).is_file(), image  # relative to report.html, so the folder can move
        assert 0 < image["shownW"] <= WIDTH, image
    assert seen["scroll_width"] <= WIDTH, f"the page is {seen['scroll_width']}px wide in a {WIDTH}px window"

    check_headline(seen["headline"], result)
    flat = flat_scalars(result)
    evaluation = seen["evaluation"]
    assert evaluation and len(evaluation) == len(flat)
    for key, shown in evaluation:
        value = flat[key]
        if isinstance(value, float):  # printed with 5 significant digits
            assert float(shown) == pytest.approx(value, rel=1e-4, abs=1e-12), (key, shown, value)
        elif value is None:
            assert shown == "—", (key, shown)
        else:
            assert shown == str(value), (key, shown, value)


def test_report_in_headless_chromium(tmp_path, tiny_model_dir):
    if find_chromium() is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium, or set DPOKIT_CHROMIUM): report.html untested "
                    "in a browser")
    pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')")

    out = tmp_path / "demo"
    assert main(["demo", "--model", tiny_model_dir, "--output-dir", str(out), "--no-progress", *TASK]) == 0
    shot = out / "report.png"
    check_page(look(out / "report.html", shot), out, json.loads((out / "eval.json").read_text()))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"screenshot of the report: {shot}")
