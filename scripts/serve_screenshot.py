"""A screenshot of ``llava-uhd serve``'s web page answering a question with the built-in nano model (for the README).

Starts the server in this process on a free port, opens the page in headless Chromium (Selenium; Debian's
``chromium`` and ``chromium-driver``), picks a synthetic single-shape picture, waits for the slice grid, asks what
colour the shape is, waits for the streamed answer, and saves the window.

    .venv/bin/python scripts/serve_screenshot.py --out results/serve/web_page.png
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from llava_uhd.data.probes import probe_sample
from llava_uhd.nano.settings import NanoSettings
from llava_uhd.serve.loading import load_model
from llava_uhd.serve.server import create_app, running_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/serve/web_page.png")
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args()
    model, processor, _ = load_model(None)
    sample = probe_sample(args.seed, "probe_colour", NanoSettings(), size=(1008, 672))
    folder = Path(tempfile.mkdtemp())
    sample.image.save(folder / "picture.png")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1060"):
        options.add_argument(flag)
    with running_server(create_app(model, processor, "llava-uhd-nano")) as url:
        browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            browser.get(url)
            wait = WebDriverWait(browser, 300)
            picker = browser.find_element(By.ID, "file")
            browser.execute_script("arguments[0].hidden = false", picker)
            picker.send_keys(str(folder / "picture.png"))
            browser.execute_script("arguments[0].hidden = true", picker)
            wait.until(lambda b: b.find_element(By.ID, "plan").text)
            browser.find_element(By.ID, "question").send_keys(sample.question)
            browser.find_element(By.ID, "ask").click()
            wait.until(lambda b: b.find_element(By.ID, "answer").get_attribute("data-done") == "1")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(args.out)
            print(f"{sample.question} -> {browser.find_element(By.ID, 'answer').text!r} (expected "
                  f"{sample.answer!r}); plan: {browser.find_element(By.ID, 'plan').text}; wrote {args.out}")
        finally:
            browser.quit()
    shutil.rmtree(folder)


if __name__ == "__main__":
    main()
