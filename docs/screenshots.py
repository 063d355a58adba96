"""Screenshots of the catalog for the README, from a running featureplane.

    ./dev up --demo                                   # in one terminal; wait a minute
    .venv/bin/python docs/screenshots.py [http://127.0.0.1:8080]

Writes docs/catalog-groups.png (the groups list) and docs/catalog-group.png (one group's
page with a lookup), in Debian's chromium (`apt install chromium`), headless.
"""

from __future__ import annotations

import shutil
import sys
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
GROUP = "recent_user_clicked_fleaMarketArticles"
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def demo_user(base: str) -> str:
    """An id the demo has clicks for: the first of its users with any."""
    for i in range(200):
        url = f"{base}/v1/features/{GROUP}/user-{i}?limit=3"
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (http only, below)
            if b'"found":true' in resp.read():
                return f"user-{i}"
    raise SystemExit("no demo user has clicks yet: is `featureplane up --demo` running?")


def main() -> None:
    base = (sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080").rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise SystemExit(f"{base!r} is not an http:// or https:// URL")
    user = demo_user(base)
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
        page.goto(f"{base}/ui")
        page.wait_for_timeout(11_000)  # a second scrape of the metrics: figures over a span
        page.reload()
        page.wait_for_selector("#groups")
        page.screenshot(path=HERE / "catalog-groups.png", full_page=True)
        page.goto(f"{base}/ui/groups/{GROUP}")
        page.fill("#lookup input[name=id]", user)
        page.fill("#lookup input[name=limit]", "2")
        page.click("#lookup button")
        page.wait_for_selector("#lookup-answer pre")
        page.screenshot(path=HERE / "catalog-group.png", full_page=True)
        browser.close()
    print(f"wrote {HERE / 'catalog-groups.png'} and {HERE / 'catalog-group.png'}")


if __name__ == "__main__":
    main()
