"""Drive the Space in headless Debian chromium: chat two turns, type a prompt and watch the output stream,
screenshot each tab.

    python -m tests.browser_tour --out docs/screenshots   (the shipped model; --model MODEL_ID for another)

The browser test runs the same tour; this entry point refreshes the README's screenshots.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")  # Debian chromium; CI may point elsewhere
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


CHAT_TURNS = ("How do I make a good cup of coffee?", "And without a coffee machine?")
ARENA_PROMPT = "My neighbour's dog barks all night. What should I do?"


def tour(url: str, out: Path, prompt: str = "I am an AI engineer",
         compare_prompt: str = "How do I make a good cup of coffee?") -> tuple[list[str], list[str]]:  # fmt: skip
    """Return the distinct output texts seen while the Generate tab streamed, and the chat's messages after two
    turns; save one PNG a tab."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        messages = page.locator(".message-row")
        box = page.get_by_placeholder("Type a message and press Enter")
        for turn, text in enumerate(CHAT_TURNS, start=1):
            box.fill(text)
            for _ in range(3):  # a click in the first moments after loading can come before the app listens
                page.get_by_role("button", name="Send").click()
                try:
                    _wait_until(lambda turn=turn: messages.count() >= 2 * turn - 1, 10)
                    break
                except TimeoutError:
                    continue
            # the box takes a message again once the reply's last update is in the chat: the next goes at once
            _wait_until(lambda turn=turn: messages.count() >= 2 * turn and box.is_editable(), 300)
        chat = [messages.nth(i).inner_text() for i in range(messages.count())]
        page.screenshot(path=str(out / "chat.png"), full_page=True)

        page.get_by_role("tab", name="Arena").click()
        _visible(page.get_by_label("Prompt")).fill(ARENA_PROMPT)
        page.get_by_role("button", name="Start a round").click()
        replies = [page.get_by_label(f"Reply {side}") for side in "AB"]
        _wait_until(lambda: all(r.input_value() for r in replies) and _idle(page), 300)
        page.get_by_role("button", name="A is better").click()
        page.get_by_text("the DPO model").first.wait_for(timeout=60_000)  # the names, revealed after the vote
        page.screenshot(path=str(out / "arena.png"), full_page=True)

        page.get_by_role("tab", name="Generate").click()
        _visible(page.get_by_label("Prompt")).fill(prompt)
        page.get_by_role("button", name="Generate").click()
        output = page.get_by_label("Output")
        seen: list[str] = []
        deadline, idle_since = time.monotonic() + 300, None
        while time.monotonic() < deadline:
            streaming = not _idle(page)  # read before the text, so the last text is read after the end
            text = output.input_value()
            if text and (not seen or text != seen[-1]):
                seen.append(text)
                idle_since = None
            # Gradio can drop its streaming marker for a moment between chunks: the end is idle *and* quiet.
            idle_since = None if streaming else (idle_since or time.monotonic())
            if seen and idle_since and time.monotonic() - idle_since > 2.0:
                break
            time.sleep(0.05)
        page.screenshot(path=str(out / "generate.png"), full_page=True)

        page.get_by_role("tab", name="Compare").click()
        _visible(page.get_by_label("Prompt")).fill(compare_prompt)
        page.get_by_role("button", name="Compare", exact=True).click()
        reward = page.get_by_label("Reference reply reward β·log(π/π_ref)")
        _wait_until(lambda: _visible(page.get_by_label("Reference", exact=True)).input_value() != "", 180)
        _wait_until(lambda: reward.input_value() != "", 180)  # set by the last update, after both streams
        page.screenshot(path=str(out / "compare.png"), full_page=True)

        page.get_by_role("tab", name="Judge").click()
        page.get_by_text("How do I pick a lock?").first.click()  # the example fills all three fields
        page.get_by_role("button", name="Judge", exact=True).click()
        _wait_until(lambda: "prefers" in page.get_by_label("Verdict").input_value() and _idle(page), 180)
        page.screenshot(path=str(out / "judge.png"), full_page=True)

        page.get_by_role("tab", name="About").click()
        page.get_by_text("active_generations").first.wait_for(timeout=30_000)
        page.screenshot(path=str(out / "about.png"), full_page=True)
        browser.close()
    return seen, chat


def _visible(locator):
    """The one match on the tab shown (other tabs hold fields of the same label)."""
    return locator.filter(visible=True).first


def _idle(page) -> bool:
    """No output is streaming (Gradio marks it ``.generating``) or waiting (``.pending``)."""
    return page.locator(".generating, .pending").count() == 0


def _wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the page did not reach the expected state")
        time.sleep(0.1)


def main() -> None:
    from tests.server import running_app

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the Space's default, the shipped DPO model")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = parser.parse_args()
    with running_app(args.model) as (url, _):
        seen, chat = tour(url, args.out)
    print(f"saw {len(seen)} growing outputs and {len(chat)} chat messages; screenshots in {args.out}")


if __name__ == "__main__":
    main()
