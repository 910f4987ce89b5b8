"""The MLflow UI as a user sees it: a real `mlflow ui` on a store, opened in headless Chromium (Debian's chromium
and chromedriver, driven by Selenium) at the link `dist2 ablate` prints. The tests use it where Chromium is
installed; by hand it makes the README's screenshot of a finished grid:

    python tests/mlflow_ui.py sqlite:///$PWD/runs/mlflow.db quickstart docs/mlflow_ui.png
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# As the machine's notes advise: no background connections (the network is closed), a new profile each time.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def available() -> bool:
    return Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file() and bool(importlib.util.find_spec("selenium"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(store: str):
    """`mlflow ui` on `store` on a free loopback port, once it answers; yields the port."""
    port = _free_port()
    # Without MLflow 3's job runner, as compose.yaml runs its server: its Huey consumers would take both cores of a
    # small machine for ~15 s, and the UI does not need them.
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host",
                               "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("mlflow ui did not start") from None
                time.sleep(0.5)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextlib.contextmanager
def chromium(width: int = 1700, height: int = 700):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def open_runs(driver, link: str, parent: str, timeout: float = 60) -> str:
    """Open the experiment's page at `link`, wait for the ablation's run `parent`, close the assistant panel and
    expand the parent's children; returns the page's text."""
    from selenium.webdriver.common.by import By

    driver.get(link)
    deadline = time.monotonic() + timeout
    while parent not in driver.find_element(By.TAG_NAME, "body").text:
        if time.monotonic() > deadline:
            raise AssertionError(f"{parent!r} not on {link}: {driver.find_element(By.TAG_NAME, 'body').text[:2000]}")
        time.sleep(0.5)
    for close in driver.find_elements(By.CSS_SELECTOR, "[aria-label=Close]"):
        close.click()  # the assistant's side panel
    for expand in driver.find_elements(By.CSS_SELECTOR, "[data-component-id*=runnamecellrenderer]"):
        expand.click()  # the "+" before a parent run
    time.sleep(2)  # the children's rows, their dataset and model cells
    return driver.find_element(By.TAG_NAME, "body").text


def main(store: str, experiment: str, picture: str) -> None:
    from dist2.tracking import ui_command

    with mlflow_ui(store) as port, chromium(height=820) as driver:  # the quickstart's eight rows
        link = ui_command(store, experiment, port).split("then open ")[-1]
        open_runs(driver, link, experiment)
        driver.save_screenshot(picture)
    print(f"{picture}: {link}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
