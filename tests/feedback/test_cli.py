"""`rlhf label import | annotator | status | export | serve` through the top-level CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request

from rlhf.cli import main as rlhf


def _write_samples(path, n=3, k=4):
    rows = [
        {"prompt_id": f"q{i}", "prompt": f"P{i}", "responses": [f"r{j}" for j in range(k)]} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_import_annotator_status(tmp_path, capsys):
    db, samples = str(tmp_path / "f.db"), tmp_path / "s.jsonl"
    _write_samples(samples)
    assert (
        rlhf(["label", "import", str(samples), "--batch", "b", "--forms", "ranking,critique", "--db", db])
        == 0
    )
    assert "batch 'b': 3 items, forms ranking,critique, overlap 1" in capsys.readouterr().out
    assert rlhf(["label", "annotator", "add", "alice", "--db", db]) == 0
    assert re.search(r"annotator 'alice' token: \S{20,}", capsys.readouterr().out)
    assert rlhf(["label", "annotator", "list", "--db", db]) == 0
    assert capsys.readouterr().out.startswith("alice\tannotator")
    assert rlhf(["label", "status", "--db", db]) == 0
    assert "b: 0/3 submits, 0/3 items complete" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys):
    db, samples = str(tmp_path / "f.db"), tmp_path / "s.jsonl"
    samples.write_text('{"prompt": "p", "responses": ["a", "b"]}\nnot json\n')
    assert rlhf(["label", "import", str(samples), "--batch", "b", "--db", db]) == 2
    assert f"{samples}:2: not valid JSON" in capsys.readouterr().err
    _write_samples(samples)
    assert rlhf(["label", "import", str(samples), "--batch", "b", "--forms", "vibes", "--db", db]) == 2
    assert "unknown form 'vibes'" in capsys.readouterr().err
    assert rlhf(["label", "export", "--batch", "nope", "--out", str(tmp_path), "--db", db]) == 2
    assert "no batch named 'nope'" in capsys.readouterr().err
    assert rlhf(["label", "annotator", "add", "a b", "--db", db]) == 2


def test_serve_binds_loopback_and_prints_the_admin_token_once(tmp_path):
    db = str(tmp_path / "f.db")
    cmd = [sys.executable, "-m", "rlhf.cli", "label", "serve", "--db", db, "--port", "0"]
    for first in (True, False):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            address = re.search(r"on (http://127\.0\.0\.1:\d+/)", proc.stdout.readline()).group(1)
            if first:
                token = re.search(r"admin token .*: (\S+)$", proc.stdout.readline()).group(1)
            for _ in range(100):
                try:
                    request = urllib.request.Request(
                        address + "api/me", headers={"Authorization": f"Bearer {token}"}
                    )
                    me = json.load(urllib.request.urlopen(request, timeout=2))
                    break
                except OSError:
                    time.sleep(0.1)
            assert me["name"] == "admin" and me["admin"] is True
            schema = json.load(urllib.request.urlopen(address + "openapi.json", timeout=2))
            assert "/api/items/{item_id}/submit" in schema["paths"]
        finally:
            proc.terminate()
            rest = proc.communicate(timeout=20)[0]
        if not first:
            assert "admin token" not in rest  # only on first start
