"""What a person sees at the address `autoprune ui` prints, read from a real browser (headless Chromium).

`tests/test_e2e.py` asserts on it; `python -m autoprune.testing.browser` takes the README's screenshot of a store:

    python -m autoprune.testing.browser --tracking-uri sqlite:///autoprune_runs/mlflow.db --out front.png

Needs Playwright (a test dependency) and a Chromium (Debian's `chromium`, or `$AUTOPRUNE_CHROMIUM`); Playwright's
own browser download is never used, so nothing is fetched.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import select
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from autoprune.testing.loopback import LOOPBACK, free_port
from autoprune.tracking.view import DENSE_COLOR, FRONT_COLOR, TRIAL_COLOR

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    explicit = os.environ.get("AUTOPRUNE_CHROMIUM")
    if explicit:
        return explicit
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def why_no_browser() -> str | None:
    """Why the front cannot be looked at here, or None when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[test]')"
    if find_chromium() is None:
        return "no Chromium on this machine (apt-get install chromium, or set AUTOPRUNE_CHROMIUM to a Chrome binary)"
    return None


@dataclass(frozen=True)
class FrontPage:
    """The page at a search's front address, as rendered."""

    heading: str  # the page's title ("Training runs" on MLflow's model-training page)
    sections: list[str]  # the chart sections' titles, top first
    points: dict[str, int]  # scatter points by colour: FRONT_COLOR, TRIAL_COLOR, DENSE_COLOR
    point_link: str  # where the card of a clicked front point links to (a run's address)
    run_page_links: list[str]  # the links on that run's page (its registered versions among them)


def _rgb(hex_color: str) -> str:
    red, green, blue = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({red}, {green}, {blue})"


def read_front(address: str, *, screenshot: Path | None = None, timeout_s: float = 90) -> FrontPage:
    """Open `address`, wait for the front's chart, count its points by colour, click a front point and follow
    its card's link to the run's page. `screenshot` saves the page as first seen."""
    from playwright.sync_api import sync_playwright

    timeout_ms = timeout_s * 1000
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            page = context.new_page()
            page.goto(address, timeout=timeout_ms)
            page.wait_for_selector("path.point", timeout=timeout_ms)
            time.sleep(1.0)  # the chart's layout settles after its first points are drawn
            if screenshot is not None:
                page.screenshot(path=str(screenshot))
            heading = page.locator("h2").first.inner_text(timeout=timeout_ms).strip()
            lines = [line.strip() for line in page.inner_text("body").splitlines()]
            sections = [title for title, count in zip(lines, lines[1:])  # a section's title, then "(its charts)"
                        if re.fullmatch(r"\(\d+\)", count)]
            points = {color: page.locator(f"path.point[style*='fill: {_rgb(color)}']").count()
                      for color in (FRONT_COLOR, TRIAL_COLOR, DENSE_COLOR)}
            tried = []
            for point, position in _front_clicks(page):  # Plotly gives a click to the marker whose centre is
                point.click(force=True, position=position)  # nearest, and a trial off the front may overlap it
                link = page.locator("[data-testid=tooltip-container] a[href*='/runs/']").first
                point_link = link.get_attribute("href", timeout=timeout_ms) or ""
                if _on_front(address, point_link):
                    break
                tried.append(point_link)  # the card named a trial off the front: try the next place
                page.keyboard.press("Escape")
            else:
                raise AssertionError(f"no front point's card named a run on the front (named: {tried})")
            with context.expect_page(timeout=timeout_ms) as opened:  # the card opens the run in a new tab
                link.click()
            run_page = opened.value
            try:
                run_page.wait_for_selector("a[href*='/versions/']", timeout=timeout_ms)
            except Exception as error:  # say which run's page, and keep what it showed
                if screenshot is not None:
                    run_page.screenshot(path=str(screenshot.with_name(f"{screenshot.stem}-run.png")))
                raise AssertionError(f"no link to a registered version on {run_page.url} (the card of a front"
                                     f" point linked to {point_link}): {error}") from None
            run_page_links = run_page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")
        finally:
            browser.close()
    return FrontPage(heading, sections, points, point_link, run_page_links)


def _on_front(address: str, run_link: str) -> bool:
    """Whether the run a card links to is tagged on the front, asked of the tracking server behind `address`."""
    import json
    import urllib.request

    base, run_id = address.split("/#", 1)[0], run_link.rstrip("/").rsplit("/", 1)[-1]
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=60) as response:
        tags = {tag["key"]: tag["value"] for tag in json.loads(response.read())["run"]["data"].get("tags", [])}
    from autoprune.tracking.schema import PARETO_TAG

    return tags.get(PARETO_TAG) == "true"


def _front_clicks(page) -> list[tuple[object, dict[str, float]]]:
    """Where to click each front point: its centre, or, where another marker overlaps it, the side of it away from
    that marker's centre. Plotly gives a click to the marker whose centre is nearest (a busy machine times trials
    alike, and their markers overlap), so the card then names the front point's run."""
    centres = []
    for point in page.locator("path.point").all():
        box = point.bounding_box()
        if box:
            centres.append((box["x"] + box["width"] / 2, box["y"] + box["height"] / 2))
    front = page.locator(f"path.point[style*='fill: {_rgb(FRONT_COLOR)}']")
    clicks = []
    for index in range(front.count()):
        box = front.nth(index).bounding_box()
        if not box:
            continue
        half = box["width"] / 2
        x, y = box["x"] + half, box["y"] + box["height"] / 2
        others = [(cx, cy) for cx, cy in centres if 0.5 < math.hypot(cx - x, cy - y) < 2 * box["width"]]
        position = {"x": half, "y": box["height"] / 2}
        if others:  # step away from the nearest overlapping marker, staying inside this one
            cx, cy = min(others, key=lambda c: math.hypot(c[0] - x, c[1] - y))
            distance = math.hypot(x - cx, y - cy)
            position = {"x": half + 0.7 * half * (x - cx) / distance,
                        "y": box["height"] / 2 + 0.7 * half * (y - cy) / distance}
        clicks.append((front.nth(index), position, len(others)))
    clicks.sort(key=lambda click: click[2])  # the clear ones first
    return [(point, position) for point, position, _ in clicks]


@contextmanager
def ui_server(tracking_uri: str, *, run_id: str | None = None, timeout_s: float = 120) -> Iterator[str]:
    """`autoprune ui` on a free loopback port, as a user starts it; yields the front's address it prints."""
    port = free_port()
    command = [sys.executable, "-m", "autoprune.cli", "ui", "--tracking-uri", tracking_uri, "--port", str(port),
               "--host", LOOPBACK, *(["--run", run_id] if run_id else [])]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        address = None
        while address is None and time.monotonic() < deadline:  # the address is printed once the server answers
            readable, _, _ = select.select([server.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = server.stdout.readline() if readable else ""
            if not line:  # ended, or silent until the deadline
                break
            found = re.search(r"(http://\S+viewStateShareKey=\S+)", line)
            address = found.group(1) if found else None
        if address is None:
            raise RuntimeError(f"`autoprune ui` printed no address (exit {server.poll()})")
        yield address
    finally:
        server.terminate()  # `autoprune ui` stops its MLflow server as it ends
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autoprune.testing.browser", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True, help="the store a search published to")
    parser.add_argument("--run", help="the search's run id (default: the newest finished search)")
    parser.add_argument("--out", required=True, type=Path, help="where to save the screenshot (PNG)")
    args = parser.parse_args(argv)
    missing = why_no_browser()
    if missing:
        print(f"cannot take the screenshot: {missing}", file=sys.stderr)
        return 1
    with ui_server(args.tracking_uri, run_id=args.run) as address:
        page = read_front(address, screenshot=args.out)
    print(f"{args.out}: {address}\n{page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
