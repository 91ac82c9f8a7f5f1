"""studio.py against a real server on an ephemeral port: listing runs (including one started
from the command line), incremental metrics, start -> metrics -> stop -> resume of a real
train.py child, sampling, the token / Host / Origin / path checks, and a headless Chromium
driving the page."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import studio
import train
from configurator import TrainConfig
from model import count_params
from conftest import TINY

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

    def call(self, path: str, body=None, token=True, headers=None, raw: bytes = None):
        """(HTTP status, parsed JSON) of one request."""
        head = {"X-Studio-Token": self.token} if token is True else ({"X-Studio-Token": token} if token else {})
        head.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, headers=head, method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=60) as res:
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
            if s.get("state") == "running" and studio.train_alive(s.get("pid")):
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
    for name, record in [("dead", {"state": "running", "pid": dead.pid, "host": studio.HOST, "step": 4}),
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
    lines, cursor, reset, more = studio.read_new_lines(path, "")
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

    monkeypatch.setattr(studio, "open", lambda *a, **k: CountingFile(open(*a, **k)), raising=False)
    with open(path, "a") as f:
        f.write('{"step": 1000, "loss": 0.5}\n')
    lines, cursor, _, _ = studio.read_new_lines(path, cursor)
    assert lines == ['{"step": 1000, "loss": 0.5}']
    # the fingerprint (256 bytes before the cursor), the new line, the new fingerprint: never the whole file
    assert reads == [256, len(lines[0]) + 1, 256]


# ----------------------------------------------------------------------------- start, stop, resume, sample


def test_start_watch_stop_and_resume_a_run(server, runs_dir):
    status, body = server.call("/api/start", {"preset": "tiny_cpu", "data_dir": "data/tiny", "out_dir": "live", "overrides": ENDLESS, "nproc": 1})
    assert status == 200, body
    assert body["run"] == "live" and not body["resumes"]
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


def test_studio_refuses_a_missing_runs_dir(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        studio.main(["--runs_dir", str(tmp_path / "nope")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: --runs_dir {tmp_path / 'nope'} is not a directory\n"


# ----------------------------------------------------------------------------- the page in a real browser


def chromium_driver():
    """Selenium driving Debian's chromium with its matching chromedriver; no browser download.
    Skips where there is none, unless HOMELLM_REQUIRE_BROWSER=1 (CI) makes that a failure."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if not (browser and driver and webdriver):
        why = "the browser test needs chromium, chromedriver (apt-get install chromium chromium-driver) and selenium"
        if os.environ.get("HOMELLM_REQUIRE_BROWSER") == "1":
            pytest.fail(why + " (HOMELLM_REQUIRE_BROWSER=1)")
        pytest.skip(why)
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1500,1150"):
        opts.add_argument(arg)
    return webdriver, opts, Service(driver)


def test_the_page_starts_watches_and_stops_a_run(server, runs_dir, tmp_path):
    webdriver, opts, service = chromium_driver()
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    opts.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    browser = webdriver.Chrome(service=service, options=opts)
    try:
        browser.get(server.url)
        # The page redraws the run pane every poll: an element found a moment ago may be gone.
        wait = WebDriverWait(browser, 120, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
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
    finally:
        browser.quit()


def test_the_page_draws_a_mixtures_per_source_curves(tmp_path, dataset):
    webdriver, opts, service = chromium_driver()
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    runs = tmp_path / "runs"
    digits = tmp_path / "digits.txt"
    digits.write_text("".join(" ".join(str(i * j % 997) for j in range(40)) + "\n" for i in range(300)))
    import prepare

    assert prepare.main(["--input", str(digits), "--tokenizer", os.path.join(dataset, "tokenizer.tiktoken"), "--out_dir",
                         str(tmp_path / "digits"), "--val_fraction", "0.1", "--workers", "1", "--no_progress"]) == 0
    train.main([*TINY, f"--data_dir={dataset}:0.75,{tmp_path / 'digits'}:0.25", f"--out_dir={runs / 'mix'}",
                "--max_iters=6", "--eval_interval=2"])
    records = [json.loads(line) for line in (runs / "mix" / "metrics.jsonl").read_text().splitlines()]
    evals, steps = [r for r in records if "source_val_loss" in r], [r for r in records if "source_tokens" in r]
    assert len(evals) == 3 and len(steps) == 6
    opts.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    srv = Server(runs)
    browser = webdriver.Chrome(service=service, options=opts)
    try:
        browser.get(srv.url)
        wait = WebDriverWait(browser, 60, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
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
        browser.quit()
        srv.close()
