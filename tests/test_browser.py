"""A person's view: headless Debian chromium types a prompt, clicks Generate and sees the text grow."""

import shutil
from pathlib import Path

import pytest

from tests.browser_tour import CHROMIUM, tour
from tests.server import running_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: apt-get install chromium")
def test_generate_streams_in_the_browser_and_every_tab_renders(tmp_path):
    with running_app("embedded") as (url, _):
        seen = tour(url, tmp_path)
    assert len(seen) >= 3, seen  # the text appeared in steps, not at once
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:], strict=False))
    shots = {p.name: p.stat().st_size for p in tmp_path.glob("*.png")}
    assert set(shots) == {"generate.png", "compare.png", "judge.png", "about.png"} and min(shots.values()) > 10_000
    artifacts = Path("test-artifacts")
    artifacts.mkdir(exist_ok=True)
    for name in shots:
        shutil.copy(tmp_path / name, artifacts / name)
