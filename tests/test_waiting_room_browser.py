"""The waiting room's page in a real headless Chromium (Debian's chromium and
chromium-driver, driven by selenium): it solves the proof of work with SubtleCrypto,
joins, waits, is admitted and buys with the pass; the sale is exact. Skipped, saying
why, where Chromium or its driver is not installed (.ci/run installs both)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from redis.asyncio import Redis

from tests.helpers import OpenGateway, Shop, check_invariant
from tests.waiting_room_helpers import QUEUE, SECRET, with_room

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or DRIVER is None,
        reason="chromium and chromedriver are not on PATH "
        "(Debian: apt-get install chromium chromium-driver; .ci/run does)",
    ),
]

#: States after which the page does nothing more.
FINAL = {"bought", "sold-out", "closed", "expired", "error", "handover"}
ARGUMENTS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # several tabs poll at once: none of them is put to sleep as a background tab
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
)


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    for argument in (*ARGUMENTS, f"--user-data-dir={profile}"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def open_tabs(driver: Any, urls: list[str]) -> list[str]:
    handles = []
    for i, url in enumerate(urls):
        if i:
            driver.switch_to.new_window("tab")
        driver.get(url)
        handles.append(driver.current_window_handle)
    return handles


def states(driver: Any, handles: list[str]) -> list[str]:
    found = []
    for handle in handles:
        driver.switch_to.window(handle)
        found.append(driver.execute_script("return document.getElementById('room').dataset.state"))
    return found


def wait_until_final(driver: Any, handles: list[str], within: float = 90.0) -> list[str]:
    deadline = time.monotonic() + within
    while True:
        now = states(driver, handles)
        if all(state in FINAL for state in now):
            return now
        assert time.monotonic() < deadline, f"the pages did not finish: {now}"
        time.sleep(0.2)  # the poll interval of this bounded wait


async def test_the_page_joins_waits_is_admitted_and_buys(
    settings_data: dict[str, Any],
    new_gateway: OpenGateway,
    redis: Redis,
    shop: Shop,
    tmp_path: Path,
) -> None:
    settings_data["campaigns"][0]["stock"] = 2
    with_room(
        settings_data,
        admit_rate=2,
        max_passes_per_unit=1,
        proof_of_work={"difficulty": 10},
        heartbeat="20s",
    )
    async with new_gateway() as gw:
        page = str(gw.edge.make_url(f"{QUEUE}/page"))
        users = ["alice", "bob", "carol"]

        def run() -> list[str]:
            with chromium(tmp_path / "profile") as driver:
                handles = open_tabs(driver, [f"{page}#user={user}" for user in users])
                return wait_until_final(driver, handles)

        final = await asyncio.to_thread(run)
    assert sorted(final) == ["bought", "bought", "closed"], final
    assert len(shop.seen) == 2
    assert {s.headers["X-User-Id"] for s in shop.seen} < set(users)
    state = await check_invariant(redis, "phone-1111", 1)
    assert (state["sold"], state["available"]) == (2, 0)


async def test_the_page_hands_an_admitted_buyer_over_to_the_shop(
    settings_data: dict[str, Any],
    new_gateway: OpenGateway,
    redis: Redis,
    shop: Shop,
    tmp_path: Path,
) -> None:
    with_room(settings_data, shop_url=f"{shop.url}/checkout")
    async with new_gateway() as gw:
        page = str(gw.edge.make_url(f"{QUEUE}/page"))

        def run() -> str:
            with chromium(tmp_path / "profile") as driver:
                driver.get(f"{page}#user=alice")
                deadline = time.monotonic() + 60
                while "queue_pass=" not in driver.current_url:
                    assert time.monotonic() < deadline, driver.current_url
                    time.sleep(0.2)  # the poll interval of this bounded wait
                return str(driver.current_url)

        landed = await asyncio.to_thread(run)
    assert landed.startswith(f"{shop.url}/checkout#queue_pass=")
    token = landed.split("queue_pass=", 1)[1].split("&", 1)[0]
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="flashgate:queue:phone-1111")
    assert claims["sub"] == "alice"
    assert not shop.seen or all(s.method == "GET" for s in shop.seen)  # nothing was bought
