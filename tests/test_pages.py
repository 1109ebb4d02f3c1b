"""The web pages in a real browser: Debian's Chromium driven by Playwright.

The API here has every sign-on on (conftest `signon_settings`); people sign in through the
local OIDC issuer's pages exactly as on the local stack. Screenshots land in
`test-artifacts/screenshots/`; with UPDATE_SCREENSHOTS=1 the README's copies in
`docs/screenshots/` are refreshed too.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from api import pages
from conftest import mail_to, secret_of, unique_email, wait_until
from devstack.oidc import APPROVERS_GROUP
from test_key_request_flow import KEY, plain

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "screenshots"
README_SHOTS = ROOT / "docs" / "screenshots"
APPROVER = "approver@example.com"

if not Path(CHROMIUM).exists():
    reason = f"browser tests need Chromium at {CHROMIUM} (Debian package `chromium`)"
    if os.environ.get("REQUIRE_SYSTEM_TOOLS") == "1":
        raise RuntimeError(reason + "; REQUIRE_SYSTEM_TOOLS=1 makes its absence a failure")
    pytest.skip(reason, allow_module_level=True)

from playwright.async_api import Browser, BrowserContext, Page, async_playwright  # noqa: E402


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
        )  # fmt: skip
        yield launched
        await launched.close()


@pytest.fixture
async def context(browser, signon_url) -> AsyncIterator[BrowserContext]:
    fresh = await browser.new_context(base_url=signon_url, viewport={"width": 1100, "height": 900})
    fresh.set_default_timeout(30_000)
    # Offline means offline: anything not on loopback fails, and the test says so.
    outside: list[str] = []

    async def only_loopback(route):
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            await route.continue_()
        else:
            outside.append(route.request.url)
            await route.abort()

    await fresh.route("**/*", only_loopback)
    yield fresh
    await fresh.close()
    assert not outside, f"pages fetched from outside: {outside}"


async def screenshot(page: Page, name: str, readme: bool = False) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=path, full_page=True)
    if readme and os.environ.get("UPDATE_SCREENSHOTS") == "1":
        README_SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, README_SHOTS / path.name)


async def sign_in(page: Page, email: str | None = None, groups: str = "") -> None:
    """Through the inbox link, the issuer's sign-in page, and back."""
    await page.goto("/inbox")
    await page.wait_for_url(re.compile(r"/authorize\?"))
    if email is None:
        await page.get_by_role("button", name=f"Sign in as {APPROVER}").click()
    else:
        await page.get_by_label("Email").fill(email)
        await page.get_by_label("Groups (comma-separated)").fill(groups)
        await page.get_by_role("button", name="Sign in", exact=True).click()
    await page.wait_for_url(re.compile(r"/inbox$"))


async def submit_form(page: Page, email: str, model: str, justification: str = "") -> str:
    await page.goto("/request")
    await page.get_by_label("Your work email").fill(email)
    await page.locator(f"input[name=llm][value='{model}']").check()
    await page.get_by_label("Why do you need it? (optional)").fill(justification)
    await page.get_by_role("button", name="Request key").click()
    await page.wait_for_url(re.compile(r"/request/[0-9a-f]{20}$"))
    return page.url.rsplit("/", 1)[1]


async def test_a_requester_submits_the_form_and_the_key_arrives(context, mail, litellm):
    page = await context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    await page.goto("/request")
    assert await page.get_by_text("Fast, inexpensive model for everyday tasks").is_visible()
    email = unique_email("approve.example.com")
    justification = 'Prototype <script>alert("x")</script> & "quotes"'
    await page.get_by_label("Your work email").fill(email)
    await page.locator("input[name=llm][value='gpt-4o-mini']").check()
    await page.get_by_label("Why do you need it? (optional)").fill(justification)
    await screenshot(page, "request-form", readme=True)
    await page.get_by_role("button", name="Request key").click()
    await page.wait_for_url(re.compile(r"/request/[0-9a-f]{20}$"))

    [message] = await mail_to(mail, email)
    assert litellm.has_live_key(KEY.search(plain(message)).group(0))
    await page.reload()
    await page.get_by_text("Approved: the key has been emailed to you.").wait_for()
    # Shown as the text it is, never run as markup.
    assert await page.locator("dd.text").first.inner_text() == justification
    assert not dialogs
    await screenshot(page, "request-status", readme=True)


async def test_the_form_works_from_the_keyboard_with_every_control_labelled(context):
    page = await context.new_page()
    await page.goto("/request")
    unlabelled = await page.evaluate(
        """[...document.querySelectorAll('input:not([type=hidden]), textarea, select')]
            .filter(e => e.labels.length === 0).map(e => e.name)"""
    )
    assert unlabelled == []
    order = []
    for _ in range(12):
        await page.keyboard.press("Tab")
        order.append(
            await page.evaluate(
                "document.activeElement.name || document.activeElement.textContent.trim()"
            )
        )
        if order[-1] == "Request key":
            break
    assert order[0] == "Skip to content"
    fields = [name for name in order if name in ("email", "llm", "justification", "Request key")]
    assert fields == ["email", "llm", "justification", "Request key"]
    csp = (await page.request.get("/request")).headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp


async def test_form_errors_name_the_field(context):
    page = await context.new_page()
    await page.goto("/request")
    await page.get_by_label("Your work email").fill("not-an-email")
    await page.get_by_role("button", name="Request key").click()
    alert = page.get_by_role("alert")
    await alert.wait_for()
    text = await alert.inner_text()
    assert "email" in text and "llm" in text
    assert await page.get_by_label("Your work email").get_attribute("aria-invalid") == "true"


async def test_an_approver_signed_in_through_the_issuer_approves_from_the_inbox(
    context, signon_api, mail, kube
):
    email = unique_email("manual.example.com")
    response = await signon_api.post(
        "/api/request-key",
        json={"email": email, "llm": "gpt-4o", "justification": "Evaluating <b>summaries</b>"},
    )
    request_id = response.json()["request_id"]
    page = await context.new_page()
    await sign_in(page)
    await page.get_by_text(f"Signed in as {APPROVER}").wait_for()

    entry = page.locator("section.request", has=page.locator(f"#req-{request_id}"))
    await entry.wait_for()
    assert "Evaluating <b>summaries</b>" in await entry.inner_text()
    await entry.scroll_into_view_if_needed()
    await screenshot(page, "inbox", readme=True)
    await entry.get_by_label("Reason").fill("For the evaluation sprint")
    await entry.get_by_role("button", name="Approve").click()
    await page.get_by_text(f"Your decision on request {request_id} was recorded.").wait_for()

    [message] = await mail_to(mail, email)
    assert f"approved by {APPROVER}" in plain(message)
    annotations = secret_of(kube, request_id)["metadata"]["annotations"]
    assert annotations["llm-key-requestor/reviewer"] == APPROVER
    assert annotations["llm-key-requestor/decision-source"] == "web"
    assert annotations["llm-key-requestor/justification"] == "Evaluating <b>summaries</b>"

    async def in_recent() -> bool:
        await page.goto("/inbox")
        rows = page.locator("table tbody tr", has_text=email)
        return await rows.count() == 1 and APPROVER in await rows.first.inner_text()

    await wait_until(in_recent, what="the decision under recent decisions")


async def test_a_requester_cannot_approve_their_own_request(context, signon_api):
    page = await context.new_page()
    own = unique_email("manual.example.com")
    await sign_in(page, own, APPROVERS_GROUP)
    request_id = await submit_form(page, own, "gpt-4o", "Needed for my own project")

    await page.goto("/inbox")
    entry = page.locator("section.request", has=page.locator(f"#req-{request_id}"))
    await entry.get_by_text("This is your own request").wait_for()
    assert await entry.get_by_role("button", name="Approve").count() == 0

    # The button is missing; a hand-made post with a valid CSRF token is refused all the same.
    csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
    refused = await context.request.post(
        f"/inbox/{request_id}", form={"csrf": csrf, "decision": "approve", "reason": ""}
    )
    assert refused.status == 403
    assert "own request" in await refused.text()
    status = (await signon_api.get(f"/api/requests/{request_id}")).json()
    assert status["state"] == "pending" and not status["reviewer"]


async def test_a_post_without_the_csrf_token_is_refused(context, signon_api):
    email = unique_email("manual.example.com")
    request_id = (await signon_api.post("/api/request-key", json={"email": email, "llm": "gpt-4o"})
                  ).json()["request_id"]  # fmt: skip
    page = await context.new_page()
    await sign_in(page)  # a signed-in approver: the session cookie alone must not be enough

    for form in ({"decision": "approve"}, {"decision": "approve", "csrf": "forged"}):
        refused = await context.request.post(f"/inbox/{request_id}", form=form)
        assert refused.status == 403
        assert "did not come from this site" in await refused.text()
    no_token = await context.request.post(
        "/request", form={"email": unique_email("approve.example.com"), "llm": "gpt-4o"}
    )
    assert no_token.status == 403
    status = (await signon_api.get(f"/api/requests/{request_id}")).json()
    assert status["state"] == "pending" and not status["reviewer"]


async def test_swagger_ui_renders_offline(context):
    page = await context.new_page()
    await page.goto("/docs")
    await page.locator(".swagger-ui .info .title").get_by_text("LLM Key Requestor").wait_for()
    await page.get_by_text("/api/request-key").first.wait_for()
    await screenshot(page, "docs")


async def test_two_approvers_each_approve_from_the_inbox(
    context, browser, signon_url, signon_api, mail
):
    """A rule with `approvals: 2` (two.example.com): one approval leaves the request waiting,
    with the approver named in the inbox; a second approver, in their own session, ends it."""
    email = unique_email("two.example.com")
    response = await signon_api.post("/api/request-key", json={"email": email, "llm": "gpt-4o"})
    request_id = response.json()["request_id"]
    page = await context.new_page()
    await sign_in(page)
    entry = page.locator("section.request", has=page.locator(f"#req-{request_id}"))
    await entry.get_by_text("none yet (0 of 2)").wait_for()
    await entry.get_by_role("button", name="Approve").click()
    await page.get_by_text(f"Your decision on request {request_id} was recorded.").wait_for()
    await entry.get_by_text(f"{APPROVER} (1 of 2)").wait_for()
    await entry.get_by_text("You approved this request").wait_for()
    assert await entry.get_by_role("button", name="Approve").count() == 0
    assert (await signon_api.get(f"/api/requests/{request_id}")).json()["state"] == "pending"

    second = await browser.new_context(base_url=signon_url)
    try:
        other = await second.new_page()
        await sign_in(other, "second.approver@example.com", APPROVERS_GROUP)
        entry = other.locator("section.request", has=other.locator(f"#req-{request_id}"))
        await entry.get_by_role("button", name="Approve").click()
        await other.get_by_text(f"Your decision on request {request_id} was recorded.").wait_for()
    finally:
        await second.close()
    [message] = await mail_to(mail, email)
    assert KEY.search(plain(message))


async def test_the_inbox_pages_through_more_waiting_requests_than_fit_on_one(
    context, signon_api, monkeypatch
):
    monkeypatch.setattr(pages, "INBOX_PAGE", 2)
    ids = []
    for _ in range(3):
        email = unique_email("manual.example.com")
        response = await signon_api.post("/api/request-key", json={"email": email, "llm": "gpt-4o"})
        ids.append(response.json()["request_id"])
    page = await context.new_page()
    await sign_in(page)

    async def walk() -> tuple[int, list[list[str]]]:
        """Every inbox page from the first, following the link to older requests."""
        await page.goto("/inbox")
        heading = await page.locator("#pending-heading").inner_text()
        waiting = int(re.search(r"\((\d+)\)", heading).group(1))
        shown: list[list[str]] = []
        for _ in range(waiting + 1):  # a page too many at most: the last may come up empty
            ids_here = await page.locator("section.request h3").evaluate_all(
                "hs => hs.map(h => h.id.slice(4))"
            )
            shown.append(ids_here)
            older = page.get_by_role("link", name="Older waiting requests")
            if not await older.count():
                break
            await older.click()
            await page.get_by_role("link", name="Back to the newest requests").wait_for()
        return waiting, shown

    async def all_three_found():
        waiting, shown = await walk()
        found = [request_id for ids_here in shown for request_id in ids_here]
        return (waiting, shown) if all(found.count(i) == 1 for i in ids) else None

    waiting, shown = await wait_until(all_three_found, what="the three requests in the inbox")
    assert waiting >= 3 and len(shown) >= 2
    assert all(len(ids_here) <= 2 for ids_here in shown)

    refused = await context.request.get("/inbox?page=not-a-token")
    assert refused.status == 400
    assert "start again at /inbox" in await refused.text()
