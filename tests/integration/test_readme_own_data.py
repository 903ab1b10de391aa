"""The README's "Your own data" commands, run as written: the first shell block of that section, taken
from README.md at test time so that the two cannot drift apart. Only the port differs (a free one), and
`curl`'s request is sent with httpx. The data is MovieLens-100k's raw ratings file, as in the README."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
ML100K = REPO.parent / "shared" / "data" / "ml-100k"
TOWERANN = [sys.executable, "-m", "towerann.cli"]


def readme_commands() -> list[list[str]]:
    """The commands of the first ```bash block under "## Your own data", continuation lines joined."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own data") :]
    block = section[section.index("```bash\n") + len("```bash\n") :]
    block = block[: block.index("```")]
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip() and not line.startswith("#")]


def test_the_readme_block_is_five_towerann_commands_and_a_request() -> None:
    commands = readme_commands()
    assert [c[0] for c in commands] == ["towerann"] * 5 + ["curl"]
    assert [c[1] for c in commands[:5]] == ["data", "train", "refresh", "features", "serve"]


@pytest.mark.slow
def test_the_readme_own_data_commands_run_as_written(tmp_path: Path, free_port: int) -> None:
    if not (ML100K / "u.data").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the MovieLens-100k folder {ML100K} is missing")
        pytest.skip(f"MovieLens-100k not found at {ML100K}")
    (tmp_path / "ml-100k").symlink_to(ML100K)
    *steps, serve, curl = readme_commands()
    for command in steps:
        done = subprocess.run(TOWERANN + command[1:], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (command, done.stderr[-2000:])

    port = serve[serve.index("--port") + 1]
    serve[serve.index("--port") + 1] = str(free_port)
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(TOWERANN + serve[1:], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{free_port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(0.2)
        # curl -s localhost:PORT/v1/candidates -H 'Content-Type: application/json' -d '{...}'
        assert curl[curl.index("-H") + 1] == "Content-Type: application/json"
        target = curl[2].replace(f"localhost:{port}", f"127.0.0.1:{free_port}")
        body = json.loads(curl[curl.index("-d") + 1])
        got = httpx.post(f"http://{target}", json=body, timeout=30)
        assert got.status_code == 200, got.text
        ids = [c["item_id"] for c in got.json()["candidates"]]
        # MovieLens item ids are integers, and come back as JSON integers; user 42's own ratings are not
        # excluded by the index, but the answer is a full list of distinct catalog items
        assert len(ids) == body["k"] == len(set(ids)) and all(isinstance(i, int) and 1 <= i <= 1682 for i in ids)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
