"""Start the real app in a subprocess on a free port, for tests that call it over HTTP; and the direct greedy
``generate`` that tests compare the app's and the engine's replies with."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(model_id: str | None, timeout: float = 300, preamble: str = "", **env: str):
    """Yield the URL of ``app.py`` serving ``model_id`` (None: the app's default); its log is in ``proc.log_path``.

    ``preamble``: Python run in the server process before the app (to inject faults in tests)."""
    port = free_port()
    log_path = Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"app-{port}.log"
    full_env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1",
                "GRADIO_ANALYTICS_ENABLED": "False", "DECODER_COMPILE": "0",
                "FEEDBACK_DIR": tempfile.mkdtemp(prefix="feedback-"), **env}  # fmt: skip
    # FEEDBACK_DIR: votes cast by tests never land beside the app
    # DECODER_COMPILE=0: compiling in the background would take the CPU from the tests; one test turns it on
    full_env.pop("MODEL_ID", None)
    if model_id is not None:
        full_env["MODEL_ID"] = model_id
    command = [sys.executable, "app.py"]
    if preamble:
        command = [sys.executable, "-c", f"{preamble}\nimport runpy\nrunpy.run_path('app.py', run_name='__main__')"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"app.py did not answer within {timeout} s") from None
                time.sleep(0.3)
        proc.log_path = log_path
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_until_compiled(url: str, timeout: float = 900) -> None:
    """The app compiles its decoder in the background (DECODER_COMPILE=1), serving eagerly meanwhile: wait until
    ``/info`` says it is done."""
    from gradio_client import Client

    client, deadline = Client(url, verbose=False), time.monotonic() + timeout
    while not client.predict(api_name="/info")["compiled"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the app at {url} did not finish compiling its decoder in {timeout:.0f} s")
        time.sleep(2)


def direct_greedy(engine, prompt_ids: list[int], model=None, **kwargs) -> str:
    """The greedy reply of ``model`` (the engine's policy by default) to ``prompt_ids``, from its own ``generate``."""
    import torch

    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = (model or engine.policy.model).generate(input_ids=ids, do_sample=False, **kwargs)
    return engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
