"""A person's view: headless Debian chromium chats two turns, types a prompt, clicks Generate and sees the text
grow."""

import shutil
from pathlib import Path

import pytest

from tests.browser_tour import CHAT_TURNS, CHROMIUM, tour
from tests.server import running_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: apt-get install chromium")
def test_chat_and_generate_in_the_browser_and_every_tab_renders(tmp_path):
    with running_app("embedded") as (url, _):
        seen, chat = tour(url, tmp_path)
    assert len(chat) == 4 and CHAT_TURNS[0] in chat[0] and CHAT_TURNS[1] in chat[2], chat
    assert chat[1].strip() and chat[3].strip()  # both turns answered
    assert len(seen) >= 3, seen  # the text appeared in steps, not at once
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:], strict=False))
    shots = {p.name: p.stat().st_size for p in tmp_path.glob("*.png")}
    assert set(shots) == {"chat.png", "arena.png", "generate.png", "compare.png", "judge.png", "about.png"}
    assert min(shots.values()) > 10_000
    artifacts = Path("test-artifacts")
    artifacts.mkdir(exist_ok=True)
    for name in shots:
        shutil.copy(tmp_path / name, artifacts / name)
