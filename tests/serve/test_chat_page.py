"""The chat page at /: static HTML served without the key (it asks for it), and, in a real
headless Chromium (Debian's chromium + chromium-driver, through Selenium), a typed message gets
a streamed reply from the server; the test skips where no Chromium is installed."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest


def test_the_page_is_served_without_the_key_and_holds_no_server_data(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert 'id="key"' in page and "/v1/chat/completions" in page and "<script src=" not in page  # no CDN
    assert server.api_key not in page and "tiny-serve" not in page
    assert httpx.get(server.url + "/stats").status_code == 401  # the data routes still need the key


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")), reason="needs Debian chromium")
def test_a_message_typed_in_a_real_browser_gets_a_streamed_reply(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "key").send_keys(server.api_key)
        for field, value in (("max_tokens", "12"), ("temperature", "0")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.ID, "prompt").send_keys("Hello there", Keys.ENTER)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg[data-done]"))
        reply = driver.find_elements(By.CSS_SELECTOR, ".msg[data-done]")[-1]
        assert reply.get_attribute("data-done") == "1", reply.text
        assert "assistant" in reply.get_attribute("class")
        # Greedy, so the page must show what the server answers the same request with.
        expected = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key).chat.completions.create(
            model="tiny-serve", messages=[{"role": "user", "content": "Hello there"}], max_tokens=12, temperature=0
        )
        assert " ".join(reply.text.split()) == " ".join((expected.choices[0].message.content or "").split())
        assert driver.find_elements(By.CSS_SELECTOR, ".msg.user")[-1].text == "Hello there"
        # A wrong key: the page shows the server's 401 message instead of a reply.
        key = driver.find_element(By.ID, "key")
        key.clear()
        key.send_keys("wrong")
        driver.find_element(By.ID, "prompt").send_keys("again", Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
        assert "API key" in driver.find_elements(By.CSS_SELECTOR, ".msg.error")[-1].text
    finally:
        driver.quit()
