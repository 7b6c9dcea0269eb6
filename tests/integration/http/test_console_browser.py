"""The web console in a real browser: Debian's Chromium driven by Selenium (chromium-driver).

An admin signs in, filters (status, virus, sender; text in the subject; the listener), opens
a held EICAR message (its HTML part shown as text, no script run), releases it to the SMTP
sink and sees it arrive, deletes another; a read-only user sees no release button and gets
403 on the POST. Screenshots of the list, message and dashboard
pages are written to ``var/screenshots/`` (not committed) for a reviewer to look at.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import require_binary, wait_until
from tests.integration.http.conftest import READ_TOKEN, TOKEN, HttpEnv, SmtpSink

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (test extra) missing")
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.expected_conditions import staleness_of  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

SCREENSHOTS = Path(__file__).resolve().parents[3] / "var" / "screenshots"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    chromium = require_binary("chromium", "chromium")
    chromedriver = require_binary("chromedriver", "chromium-driver")
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def click_to_load(driver: webdriver.Chrome, element_id: str) -> None:
    """Click what loads a new page (a submit button, a link) and wait until it replaced this
    one: on a busy machine the next find_element could otherwise still see the old page."""
    element = driver.find_element(By.ID, element_id)
    element.click()
    WebDriverWait(driver, 30).until(staleness_of(element))


def shot(driver: webdriver.Chrome, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(SCREENSHOTS / f"console-{name}.png"))


def sign_in(driver: webdriver.Chrome, env: HttpEnv, token: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{env.base_url}/console/signin")
    driver.find_element(By.ID, "token").send_keys(token)
    click_to_load(driver, "signin")
    assert driver.current_url.endswith("/console/quarantine"), driver.page_source[:500]


def record_links(driver: webdriver.Chrome) -> list[str]:
    return [a.get_attribute("href") or "" for a in driver.find_elements(By.CSS_SELECTOR,
                                                                        "a.record")]


def test_admin_and_reader_in_chromium(browser: webdriver.Chrome,
                                      console: tuple[HttpEnv, int],
                                      smtp_sink: SmtpSink) -> None:
    env, _ = console
    driver = browser
    sign_in(driver, env, TOKEN)
    assert driver.find_element(By.ID, "total").text == "2"
    shot(driver, "list")
    # filter: infected Eicar from eve
    Select(driver.find_element(By.NAME, "status")).select_by_value("infected")
    driver.find_element(By.NAME, "virus").send_keys("Eicar*")
    driver.find_element(By.NAME, "sender").send_keys("eve@*")
    click_to_load(driver, "filter")
    assert "status=infected" in driver.current_url
    assert len(record_links(driver)) == 2
    driver.find_element(By.NAME, "sender").clear()
    driver.find_element(By.NAME, "sender").send_keys("nobody@*")
    click_to_load(driver, "filter")
    assert record_links(driver) == []
    driver.get(f"{env.base_url}/console/quarantine")
    first, second = record_links(driver)
    # issue 16: text in the subject (a % is just a character), then the listener
    driver.find_element(By.NAME, "subject").send_keys("50% & more")
    click_to_load(driver, "filter")
    assert record_links(driver) == [first]
    assert driver.find_element(By.CSS_SELECTOR, "td.subject").text == "second held: 50% & more"
    driver.find_element(By.NAME, "subject").clear()
    driver.find_element(By.NAME, "listener").send_keys("SMTP")
    click_to_load(driver, "filter")
    assert "listener=SMTP" in driver.current_url and "subject=&" in driver.current_url
    assert record_links(driver) == [second] and driver.find_element(By.ID, "total").text == "1"
    assert [td.text for td in driver.find_elements(By.CSS_SELECTOR, "td.subject")] == [
        "first held"]
    shot(driver, "list-filtered")
    driver.get(f"{env.base_url}/console/quarantine")

    # the held message: EICAR found, the HTML part shown as text and never run
    driver.get(first)
    assert "Eicar-Test-Signature" in driver.find_element(By.ID, "findings").text
    assert "<script>alert('pwned')</script>" in driver.page_source.replace("&lt;", "<").replace(
        "&gt;", ">")
    with pytest.raises(NoAlertPresentException):
        _ = driver.switch_to.alert.text
    assert driver.find_elements(By.TAG_NAME, "img") == []
    shot(driver, "message")

    # release to the original recipient, confirmed; it reaches the sink
    click_to_load(driver, "release")
    click_to_load(driver, "confirm")
    assert "was released to bob@example.test" in driver.find_element(By.ID, "done").text
    assert wait_until(lambda: len(smtp_sink.handler.messages) == 1, 15)
    assert smtp_sink.handler.messages[0][1] == ["bob@example.test"]

    # delete the other one
    driver.get(second)
    click_to_load(driver, "delete")
    click_to_load(driver, "confirm")
    assert "was deleted" in driver.find_element(By.ID, "done").text
    driver.get(f"{env.base_url}/console/quarantine")
    assert driver.find_element(By.ID, "total").text == "1"

    driver.get(f"{env.base_url}/console/dashboard")
    assert len(driver.find_elements(By.CSS_SELECTOR, "figure svg")) == 2
    shot(driver, "dashboard")

    # a read-only user: no release button, and the POST itself is refused
    sign_in(driver, env, READ_TOKEN)
    driver.get(first)
    assert driver.find_elements(By.ID, "release") == []
    csrf = re.search(r'name="csrf" value="([^"]+)"', driver.page_source)
    assert csrf is not None
    cookies = {c["name"]: c["value"] for c in driver.get_cookies()}
    rid = first.rsplit("/", 1)[1]
    r = httpx.post(f"{env.base_url}/console/quarantine/{rid}/release",
                   data={"csrf": csrf.group(1), "force": "1"}, cookies=cookies, timeout=20)
    assert r.status_code == 403
    assert len(smtp_sink.handler.messages) == 1
