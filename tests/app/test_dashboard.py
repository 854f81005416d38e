"""The operator dashboard in a real browser (Debian chromium + chromedriver, driven by selenium) against a real
node: a series sent with dcmtk storescu, its job listed and opened with its preview, the rule tester, retry and
replay, and the login wall (no session: redirected to the login page; a POST without a session, without the
page's CSRF value or from another origin is refused). Without chromium/chromedriver/selenium the browser tests
skip; the HTTP checks of the login wall (and of a node without a token) still run.

Screenshots go to the test's temporary folder and, when ``SRNODE_ARTIFACTS`` names a folder, there too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pydicom
import pytest

from node.store import Index
from tests.support.nodeproc import NodeProc, delivered
from tests.support.pacs import TOKEN, phantom, start_node
from tests.support.peers import storescu, wait_until

try:
    from selenium.webdriver.common.by import By
except ImportError:  # selenium absent: the browser tests skip (the browser fixture says why)
    By = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# headless, and nothing reaches out to Google's hosts (the test network is closed)
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1440,1100")
RULES = [
    {"name": "thick-ct", "description": "CT with slices of 3 mm or more", "through_plane_factor": 3,
     "match": {"Modality": "CT", "SliceThickness": "([3-9]|[1-9][0-9]+)(\\.[0-9]*)?"}, "destinations": ["out"]},
    {"name": "all-ct-mr", "match": {"Modality": "^(CT|MR)$"}, "through_plane_factor": 2, "destinations": ["out"]},
]
DONE = ("delivered", "failed", "dead-letter", "ignored")


class Dash:
    """The node with a delivered and a failed job, and where screenshots go."""

    def __init__(self, node: NodeProc, good: pydicom.Dataset, shots: Path) -> None:
        self.node, self.good, self.shots = node, good, shots
        self.url = node.http_url + "/dashboard"

    def job_of(self, series_uid: str) -> dict[str, Any]:
        return [j for j in self.node.jobs() if j["series"] == series_uid][-1]

    def shot(self, driver: WebDriver, name: str) -> Path:
        path = self.shots / f"{name}.png"
        driver.save_screenshot(str(path))
        if os.environ.get("SRNODE_ARTIFACTS"):
            dest = Path(os.environ["SRNODE_ARTIFACTS"])
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest / f"dashboard-{name}.png")
        return path


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dash]:
    work = tmp_path_factory.mktemp("dashboard")
    node = start_node(work / "node", {"rules": RULES})
    try:
        good = phantom(work, seed=81, slices=5)
        bad = phantom(work, seed=82, slices=1)  # one slice is no volume: its job fails
        for files in (good, bad):
            sent = storescu(files, node.port)
            assert sent.returncode == 0, sent.stderr
        series = {pydicom.dcmread(f[0], stop_before_pixels=True).SeriesInstanceUID for f in (good, bad)}
        node.wait_jobs(lambda jobs: {j["series"] for j in jobs if j["state"] in DONE} >= series, timeout=180,
                       what="the jobs of both series to finish")
        shots = work / "screenshots"
        shots.mkdir()
        yield Dash(node, pydicom.dcmread(good[0], stop_before_pixels=True), shots)
    finally:
        node.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("the dashboard's browser tests need Debian's chromium and chromium-driver "
                    "(scripts/install-system.sh installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install .[dev])")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="srnode-chromium-")
    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver: WebDriver, cond: Any, timeout: float = 30) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(cond)


def _login(driver: WebDriver, dash: Dash) -> None:
    driver.get(dash.url)
    if driver.current_url.endswith("/dashboard/login"):
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "login").click()
        _wait(driver, lambda d: d.current_url.rstrip("/").endswith("/dashboard"))


def test_without_a_session_the_dashboard_sends_to_login_and_refuses_posts(dash: Dash) -> None:
    job = dash.job_of(dash.good.SeriesInstanceUID)
    before = len(dash.node.jobs())
    origin = {"Origin": dash.node.http_url}
    with httpx.Client(base_url=dash.node.http_url, timeout=30, follow_redirects=False) as c:
        for path in ("/dashboard", f"/dashboard/jobs/{job['id']}", f"/dashboard/jobs/{job['id']}/preview.png",
                     "/dashboard/rules"):
            r = c.get(path)
            assert r.status_code == 303 and r.headers["location"] == "/dashboard/login", path
        # the API's bearer token is no dashboard session; a forged cookie neither
        assert c.post(f"/dashboard/jobs/{job['id']}/replay", headers={**origin, "Authorization": f"Bearer {TOKEN}"},
                      data={"csrf": "x"}).status_code == 403
        c.cookies.set("srnode_dashboard", "9999999999.abcd.0123", path="/dashboard")
        assert c.post(f"/dashboard/jobs/{job['id']}/replay", headers=origin).status_code == 403
        c.cookies.clear()
        assert c.post("/dashboard/login", data={"token": "wrong"}, headers=origin).status_code == 401
        assert c.post("/dashboard/login", data={"token": TOKEN}).status_code == 403  # no Origin: refused
        r = c.post("/dashboard/login", data={"token": TOKEN}, headers=origin)
        assert r.status_code == 303
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/dashboard" in cookie
        # a session, but without the page's CSRF value or from another origin: refused
        assert c.post(f"/dashboard/jobs/{job['id']}/replay", headers=origin, data={"csrf": "x"}).status_code == 403
        csrf = _csrf(c.get(f"/dashboard/jobs/{job['id']}").text)
        assert c.post(f"/dashboard/jobs/{job['id']}/replay", data={"csrf": csrf},
                      headers={"Origin": "http://evil.example"}).status_code == 403
        assert c.post(f"/dashboard/jobs/{job['id']}/replay", data={"csrf": csrf}).status_code == 403  # no Origin
    assert len(dash.node.jobs()) == before  # nothing was queued


def test_a_cookie_that_is_not_ascii_is_no_session_not_a_server_error(dash: Dash) -> None:
    """break13p: a session cookie (or form value) holding a byte above 0x7F made hmac.compare_digest raise
    TypeError: every dashboard page answered 500 with a traceback in the node's log. Now it is no session."""
    job = dash.job_of(dash.good.SeriesInstanceUID)
    with httpx.Client(base_url=dash.node.http_url, timeout=30, follow_redirects=False) as c:
        for value in (b"9999999999.abcd.\xe9\xe9", b"9999999999.\xe9.0123"):
            cookie = {"Cookie": b"srnode_dashboard=" + value}
            r = c.get("/dashboard", headers=cookie)
            assert r.status_code == 303 and r.headers["location"] == "/dashboard/login", r.status_code
            r = c.post(f"/dashboard/jobs/{job['id']}/replay", data={"csrf": "x"},
                       headers={**cookie, "Origin": dash.node.http_url})
            assert r.status_code == 403, r.status_code
    assert "Traceback" not in dash.node.log()


def _csrf(page: str) -> str:
    return page.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def test_without_a_token_no_login_on_loopback_only(tmp_path: Path) -> None:
    with NodeProc.start(tmp_path / "node", {"rules": RULES}) as node:  # [http] token empty, bound to 127.0.0.1
        with httpx.Client(base_url=node.http_url, timeout=30, follow_redirects=False) as c:
            page = c.get("/dashboard")
            assert page.status_code == 200 and "Jobs" in page.text and "Log out" not in page.text
            assert page.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in \
                page.headers["content-security-policy"]
            assert c.get("/dashboard/login").status_code == 303
            # a web page that rebinds its own name to 127.0.0.1 gets nothing
            assert c.get("/dashboard", headers={"Host": f"rebound.example:{node.config['http']['port']}"}
                         ).status_code == 421
            form = {"csrf": _csrf(c.get("/dashboard/rules").text), "tags": "Modality = CT\nSliceThickness = 5"}
            assert c.post("/dashboard/rules", data=form).status_code == 403  # no Origin: refused
            tested = c.post("/dashboard/rules", data=form, headers={"Origin": node.http_url})
            assert tested.status_code == 200 and 'id="matched-rule">thick-ct<' in tested.text


def test_login_page_in_the_browser(dash: Dash, browser: WebDriver) -> None:
    browser.delete_all_cookies()
    browser.get(dash.url)
    assert browser.current_url.endswith("/dashboard/login")  # no session: the login page
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.ID, "login").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "login-error"))
    assert browser.current_url.endswith("/dashboard/login")
    _login(browser, dash)
    assert browser.find_element(By.ID, "jobs")


def test_jobs_page_and_job_page_with_its_preview(dash: Dash, browser: WebDriver) -> None:
    _login(browser, dash)
    job = dash.job_of(dash.good.SeriesInstanceUID)
    failed = [j for j in dash.node.jobs() if j["state"] == "failed"][0]
    row = browser.find_element(By.ID, f"job-{job['id']}")
    assert row.get_attribute("data-state") == "delivered"
    text = row.text
    assert "delivered" in text and "thick-ct" in text and "cubic" in text and "out: delivered" in text
    assert job["series"] in text
    assert browser.find_element(By.ID, f"job-{failed['id']}").get_attribute("data-state") == "failed"
    assert failed["reason"] and failed["reason"][:40] in browser.find_element(By.ID, f"job-{failed['id']}").text
    page = browser.page_source
    for phi in (str(dash.good.PatientName), str(dash.good.PatientID)):  # never any patient data
        assert phi not in page
    dash.shot(browser, "jobs")

    browser.find_element(By.LINK_TEXT, f"#{job['id']}").click()
    _wait(browser, lambda d: d.current_url.endswith(f"/dashboard/jobs/{job['id']}"))
    img = browser.find_element(By.ID, "preview")
    loaded = _wait(browser, lambda d: d.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth", img), timeout=90)
    assert loaded > 0
    assert browser.find_element(By.ID, "state").text == "delivered"
    assert "Replay" in browser.find_element(By.ID, "replay").text
    assert (dash.node.spool / "outbox" / f"job-{job['id']}" / "preview.png").is_file()  # kept for the next view
    for phi in (str(dash.good.PatientName), str(dash.good.PatientID)):
        assert phi not in browser.page_source
    dash.shot(browser, "job")


def _submit(browser: WebDriver, button: str) -> None:
    """Click a form's submit ``button`` and wait for the NEW page (the old one may still be shown right after the
    click: reading it gave the previous answer)."""
    from selenium.common.exceptions import WebDriverException

    old = browser.find_element(By.TAG_NAME, "html")

    def gone(_driver: WebDriver) -> bool:  # selenium's staleness_of, also when chromedriver answers the old page's
        try:  # element with "Node with given id does not belong to the document" (an unknown error, not a stale
            old.is_enabled()  # element one: seen once in 1035 runs, it failed the test instead of meaning "gone")
            return False
        except WebDriverException:  # StaleElementReferenceException is one
            return True

    browser.find_element(By.ID, button).click()
    _wait(browser, gone)
    _wait(browser, lambda d: d.find_elements(By.ID, "result"))


def _tester(browser: WebDriver, tags: str) -> None:
    box = browser.find_element(By.ID, "tags")
    box.clear()
    box.send_keys(tags)
    _submit(browser, "test-tags")


def test_rule_tester(dash: Dash, browser: WebDriver) -> None:
    _login(browser, dash)
    browser.get(dash.url + "/rules")
    _tester(browser, "Modality = CT\nSliceThickness = 5")
    assert browser.find_element(By.ID, "matched-rule").text == "thick-ct"
    assert "×3" in browser.find_element(By.ID, "factors").text
    assert "out" in browser.find_element(By.ID, "destinations").text
    dash.shot(browser, "rules")
    _tester(browser, "Modality = CT\nSliceThickness = 1.25")
    assert browser.find_element(By.ID, "matched-rule").text == "all-ct-mr"
    _tester(browser, "Modality = US\nNoSuchKeyword = 1")
    assert "no rule matched" in browser.find_element(By.ID, "no-rule").text
    assert "NoSuchKeyword" in browser.find_element(By.ID, "result").text  # the line it could not use
    # a spooled series, as the node decides
    key = f"{dash.good.StudyInstanceUID}|{dash.good.SeriesInstanceUID}"
    browser.find_element(By.CSS_SELECTOR, f"#series option[value='{key}']").click()
    _submit(browser, "test-series")
    assert browser.find_element(By.ID, "matched-rule").text == "thick-ct"
    assert dash.good.SeriesInstanceUID in browser.find_element(By.ID, "result").text


def test_retry_a_failed_job_and_replay_a_delivered_one(dash: Dash, browser: WebDriver) -> None:
    _login(browser, dash)
    failed = [j for j in dash.node.jobs() if j["state"] == "failed"][0]
    index = Index(dash.node.spool / "index.sqlite")
    failed_at = index.job(failed["id"]).updated
    browser.get(f"{dash.url}/jobs/{failed['id']}")
    browser.find_element(By.ID, "retry").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "message"))
    assert browser.find_element(By.ID, "message").text == "Re-queued for processing."
    # it was queued again and ran again (and failed again: one slice is still no volume)
    wait_until(lambda: index.job(failed["id"]).state == "failed" and index.job(failed["id"]).updated > failed_at,
               timeout=120, what="the retried job to run again")

    job = dash.job_of(dash.good.SeriesInstanceUID)
    browser.get(f"{dash.url}/jobs/{job['id']}")
    browser.find_element(By.ID, "replay").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "message"))
    assert browser.find_element(By.ID, "message").text == "Queued as a replay."
    new_id = int(browser.current_url.rsplit("/", 1)[1].split("?")[0])
    assert new_id > job["id"]
    dash.node.wait_jobs(lambda jobs: any(j["id"] == new_id and j["state"] == "delivered" for j in jobs),
                        what=f"the replay (job {new_id}) to be delivered")
    browser.get(dash.url)
    row = browser.find_element(By.ID, f"job-{new_id}")
    assert row.get_attribute("data-state") == "delivered" and f"supersedes #{job['id']}" in row.text
    assert browser.find_element(By.ID, f"job-{job['id']}").get_attribute("data-state") == "delivered"
    dash.shot(browser, "jobs-after-replay")


def test_the_rule_tester_leaves_out_a_series_the_retention_pruned(tmp_path: Path, browser: WebDriver) -> None:
    """A series the retention pruned has no instance left to test a rule on: the rule tester's list of spooled
    series leaves it out (listed, testing it could only say "that series is not in the spool (any more)"), while a
    series still in the spool is listed."""
    node = start_node(tmp_path / "node", {"rules": RULES, "node": {"retention_days": 2e-5}})  # 1.7 s
    try:
        pruned, kept = phantom(tmp_path, seed=83, slices=5), phantom(tmp_path, seed=84, slices=5)
        assert storescu(pruned, node.port).returncode == 0
        node.wait_jobs(delivered(), what="the first series delivered")
        wait_until(lambda: "pruned 1 series" in node.cli("prune").stdout, timeout=60, interval=0.5,
                   what="the retention to pass and the prune")
        assert storescu(kept, node.port).returncode == 0
        pruned_ds, kept_ds = (pydicom.dcmread(f[0], stop_before_pixels=True) for f in (pruned, kept))
        dash = Dash(node, kept_ds, tmp_path)
        _login(browser, dash)
        browser.get(dash.url + "/rules")
        listed = {o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#series option")}
        assert f"{kept_ds.StudyInstanceUID}|{kept_ds.SeriesInstanceUID}" in listed, listed
        assert f"{pruned_ds.StudyInstanceUID}|{pruned_ds.SeriesInstanceUID}" not in listed, listed
        dash.shot(browser, "rules-after-prune")
    finally:
        node.stop()
