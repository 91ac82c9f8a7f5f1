"""studio.py against a real server on an ephemeral port: listing runs (including one started
from the command line), incremental metrics, start -> metrics -> stop -> resume of a real
train.py child, sampling, the token / Host / Origin / path checks, and a headless Chromium
driving the page."""

import contextlib
import dataclasses
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import runs
import studio
import train
from configurator import TrainConfig
from model import count_params
from conftest import TINY, copy_conversation

REPO = Path(__file__).resolve().parents[1]
# A run that goes on until it is stopped; one log line per step.
ENDLESS = "--n_layer=2 --n_head=4 --n_kv_head=2 --n_embd=32 --block_size=32 --batch_size=4 --warmup_iters=3 " \
          "--eval_iters=2 --log_interval=1 --device=cpu --compile=False --max_iters=100000 --eval_interval=100000"
# TINY's and ENDLESS's model on the byte-level dataset (257 tokens)
TINY_PARAMS = count_params(TrainConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32).model_config(257))["total"]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, dataset):  # noqa: F811
    """A runs directory with data/tiny and one finished run started from the command line."""
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(dataset, root / "data" / "tiny")
    train.main([*TINY, f"--data_dir={root / 'data' / 'tiny'}", f"--out_dir={root / 'cli'}", "--max_iters=6", "--eval_interval=3"])
    return root


class Server:
    """`python studio.py --port 0` in a subprocess, and a small JSON client for it."""

    def __init__(self, runs: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.runs = runs
        self.proc = subprocess.Popen([sys.executable, str(REPO / "studio" / "studio.py"), "--port", "0", "--runs_dir", str(runs)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for line in self.proc.stdout:
            match = re.search(r"open (http://127\.0\.0\.1:(\d+))/\?token=(\S+)", line)
            if match:
                self.base, self.port, self.token = match.group(1), int(match.group(2)), match.group(3)
                self.url = match.group(0)[len("open "):]
                break
        else:
            raise AssertionError(f"studio.py printed no URL: {self.proc.stderr.read()}")

    def call(self, path: str, body=None, token=True, headers=None, raw: bytes = None, timeout: float = 60):
        """(HTTP status, parsed JSON) of one request."""
        head = {"X-Studio-Token": self.token} if token is True else ({"X-Studio-Token": token} if token else {})
        head.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, headers=head, method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as res:
                return res.status, json.loads(res.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def run(self, name: str) -> dict:
        status, body = self.call("/api/runs")
        assert status == 200, body
        return next(r for r in body["runs"] if r["name"] == name)

    def wait_run(self, name: str, ok, what: str, timeout: float = 120.0) -> dict:
        deadline = time.time() + timeout
        while True:
            status, body = self.call("/api/runs")
            found = [r for r in body.get("runs", []) if r["name"] == name]
            if found and ok(found[0]):
                return found[0]
            assert time.time() < deadline, f"{what}: {found}; console: {self.console(name)[-2000:]}"
            time.sleep(0.2)

    def console(self, name: str) -> str:
        return self.call(f"/api/console?run={name}")[1].get("text", "")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()
        self.proc.stderr.close()
        # Children train in their own sessions and outlive the studio by design: end any a test left.
        for status_file in self.runs.glob("*/status.json"):
            s = json.loads(status_file.read_text())
            if s.get("state") == "running" and runs.train_alive(s.get("pid")):
                os.kill(s["pid"], signal.SIGKILL)


@pytest.fixture(scope="module")
def server(runs_dir):
    srv = Server(runs_dir)
    yield srv
    srv.close()


def ckpt_step(run_dir: Path) -> int:
    return torch.load(run_dir / "ckpt.pt", weights_only=True)["step"]


# ----------------------------------------------------------------------------- reading runs


def test_lists_a_run_started_from_the_command_line(server, runs_dir):
    run = server.run("cli")
    assert (run["state"], run["reason"], run["step"], run["max_iters"]) == ("finished", "max_iters", 6, 6)
    records = [json.loads(line) for line in (runs_dir / "cli" / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if "val_loss" in r]
    best = min(vals, key=lambda r: r["val_loss"])
    assert run["loss"] == records[-2]["loss"] and run["best_val_loss"] == best["val_loss"] and run["val_bpb"] == best["val_bpb"]
    assert run["tokens_per_s"] == [r for r in records if "loss" in r][-1]["tokens_per_s"]
    assert run["params"] == TINY_PARAMS and run["data_dir"] == str(runs_dir / "data" / "tiny")
    assert run["pid"] == os.getpid() and run["world_size"] == 1 and run["started"] <= run["updated"]
    assert "ckpt.pt" in run["files"] and not run["from_studio"]


def test_states_of_dead_foreign_and_old_runs(server, runs_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, record in [("dead", {"state": "running", "pid": dead.pid, "host": runs.HOST, "step": 4}),
                         ("elsewhere", {"state": "running", "pid": 1, "host": "another-machine", "step": 4})]:
        (runs_dir / name).mkdir()
        (runs_dir / name / "status.json").write_text(json.dumps(record))
    (runs_dir / "old").mkdir()  # from before status.json: metrics and a config only
    (runs_dir / "old" / "metrics.jsonl").write_text('{"step": 10, "loss": 3.5}\n')
    (runs_dir / "old" / "config.json").write_text(json.dumps({"train": {"max_iters": 10}, "model": None}))
    assert server.run("dead")["state"] == "crashed" and "ended without" in server.run("dead")["reason"]
    assert server.run("elsewhere")["state"] == "unknown" and "another-machine" in server.run("elsewhere")["reason"]
    assert (server.run("old")["state"], server.run("old")["step"], server.run("old")["loss"]) == ("finished", 10, 3.5)
    (runs_dir / "clock").mkdir()  # a time-budgeted run: the page shows its clock, not steps
    (runs_dir / "clock" / "status.json").write_text(json.dumps(
        {"state": "finished", "reason": "time budget", "step": 40, "max_iters": None, "max_time_min": 12, "elapsed_s": 725.0}))
    clock = server.run("clock")
    assert (clock["state"], clock["max_iters"], clock["max_time_min"], clock["elapsed_s"]) == ("finished", None, 12, 725.0)
    for name in ("dead", "elsewhere", "old", "clock"):
        shutil.rmtree(runs_dir / name)


def test_metrics_are_read_incrementally_with_torn_lines_and_rewrites(server, runs_dir):
    run = runs_dir / "inc"
    run.mkdir()
    path = run / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "lo')  # the last line is being written
    status, body = server.call("/api/metrics?run=inc&cursor=")
    assert status == 200 and [r["step"] for r in body["records"]] == [1, 2] and not body["reset"]
    cursor = body["cursor"]
    assert int(cursor.split(":")[0]) == len('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n')  # only whole lines consumed
    status, body = server.call(f"/api/metrics?run=inc&cursor={cursor}")
    assert body["records"] == [] and body["cursor"] == cursor
    with open(path, "a") as f:
        f.write('ss": 3.0, "mfu": NaN}\n')
    body = server.call(f"/api/metrics?run=inc&cursor={cursor}")[1]
    assert body["records"] == [{"step": 3, "loss": 3.0, "mfu": None}]  # just the new line; NaN made JSON-safe
    # Rewritten (as a resume truncates records past the checkpoint), then grown past the old offset.
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.5}\n{"step": 3, "loss": 4.2}\n{"step": 4, "loss": 4.1}\n')
    body = server.call(f"/api/metrics?run=inc&cursor={body['cursor']}")[1]
    assert body["reset"] and [r["loss"] for r in body["records"]] == [5.0, 4.5, 4.2, 4.1]
    path.write_text('{"step": 1, "loss": 9.0}\n')  # shorter than the cursor
    body = server.call(f"/api/metrics?run=inc&cursor={body['cursor']}")[1]
    assert body["reset"] and body["records"] == [{"step": 1, "loss": 9.0}]
    shutil.rmtree(run)


def test_read_new_lines_never_rereads_old_bytes(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(1000)))
    lines, cursor, reset, more = runs.read_new_lines(path, "")
    assert len(lines) == 1000 and not reset and not more
    reads = []

    class CountingFile:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            reads.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(runs, "open", lambda *a, **k: CountingFile(open(*a, **k)), raising=False)
    with open(path, "a") as f:
        f.write('{"step": 1000, "loss": 0.5}\n')
    lines, cursor, _, _ = runs.read_new_lines(path, cursor)
    assert lines == ['{"step": 1000, "loss": 0.5}']
    # the fingerprint (256 bytes before the cursor), the new line, the new fingerprint: never the whole file
    assert reads == [256, len(lines[0]) + 1, 256]


# ----------------------------------------------------------------------------- start, stop, resume, sample


def test_start_watch_stop_and_resume_a_run(server, runs_dir):
    status, body = server.call("/api/start", {"preset": "tiny_cpu", "data_dir": "data/tiny", "out_dir": "live", "overrides": ENDLESS, "nproc": 1})
    assert status == 200, body
    assert body["run"] == "live" and not body["resumes"]
    run = server.run("live")  # train.py is still importing torch: no status.json yet
    assert (run["state"], run["reason"]) == ("running", "starting: train.py has not written status.json yet")
    # metrics arrive while it trains, read incrementally
    cursor, steps, deadline = "", [], time.time() + 120
    while len(steps) < 3:
        assert time.time() < deadline, server.console("live")
        body = server.call(f"/api/metrics?run=live&cursor={cursor}")[1]
        steps += [r["step"] for r in body["records"] if "loss" in r]
        cursor = body["cursor"]
        time.sleep(0.1)
    assert steps == list(range(1, len(steps) + 1))
    run = server.run("live")
    assert run["state"] == "running" and run["from_studio"] and run["preset"] == "tiny_cpu" and run["params"] == TINY_PARAMS

    status, body = server.call("/api/stop", {"run": "live"})
    assert status == 200 and body["state"] == "stopping"
    assert server.run("live")["state"] in ("stopping", "stopped")
    run = server.wait_run("live", lambda r: r["state"] == "stopped", "never stopped")
    assert run["reason"] == "signal" and run["step"] == ckpt_step(runs_dir / "live") >= 3
    console = server.console("live")
    assert "received SIGTERM" in console and "(stopped by signal)" in console
    saved = run["step"]

    status, body = server.call("/api/resume", {"run": "live"})
    assert status == 200 and "--resume=auto" in body["command"]
    server.wait_run("live", lambda r: r["state"] == "running" and (r["step"] or 0) > saved, "never resumed")
    assert f"at step {saved}" in server.console("live")
    assert server.call("/api/start", {"preset": "tiny_cpu", "data_dir": "data/tiny", "out_dir": "live", "overrides": ENDLESS})[0] == 409
    assert server.call("/api/stop", {"run": "live"})[0] == 200
    run = server.wait_run("live", lambda r: r["state"] == "stopped", "never stopped after resume")
    assert run["step"] == ckpt_step(runs_dir / "live") > saved
    steps = [r["step"] for r in server.call("/api/metrics?run=live&cursor=")[1]["records"] if "loss" in r]
    assert steps == list(range(1, run["step"] + 1))  # one run, continued: no gap, no repeat


def test_overrides_are_validated_before_launch_with_the_cli_error(server, runs_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--n_layers=3"])
    assert exit_.value.code == 2
    cli_error = capsys.readouterr().err.strip()
    for path in ("/api/start", "/api/estimate"):
        status, body = server.call(path, {"preset": "tiny_cpu", "data_dir": "data/tiny", "out_dir": "never", "overrides": "--n_layers=3"})
        assert status == 400 and body == {"error": cli_error}
    status, body = server.call("/api/start", {"preset": "tiny_cpu", "data_dir": "data/tiny", "out_dir": "never", "overrides": "--n_head=5"})
    assert status == 400 and body["error"].startswith("error: invalid config from ") and "n_embd=192 is not divisible by n_head=5" in body["error"]
    for bad in ("config/evil.py", "-h", "--help"):
        assert server.call("/api/start", {"preset": "tiny_cpu", "data_dir": "data/tiny", "out_dir": "never", "overrides": bad})[0] == 400
    assert server.call("/api/start", {"preset": "../../etc/passwd", "data_dir": "data/tiny", "out_dir": "never"})[0] == 400
    assert not (runs_dir / "never").exists()


def test_estimate_counts_parameters_and_memory_as_the_libraries_do(server):
    from hardware import plan_training_memory
    from model import count_params

    status, body = server.call("/api/estimate", {"preset": "tiny_cpu", "data_dir": "data/tiny", "overrides": "--n_layer=3 --n_embd=64", "nproc": 2})
    assert status == 200, body
    cfg = TrainConfig(n_layer=3, n_head=4, n_kv_head=2, n_embd=64, block_size=256).model_config(257)
    assert body["params"] == count_params(cfg)["total"] and body["vocab_size"] == 257 and body["vocab_source"] == "the dataset"
    plan = plan_training_memory(cfg, 16, 256, world_size=2, compute_dtype=torch.float32, device_type="cpu")  # tiny_cpu: device cpu
    assert body["memory_gb"] == pytest.approx(plan.gib())
    assert body["tokens_per_step"] == 16 * 2 * 256
    assert "resumes" not in body  # no out_dir asked about
    body = server.call("/api/estimate", {"preset": "tiny_cpu", "data_dir": "data/tiny", "out_dir": "cli"})[1]
    assert body["resumes"] is True  # cli holds ckpt.pt: Start would continue it
    assert server.call("/api/estimate", {"preset": "tiny_cpu", "data_dir": "data/tiny", "out_dir": "../x"})[0] == 403


def sample(server, body) -> tuple[str, dict]:
    req = urllib.request.Request(server.base + "/api/sample", data=json.dumps(body).encode(), method="POST",
                                 headers={"X-Studio-Token": server.token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as res:
        messages = [json.loads(line) for line in res.read().decode("utf-8").splitlines()]
    return "".join(m.get("text", "") for m in messages), messages[-1]


def test_sample_streams_what_sample_py_prints(server, runs_dir):
    settings = {"temperature": 0, "top_k": 5, "max_new_tokens": 40}
    text, done = sample(server, {"run": "cli", "prompt": "привет кот", **settings})
    assert done["done"] and done["exit_code"] == 0 and done["error"] is None and "step 6" in done["note"]
    direct = subprocess.run([sys.executable, "sample.py", "--out_dir", str(runs_dir / "cli"), "--start", "привет кот",
                             "--temperature", "0", "--top_k", "5", "--max_new_tokens", "40"],
                            cwd=REPO, capture_output=True, timeout=120)
    assert text == direct.stdout.decode("utf-8")  # the same code path, whole characters only
    assert text.startswith("привет кот")
    # A prompt travels as data: "FILE:..." is not read as a file.
    text, done = sample(server, {"run": "cli", "prompt": "FILE:/etc/hostname", "temperature": 0, "max_new_tokens": 3})
    assert text.startswith("FILE:/etc/hostname") and done["exit_code"] == 0
    assert server.call("/api/sample", {"run": "cli", "prompt": "x", "max_new_tokens": 0})[0] == 400
    os.makedirs(runs_dir / "empty-run", exist_ok=True)
    (runs_dir / "empty-run" / "metrics.jsonl").write_text("")
    status, body = server.call("/api/sample", {"run": "empty-run", "prompt": "x"})
    assert status == 400 and "no checkpoint" in body["error"]


def test_a_chat_tuned_run_chats_with_its_history(server, runs_dir, chat_run):
    shutil.copytree(chat_run, runs_dir / "chat-run")
    try:
        runs = {r["name"]: r for r in server.call("/api/runs")[1]["runs"]}
        assert runs["chat-run"]["chat"] is True and runs["cli"]["chat"] is False
        rng = random.Random(7)  # messages like the ones it was trained on (conftest.copy_conversation), never seen
        (first, w1), (second, w2) = copy_conversation(rng), copy_conversation(rng)
        history = [{"role": "user", "content": f"ёж {first} «щи»"}, {"role": "assistant", "content": w1}, {"role": "user", "content": second}]
        text, done = sample(server, {"run": "chat-run", "messages": history, "temperature": 0, "max_new_tokens": 20})
        assert (text, done["exit_code"], done["error"]) == (w2 + "\n", 0, None)  # only the reply, ended at <|im_end|>
        status, body = server.call("/api/sample", {"run": "chat-run", "messages": history[:2], "temperature": 0})
        assert status == 400 and "must end with a user message" in body["error"]
    finally:
        shutil.rmtree(runs_dir / "chat-run")


def test_an_fsdp_run_without_ckpt_pt_can_be_sampled_and_resumed(server, runs_dir):
    """FSDP runs save sharded ckpt_STEP/ directories, no ckpt.pt: Sample and Resume take those."""
    overrides = ENDLESS.replace("--max_iters=100000", "--max_iters=2").replace("--eval_interval=100000", "--eval_interval=2")
    status, body = server.call("/api/start", {"preset": "tiny_cpu", "data_dir": "data/tiny", "out_dir": "fsdp", "nproc": 2,
                                              "overrides": overrides + " --parallel=fsdp --optimizer=adamw --dtype=float32"})
    assert status == 200, body
    run = server.wait_run("fsdp", lambda r: r["state"] in ("finished", "crashed"), "never finished", timeout=300)
    assert run["state"] == "finished", server.console("fsdp")[-3000:]
    assert run["world_size"] == 2 and run["checkpoint"] and "ckpt.pt" not in run["files"] and (runs_dir / "fsdp" / "ckpt_000002").is_dir()
    text, done = sample(server, {"run": "fsdp", "prompt": "кот", "temperature": 0, "max_new_tokens": 4})
    assert done["exit_code"] == 0 and "ckpt_000002: step 2" in done["note"] and text.startswith("кот"), done
    status, body = server.call("/api/resume", {"run": "fsdp"})
    assert status == 200 and "--parallel='fsdp'" in body["command"], body
    server.wait_run("fsdp", lambda r: r["state"] == "finished" and server.console("fsdp").count("--nproc_per_node=2") == 2, "never resumed", timeout=300)
    assert "at step 2" in server.console("fsdp")


def test_streamed_text_never_splits_a_character():
    text = "привет, мир 🙂 ok"
    read_fd, write_fd = os.pipe()

    def trickle():  # one byte per write: every multi-byte character straddles reads
        for byte in text.encode():
            os.write(write_fd, bytes([byte]))
            time.sleep(0.002)
        os.close(write_fd)

    writer = threading.Thread(target=trickle)
    writer.start()
    chunks = list(studio.utf8_chunks(read_fd))
    writer.join()
    os.close(read_fd)
    assert "".join(chunks) == text and len(chunks) > 5
    assert all(c.encode().decode() == c and "\ufffd" not in c for c in chunks)


# ----------------------------------------------------------------------------- security


def test_requests_without_the_token_or_from_other_origins_are_refused(server, runs_dir):
    start = {"preset": "tiny_cpu", "data_dir": "data/tiny", "out_dir": "refused", "overrides": ENDLESS}
    assert server.call("/api/runs", token=None)[0] == 403
    status, body = server.call("/api/start", start, token="wrong")
    assert status == 403 and "token" in body["error"]
    assert server.call("/api/start", start, token=None)[0] == 403
    # DNS rebinding: the browser sends the attacker's name as Host, even for the page itself.
    assert server.call("/", headers={"Host": f"evil.example:{server.port}"})[0] == 403
    assert server.call("/api/runs", headers={"Host": f"evil.example:{server.port}"})[0] == 403
    # A page on another site posting to us carries its own Origin, token or not.
    status, body = server.call("/api/start", start, headers={"Origin": "http://evil.example"})
    assert status == 403 and "evil.example" in body["error"]
    assert server.call("/api/stop", {"run": "cli"}, headers={"Origin": f"http://localhost:{server.port + 1}"})[0] == 403
    assert not (runs_dir / "refused").exists()
    # The studio's own origin, under any of its names, is fine.
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}"):
        assert server.call("/api/runs", headers={"Host": host, "Origin": f"http://{host}"})[0] == 200
    with urllib.request.urlopen(server.url, timeout=30) as res:  # the page needs no token; its API calls do
        assert res.status == 200 and b"HomeLLM Studio" in res.read()


def test_paths_outside_runs_dir_are_refused(server, runs_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (runs_dir / "link").symlink_to(outside)
    try:
        for name in ("../outside", str(outside), "link", "cli/../../outside"):
            status, body = server.call(f"/api/metrics?run={urllib.request.quote(name)}")
            assert status == 403 and "outside --runs_dir" in body["error"], name
        for out_dir in ("../escape", str(tmp_path / "escape"), "link/sub"):
            status, body = server.call("/api/start", {"preset": "tiny_cpu", "data_dir": "data/tiny", "out_dir": out_dir, "overrides": ENDLESS})
            assert status == 403 and "outside --runs_dir" in body["error"], out_dir
        assert server.call("/api/stop", {"run": "../outside"})[0] == 403
        assert "link" not in [r["name"] for r in server.call("/api/runs")[1]["runs"]]
        assert not (tmp_path / "escape").exists() and not (outside / "sub").exists()
    finally:
        (runs_dir / "link").unlink()


def test_bad_requests_get_a_4xx_and_the_server_lives_on(server):
    for path, raw in [("/api/start", b"not json"), ("/api/start", b"[1, 2]"), ("/api/stop", b"{}"), ("/api/resume", b'{"run": 5}')]:
        status, body = server.call(path, raw=raw)
        assert 400 <= status < 500 and isinstance(body["error"], str) and "\n" not in body["error"], (path, raw, body)
    assert server.call("/api/nothing")[0] == 404
    assert server.call("/api/metrics?run=no-such-run")[0] == 404
    assert server.call("/api/stop", {"run": "cli"})[0] == 409  # finished: nothing to stop
    assert server.call("/api/start", {"preset": "tiny_cpu", "out_dir": "x", "nproc": 0})[0] == 400
    assert server.call("/api/runs")[0] == 200 and server.proc.poll() is None


def post_raw(server, head: str, body: bytes = b"", path: str = "/api/start") -> tuple[int, dict]:
    """One POST over a bare socket, the headers as given: (status, JSON answer). The socket stays
    open for writing, so a server that waits for more body than was sent times out here."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-Studio-Token: {server.token}\r\n{head}\r\n\r\n".encode() + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def test_a_bad_content_length_is_refused_before_the_body_is_read(server, runs_dir):
    body = json.dumps({"preset": "tiny_cpu", "data_dir": "data/tiny", "out_dir": "never", "overrides": ENDLESS}).encode()
    # -1 used to pass the size check, then read to the end of a stream the client keeps open
    for length, code in (("-1", 400), ("-0", 400), ("abc", 400), ("1e3", 400), ("+5", 400), ("0x10", 400),
                         (str(2 << 20), 413), ("9" * 40, 413)):
        status, answer = post_raw(server, f"Content-Length: {length}", body)
        assert status == code and "\n" not in answer["error"], (length, answer)
    assert not (runs_dir / "never").exists() and server.proc.poll() is None


def one_line_4xx(status: int, body: dict) -> bool:
    return 400 <= status < 500 and isinstance(body.get("error"), str) and "\n" not in body["error"]


def test_malformed_fields_get_a_4xx_with_a_one_line_error(server, runs_dir):
    before = sorted(p.name for p in runs_dir.iterdir())
    for cursor in ("²:x", "-1:0123456789abcdef", "1e3:0123456789abcdef", "9" * 5000 + ":0123456789abcdef", "\ud800", "\0", "12"):
        for what in ("metrics", "console"):
            status, body = server.call(f"/api/{what}?run=cli&cursor={urllib.request.quote(cursor, errors='surrogatepass')}")
            assert one_line_4xx(status, body) and "cursor" in body["error"], (cursor, status, body)
    # Raw JSON: 1e400 is inf to Python's parser, "\ud800" a lone surrogate, NaN a float.
    sample_bodies = [b'{"run": "cli", "prompt": "x", "top_k": 1e400}', b'{"run": "cli", "prompt": "\\ud800"}',
                     b'{"run": "cli", "prompt": "x", "temperature": NaN}', b'{"run": "cli", "prompt": "x", "temperature": -Infinity}',
                     b'{"run": "cli", "prompt": 5}', b'{"run": "\\ud800", "prompt": "x"}',
                     b'{"run": "cli", "messages": [{"role": "user", "content": "\\ud800"}]}']
    user = {"role": "user", "content": "x"}
    for messages in ("hi", [], [{"role": "bot", "content": "x"}], [{"role": "user", "content": 5}], [user, {"role": "assistant", "content": "y"}],
                     [user, "x"], [{"role": "user"}], {"role": "user", "content": "x"}, [[user]]):
        sample_bodies.append(json.dumps({"run": "cli", "messages": messages}).encode())
    for key, values in {"temperature": ["0.5", True, [], 11, -1], "top_k": [-1, 2.5, "5", 1e30, 10**30],
                        "max_new_tokens": [0, 2.5, 1e400, 10**30, "5", None], "run": [5, None, [], "", "a" * 5000, "x\0y", "../.."]}.items():
        sample_bodies += [json.dumps({"run": "cli", "prompt": "x", key: v}).encode() for v in values]
    for raw in sample_bodies:
        status, body = server.call("/api/sample", raw=raw)
        assert one_line_4xx(status, body), (raw[:80], status, body)
    for path in ("/api/stop", "/api/resume"):
        for raw in (b'{"run": "\\ud800"}', b'{"run": 1e400}', b'{"run": ["cli"]}', b'{"run": "' + b"a" * 5000 + b'"}', b"[" * 100000 + b"]" * 100000):
            status, body = server.call(path, raw=raw)
            assert one_line_4xx(status, body), (path, raw[:40], status, body)
    form = {"preset": "tiny_cpu", "data_dir": "data/tiny", "out_dir": "never", "overrides": ENDLESS}
    typed = {"preset": [5, ["tiny_cpu"], {"a": 1}, "\ud800", "tiny_cpu\0"], "data_dir": [5, ["data/tiny"], "\ud800", "data/\0"],
             "out_dir": [5, {"a": 1}, "\ud800", ".", "never/\0"], "overrides": [5, [1], {"a": 1}, ["--n_layer=2", 3]],
             "nproc": [1e400, "2", True, -1, 2.5, 10**30, None, 100000]}
    for key, values in typed.items():
        for value in values:
            for path in ("/api/start", "/api/estimate"):
                status, body = server.call(path, raw=json.dumps({**form, key: value}).encode())
                assert one_line_4xx(status, body), (path, key, value, status, body)
    for override in ("--n_layer=1e400", "--max_iters=1e400", "--learning_rate=nan", "--learning_rate=inf", "--peak_flops=1e999",
                     "--tensorboard_dir=\ud800", "--n_layer=" + "9" * 400, "--block_size=-1", "--seed=1e400"):
        status, body = server.call("/api/estimate", raw=json.dumps({**form, "overrides": override}).encode())
        assert one_line_4xx(status, body), (override, status, body)
    assert sorted(p.name for p in runs_dir.iterdir()) == before  # nothing launched, nothing created
    assert server.call("/api/runs")[0] == 200 and server.proc.poll() is None


# ----------------------------------------------------------------------------- damaged and planted run folders


def plant_run(runs_dir: Path, name: str, status=None, config=None, metrics: str = None, ckpt: bool = False) -> Path:
    """A run folder as a download or a hand edit could leave it; str values are written as is."""
    run = runs_dir / name
    run.mkdir()
    for file, value in (("status.json", status), ("config.json", config), ("metrics.jsonl", metrics)):
        if value is not None:
            (run / file).write_text(value if isinstance(value, str) else json.dumps(value))
    if ckpt:
        shutil.copy(runs_dir / "cli" / "ckpt.pt", run / "ckpt.pt")
    return run


def cli_config(runs_dir: Path, **train) -> dict:
    config = json.loads((runs_dir / "cli" / "config.json").read_text())
    config["train"].update(train)
    return config


def test_a_torn_last_metrics_line_never_spins(server, runs_dir):
    first = json.dumps({"step": 20, "loss": 2.0})
    run = plant_run(runs_dir, "torn", metrics=first + '\n{"step": 21, "loss": 1.0')
    try:
        lines, cursor, reset, more = runs.read_new_lines(run / "metrics.jsonl")
        assert (lines, reset, more) == ([first], False, False)  # the torn line waits; it is not "more"
        # Studio.summary read while "more" said so: on a torn line, forever, holding the studio's lock.
        own = studio.Studio(runs_dir, "token", set())
        reader = threading.Thread(target=own.summary, args=(run,), daemon=True)
        reader.start()
        reader.join(timeout=10)
        assert not reader.is_alive() and own.summaries[run].step == 20
        status, body = server.call("/api/runs", timeout=20)
        assert status == 200 and next(r for r in body["runs"] if r["name"] == "torn")["step"] == 20
        assert server.call("/api/metrics?run=torn", timeout=20)[1]["more"] is False
    finally:
        shutil.rmtree(run)


def test_a_malformed_run_folder_costs_its_own_row_not_the_page(server, runs_dir):
    """Each of these made /api/runs answer 500 (or hang) and blanked the page."""
    plant_run(runs_dir, "started-text", status={"state": "finished", "reason": "max_iters", "started": "yesterday", "step": 3})
    plant_run(runs_dir, "status-nan", status='{"state": "stopped", "started": NaN, "updated": Infinity, "elapsed_s": NaN, '
                                             '"step": 2, "max_time_min": -Infinity, "world_size": "2", "host": ["h"]}')
    plant_run(runs_dir, "status-list", status="[1, 2]", metrics='{"step": 1, "loss": 3.0}\n')
    plant_run(runs_dir, "config-list", config={"train": [1, 2], "model": [3]}, metrics='{"step": 1, "loss": 3.0}\n')
    plant_run(runs_dir, "config-types", config={"train": {"max_iters": "many", "data_dir": 5, "max_time_min": "soon"},
                                                "model": {"n_layer": "two"}}, metrics="")
    plant_run(runs_dir, "metrics-types", metrics='{"step": 1, "loss": "x", "val_loss": "bad", "val_bpb": [1]}\n'
                                                 '{"step": 2, "val_loss": 2.5, "val_bpb": 1.5}\n{"step": true, "loss": 0.1}\n'
                                                 '{"step": 3, "loss": 2.75, "tokens_per_s": {"a": 1}, "mfu": NaN, "x": [NaN]}\n')
    for name in ("fifo-metrics", "fifo-status"):  # a reader that opened these would wait for a writer forever
        (runs_dir / name).mkdir()
    os.mkfifo(runs_dir / "fifo-metrics" / "metrics.jsonl")
    os.mkfifo(runs_dir / "fifo-status" / "status.json")
    bad = ["started-text", "status-nan", "status-list", "config-list", "config-types", "metrics-types", "fifo-metrics", "fifo-status"]
    try:
        status, body = server.call("/api/runs", timeout=20)
        assert status == 200, body
        rows = {r["name"]: r for r in body["runs"]}
        assert set(bad) <= set(rows) and rows["cli"]["state"] == "finished" and rows["cli"]["step"] == 6  # the rest still shows
        assert (rows["started-text"]["state"], rows["started-text"]["started"], rows["started-text"]["step"]) == ("finished", None, 3)
        nan = rows["status-nan"]
        assert (nan["state"], nan["step"], nan["started"], nan["updated"], nan["elapsed_s"], nan["max_time_min"], nan["world_size"], nan["host"]) \
            == ("stopped", 2, None, None, None, None, None, None)
        assert (rows["status-list"]["state"], rows["status-list"]["loss"]) == ("unknown", 3.0)
        assert (rows["config-list"]["data_dir"], rows["config-list"]["params"], rows["config-list"]["loss"]) == (None, None, 3.0)
        assert (rows["config-types"]["max_iters"], rows["config-types"]["data_dir"], rows["config-types"]["params"]) == (None, None, None)
        types = rows["metrics-types"]
        assert (types["step"], types["loss"], types["best_val_loss"], types["val_bpb"], types["tokens_per_s"]) == (3, 2.75, 2.5, 1.5, None)
        assert rows["fifo-metrics"]["step"] is None and rows["fifo-status"]["state"] == "unknown"
        records = server.call("/api/metrics?run=metrics-types")[1]["records"]
        assert [r["step"] for r in records] == [1, 2, 3] and records[2]["x"] is None and records[2]["mfu"] is None
        assert server.call("/api/metrics?run=fifo-metrics", timeout=20)[1]["records"] == []
    finally:
        for name in bad:
            shutil.rmtree(runs_dir / name)


def test_a_run_that_cannot_be_described_is_flagged_and_the_others_listed(runs_dir, monkeypatch):
    own = studio.Studio(runs_dir, "token", set())
    describe = own.describe_run

    def broken(run_dir):
        if run_dir.name == "cli":
            raise KeyError("surprise")
        return describe(run_dir)

    monkeypatch.setattr(own, "describe_run", broken)
    (runs_dir / "other").mkdir()
    (runs_dir / "other" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    try:
        rows = {r["name"]: r for r in own.runs()}
        assert rows["other"]["loss"] == 3.0
        assert rows["cli"]["state"] == "unknown" and "KeyError" in rows["cli"]["reason"] and rows["cli"]["checkpoint"] is False
        json.dumps(rows, allow_nan=False)
    finally:
        shutil.rmtree(runs_dir / "other")


def test_every_path_valued_train_key_is_checked():
    """A new key naming a file or directory must be in config_paths (so Start and Resume keep it
    inside --runs_dir), or be listed here as not a path, on purpose."""
    text_keys = [f.name for f in dataclasses.fields(TrainConfig) if "str" in str(f.type)]
    paths = studio.config_paths({key: "x/y" for key in text_keys})
    assert set(text_keys) - set(paths) == {"device", "dtype", "optimizer", "parallel", "wandb_project"}
    assert {"data_dir", "out_dir", "tensorboard_dir", "init_from", "resume"} <= set(paths)
    assert studio.config_paths({"init_from": "hf:models/q", "resume": "auto", "tensorboard_dir": None}) == {"init_from": ["models/q"]}
    assert studio.config_paths({"init_from": "scratch", "resume": "never"}) == {}
    # a mixture names every dataset in it
    assert studio.config_paths({"data_dir": "data/a:0.8, /elsewhere/b:0.2"}) == {"data_dir": ["data/a", "/elsewhere/b"]}


def test_every_path_a_start_or_resume_names_stays_inside_runs_dir(server, runs_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(runs_dir / "cli" / "ckpt.pt", outside / "ckpt.pt")
    (runs_dir / "escape").symlink_to(outside)
    form = {"preset": "tiny_cpu", "data_dir": "data/tiny", "out_dir": "never"}
    try:
        for override, key in ((f"--tensorboard_dir={outside}", "tensorboard_dir"), ("--tensorboard_dir=../tb", "tensorboard_dir"),
                              (f"--init_from={outside / 'ckpt.pt'}", "init_from"), (f"--init_from={outside}", "init_from"),
                              (f"--init_from=hf:{outside}", "init_from"), ("--init_from=escape/ckpt.pt", "init_from"),
                              (f"--resume={outside / 'ckpt.pt'}", "resume"), (f"--data_dir={outside}", "data_dir"),
                              (f"--data_dir=data/tiny:0.9,{outside}:0.1", "data_dir"), ("--data_dir=data/tiny,../data", "data_dir")):
            for path in ("/api/estimate", "/api/start"):
                status, body = server.call(path, {**form, "overrides": override})
                assert status == 403 and f"{key}=" in body["error"] and "outside --runs_dir" in body["error"], (path, override, body)
        for override in ("--init_from=cli/ckpt.pt", "--init_from=cli", "--init_from=hf:models/q", "--tensorboard_dir=tb",
                         "--data_dir=data/tiny:0.9,cli:0.1"):
            assert server.call("/api/estimate", {**form, "overrides": override})[0] == 200, override
        assert not (runs_dir / "never").exists()
        # Resume re-reads config.json (and status.json's cwd): planted ones get the same checks.
        for name, planted, cwd in (("tb", {"tensorboard_dir": str(outside)}, str(runs_dir)), ("init", {"init_from": f"hf:{outside}"}, str(runs_dir)),
                                 ("rel", {"tensorboard_dir": "../../tb"}, str(runs_dir / "x")), ("cwd", {"data_dir": "data"}, str(outside)),
                                 ("mix", {"data_dir": f"data/tiny:1,{outside}:1"}, str(runs_dir)),
                                 ("mixcwd", {"data_dir": f"{runs_dir / 'data' / 'tiny'}:1,cli:1"}, str(outside))):  # cli: outside/cli
            run = plant_run(runs_dir, f"planted-{name}", status={"state": "stopped", "cwd": cwd}, config=cli_config(runs_dir, **planted), ckpt=True)
            status, body = server.call("/api/resume", {"run": run.name})
            assert status == 403 and "outside --runs_dir" in body["error"] and not (run / "console.log").exists(), (name, body)
            shutil.rmtree(run)
    finally:
        (runs_dir / "escape").unlink()


def test_resume_refuses_a_world_size_this_machine_cannot_run(server, runs_dir):
    for world_size in (-5, 0, "2", 2.0, True, None, 10**6):
        run = plant_run(runs_dir, "wide", status={"state": "stopped", "world_size": world_size}, config=cli_config(runs_dir), ckpt=True)
        status, body = server.call("/api/resume", {"run": "wide"})
        assert status == 400 and "world_size" in body["error"] and not (run / "console.log").exists(), (world_size, body)
        shutil.rmtree(run)


def test_stop_signals_only_the_train_py_that_holds_the_runs_lock(server, runs_dir):
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "train.py"])  # looks like train.py
    run = plant_run(runs_dir, "decoy", status={"state": "running", "pid": decoy.pid, "host": runs.HOST})
    try:
        assert server.run("decoy")["state"] == "crashed"  # not training here: nothing to stop
        assert server.call("/api/stop", {"run": "decoy"})[0] == 409
        (run / "train.lock").write_text(f"pid {decoy.pid} on host {runs.HOST}\n")  # names it, but nobody holds it
        assert server.call("/api/stop", {"run": "decoy"})[0] == 409
        with open(run / "train.lock", "a") as held:  # held, but by this test, not by the decoy
            fcntl.flock(held, fcntl.LOCK_EX)
            assert server.call("/api/stop", {"run": "decoy"})[0] == 409
            assert server.run("decoy")["state"] == "crashed"
        time.sleep(0.5)
        assert decoy.poll() is None  # never signalled
    finally:
        decoy.kill()
        decoy.wait()
        shutil.rmtree(run)
    # A train.py started from a terminal holds the lock: the studio shows it running and stops it.
    term = subprocess.Popen([sys.executable, "train.py", *ENDLESS.split(), f"--data_dir={runs_dir / 'data' / 'tiny'}",
                             f"--out_dir={runs_dir / 'term'}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        server.wait_run("term", lambda r: r["state"] == "running" and r["step"], "never ran")
        status, body = server.call("/api/stop", {"run": "term"})
        assert status == 200 and body["pid"] == term.pid
        assert term.wait(timeout=120) == 0 and server.run("term")["state"] == "stopped"
    finally:
        term.kill()
        term.wait()
        shutil.rmtree(runs_dir / "term")


def test_runs_dir_itself_is_never_a_new_run_and_never_hides_the_others(server, runs_dir, tmp_path):
    status, body = server.call("/api/start", {"preset": "tiny_cpu", "data_dir": "data/tiny", "out_dir": ".", "overrides": ENDLESS})
    assert status == 400 and "not --runs_dir itself" in body["error"] and not (runs_dir / "console.log").exists()
    # A run trained from a terminal with --out_dir=. right in the runs dir lists alongside the others.
    (tmp_path / "status.json").write_text(json.dumps({"state": "finished"}))
    for name in ("a", "b/c"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "metrics.jsonl").write_text("")
    assert sorted(runs.run_name(tmp_path, p) for p in runs.find_runs(tmp_path)) == [".", "a", "b/c"]


def test_studio_refuses_a_missing_runs_dir(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        studio.main(["--runs_dir", str(tmp_path / "nope")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: --runs_dir {tmp_path / 'nope'} is not a directory\n"


# ----------------------------------------------------------------------------- the page in a real browser


@contextlib.contextmanager
def studio_page(url: str, profile: Path):
    """A headless Debian chromium (with its matching chromedriver; no browser download) on the
    studio's page, and a wait that outlasts the page's redraws. Skips where there is none,
    unless HOMELLM_REQUIRE_BROWSER=1 (CI) makes that a failure."""
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        webdriver = None
    if not (browser_path and driver and webdriver):
        why = "the browser test needs chromium, chromedriver (apt-get install chromium chromium-driver) and selenium"
        if os.environ.get("HOMELLM_REQUIRE_BROWSER") == "1":
            pytest.fail(why + " (HOMELLM_REQUIRE_BROWSER=1)")
        pytest.skip(why)
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser_path
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1500,1150", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        browser.get(url)
        # The page redraws the run pane every poll: an element found a moment ago may be gone.
        yield browser, WebDriverWait(browser, 120, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
    finally:
        browser.quit()


def test_the_page_starts_watches_and_stops_a_run(server, runs_dir, tmp_path):
    with studio_page(server.url, tmp_path / "profile") as (browser, wait):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        wait.until(lambda b: "cli" in b.find_element(By.ID, "runrows").text)
        browser.find_element(By.CSS_SELECTOR, '[data-tab="new"]').click()
        wait.until(lambda b: len(Select(b.find_element(By.ID, "preset")).options) > 1)
        Select(browser.find_element(By.ID, "preset")).select_by_value("tiny_cpu")
        Select(browser.find_element(By.ID, "dataset")).select_by_value("data/tiny")
        for key, value in {"n_layer": "2", "n_embd": "32", "block_size": "32", "batch_size": "4", "max_iters": "100000"}.items():
            field = browser.find_element(By.CSS_SELECTOR, f'[data-key="{key}"]')
            field.clear()
            field.send_keys(value)
        outdir = browser.find_element(By.ID, "outdir")
        outdir.clear()
        outdir.send_keys("browser-run")
        browser.find_element(By.ID, "overrides").send_keys("--eval_interval=100000 --eval_iters=2 --log_interval=1 --warmup_iters=3")
        wait.until(lambda b: f"{TINY_PARAMS / 1e3:.1f}k parameters" in b.find_element(By.ID, "estimate").text)  # follows the edits
        browser.find_element(By.ID, "startbtn").click()

        points = lambda b: int(b.find_element(By.ID, "chart-loss").get_attribute("data-points") or 0)  # noqa: E731
        wait.until(lambda b: "browser-run" in b.find_element(By.ID, "runinfo").text and points(b) >= 2)
        first = points(browser)
        wait.until(lambda b: points(b) > first)  # the loss chart gains points as the run logs
        wait.until(lambda b: b.find_element(By.ID, "runstate").text == "running")
        wait.until(lambda b: b.find_element(By.ID, "stopbtn").is_enabled())
        browser.find_element(By.ID, "stopbtn").click()
        wait.until(lambda b: b.find_element(By.ID, "runstate").text == "stopped")
        saved = ckpt_step(runs_dir / "browser-run")
        wait.until(lambda b: f"saved at step {saved}" in b.find_element(By.ID, "runinfo").text)
        wait.until(lambda b: "received SIGTERM" in b.find_element(By.ID, "console").text)
        shot = tmp_path / "studio.png"
        browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sample_box_chats_with_a_chat_tuned_run(server, runs_dir, chat_run, tmp_path):
    shutil.copytree(chat_run, runs_dir / "chat-ui")
    try:
        with studio_page(server.url, tmp_path / "profile") as (browser, wait):
            from selenium.webdriver.common.by import By

            wait.until(lambda b: "chat-ui" in b.find_element(By.ID, "runrows").text)
            browser.find_element(By.CSS_SELECTOR, 'tr[data-run="chat-ui"] .runname').click()
            browser.find_element(By.CSS_SELECTOR, '[data-tab="sample"]').click()
            wait.until(lambda b: b.find_element(By.ID, "samplebtn").text == "Send" and b.find_element(By.ID, "samplebtn").is_enabled())
            browser.find_element(By.ID, "temperature").clear()
            browser.find_element(By.ID, "temperature").send_keys("0")
            rng = random.Random(8)
            turns = [copy_conversation(rng), copy_conversation(rng)]
            for message, word in turns:
                browser.find_element(By.ID, "prompt").send_keys(message)
                browser.find_element(By.ID, "samplebtn").click()
                wait.until(lambda b: b.find_element(By.ID, "sampleout").text.endswith(f"model: {word}") and b.find_element(By.ID, "samplebtn").is_enabled())
            # Both turns stay on screen: the second request carried the first exchange as history.
            assert browser.find_element(By.ID, "sampleout").text == "\n".join(f"you: {m}\nmodel: {w}" for m, w in turns)
            browser.find_element(By.ID, "newchat").click()
            assert browser.find_element(By.ID, "sampleout").text == ""
    finally:
        shutil.rmtree(runs_dir / "chat-ui")


def test_a_mixtures_per_source_numbers_reach_the_page_and_other_nesting_does_not():
    """The studio's record cleaning once turned source_val_loss into null, so the per-source
    chart never showed."""
    lines = ['{"step": 4, "loss": 2.5, "source_tokens": {"data/a": 96, "data/b": 32}}',
             '{"step": 5, "source_val_loss": {"data/a": 2.25, "data/b": NaN}, "source_val_bpb": {"data/a": "x", "data/b": [1]}, '
             '"tokens_per_s": {"a": 1}, "source_deep": 3, "mfu": {"source_x": 1}}']
    assert runs.parse_records(lines) == [
        {"step": 4, "loss": 2.5, "source_tokens": {"data/a": 96, "data/b": 32}},
        {"step": 5, "source_val_loss": {"data/a": 2.25, "data/b": None}, "source_val_bpb": {"data/a": None, "data/b": None},
         "tokens_per_s": None, "source_deep": 3, "mfu": None},
    ]


def test_the_page_draws_a_mixtures_per_source_curves(tmp_path, dataset):
    root = tmp_path / "runs"
    digits = tmp_path / "digits.txt"
    digits.write_text("".join(" ".join(str(i * j % 997) for j in range(40)) + "\n" for i in range(300)))
    import prepare

    assert prepare.main(["--input", str(digits), "--tokenizer", os.path.join(dataset, "tokenizer.tiktoken"), "--out_dir",
                         str(tmp_path / "digits"), "--val_fraction", "0.1", "--workers", "1", "--no_progress"]) == 0
    train.main([*TINY, f"--data_dir={dataset}:0.75,{tmp_path / 'digits'}:0.25", f"--out_dir={root / 'mix'}",
                "--max_iters=6", "--eval_interval=2"])
    records = [json.loads(line) for line in (root / "mix" / "metrics.jsonl").read_text().splitlines()]
    evals, steps = [r for r in records if "source_val_loss" in r], [r for r in records if "source_tokens" in r]
    assert len(evals) == 3 and len(steps) == 6
    srv = Server(root)
    try:
        with studio_page(srv.url, tmp_path / "profile") as (browser, wait):
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import Select

            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, 'tr[data-run="mix"] .runname'))
            browser.find_element(By.CSS_SELECTOR, 'tr[data-run="mix"] .runname').click()
            card = lambda b: b.find_element(By.ID, "sources-card")  # noqa: E731
            points = lambda b: int(b.find_element(By.ID, "chart-sources").get_attribute("data-points") or 0)  # noqa: E731
            wait.until(lambda b: card(b).is_displayed() and points(b) == 2 * len(evals))  # val loss: a curve per source
            legend = browser.find_element(By.ID, "legend-sources").text
            assert f"mix {dataset}" in legend and f"mix {tmp_path / 'digits'}" in legend
            Select(browser.find_element(By.ID, "sourcekey")).select_by_value("source_tokens")
            wait.until(lambda b: points(b) == 2 * len(steps))
    finally:
        srv.close()
