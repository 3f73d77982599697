"""Field notes 000 and 004 end to end: the example configs under etc/, rendered with ports and paths, run by
real daemons against real sshds, ffmpeg and a fake cloud training service on loopback.

The examples are read from etc/ and only their host names, paths, keys and intervals are replaced (every
replaced text must be found), so an example that stops running fails here.
"""

from __future__ import annotations

import fcntl
import http.server
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess, make_frames, need_or_skip, read_sidecar, wait_for
from tests.netproxy import Proxy
from tests.sshd import Sshd, free_port, keygen, missing_reason, start_sshd

REPO = Path(__file__).resolve().parent.parent
FRAMES = 90
GPU_USER = "spoold-test-gpu"
ACCOUNTS_LOCK = "/tmp/spoold-test-gpu.lock"


def render_example(name: str, replacements: list[tuple[str, str]]) -> str:
    text = (REPO / "etc" / name).read_text()
    for old, new in replacements:
        assert old in text, f"etc/{name} no longer holds {old!r}: update this test with the example"
        text = text.replace(old, new)
    return text


def start_daemon(config: Path, spool: Path, log: Path, env: dict[str, str] | None = None) -> DaemonProcess:
    process = DaemonProcess(config, log, env).start()
    process.wait_ready(spool)
    return process


def secrets_leaked(keys: list[Path], folders: list[Path]) -> list[str]:
    """Files under `folders` holding any line of the private keys' bodies or a PEM header."""
    needles = ["PRIVATE KEY"]
    for key in keys:
        needles += [line for line in key.read_text().splitlines() if line and not line.startswith("-----")]
    leaked = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix in (".json", ".log", ".ready", ".prom"):
                text = path.read_text(errors="replace")
                leaked += [f"{path}: {needle[:12]}..." for needle in needles if needle in text]
    return leaked


# ---- 000: client -> edge (encode) -> GPU host (train) -> client ------------------------------------------------


class TrainingService:
    """The cloud API of field note 000 on loopback: POST /transactions/start, GET /transactions/{id}.

    Starting a transaction writes the model folder on the "GPU host" file by file, slowly (each pause shorter
    than the client's `settle`, so a wait without settle would pull it half-written); the status flips to
    COMPLETED only when `completes` (else the client must fall back to the folder check).
    """

    MODEL_FILES = ("config.json", "model.safetensors", "train_config.json", "README.md")

    def __init__(self, gpu: Path, *, completes: bool, pause: float) -> None:
        self.gpu, self.completes, self.pause = gpu, completes, pause
        self.status: dict[str, str] = {}
        self.written: dict[str, bytes] = {}
        self.started = 0
        self._threads: list[threading.Thread] = []
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._reply(service.start(str(body["repo_id"])))

            def do_GET(self) -> None:
                transaction = self.path.rsplit("/", 1)[-1]
                if transaction not in service.status:
                    self.send_error(404)
                    return
                self._reply({"transaction_id": transaction, "status": service.status[transaction]})

            def _reply(self, doc: dict[str, Any]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def start(self, repo_id: str) -> dict[str, Any]:
        self.started += 1
        transaction = f"tx{self.started:04d}"
        model_dir = self.gpu / "models" / repo_id
        self.status[transaction] = "TRAINING"
        folder = model_dir / "train" / f"act_{transaction}" / "checkpoints" / "last" / "pretrained_model"
        thread = threading.Thread(target=self._write_model, args=(transaction, folder), daemon=True)
        self._threads.append(thread)
        thread.start()
        return {"transaction_id": transaction, "model_dir": str(model_dir)}

    def _write_model(self, transaction: str, folder: Path) -> None:
        folder.mkdir(parents=True)
        for index, name in enumerate(self.MODEL_FILES):
            data = os.urandom(2000 + 1000 * index)
            (folder / name).write_bytes(data)
            self.written[name] = data
            time.sleep(self.pause)  # pacing a slow trainer; not a synchronisation
        if self.completes:
            self.status[transaction] = "COMPLETED"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)


START_TRAINING = """\
#!{python}
import json, sys, urllib.request
request = urllib.request.Request("http://127.0.0.1:{port}/transactions/start", method="POST",
                                 data=json.dumps({{"repo_id": sys.argv[1], "episode_index": sys.argv[2]}}).encode())
with urllib.request.urlopen(request, timeout=10) as response:
    started = json.load(response)
print("training started for", sys.argv[1])
print(json.dumps({{"transaction_id": started["transaction_id"], "model_dir": started["model_dir"]}}))
"""


def frame_count(video: Path) -> int:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                          "stream=nb_read_frames", "-of", "csv=p=0", str(video)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return int(out.stdout.strip())


@pytest.mark.parametrize("api_completes", [True, False], ids=["api-completes", "api-never-completes"])
def test_000_episode_from_client_to_edge_to_gpu_and_model_back(
    sshd: Sshd, ffmpeg: str, tmp_path: Path, api_completes: bool
) -> None:
    client, edge, gpu, models = (tmp_path / n for n in ("client", "edge", "gpu", "models"))
    gpu.mkdir()
    client_key, edge_key = tmp_path / "client_key", tmp_path / "edge_key"
    with open(sshd.root / "authorized_keys", "a") as authorized:
        authorized.write(keygen(client_key) + "\n" + keygen(edge_key) + "\n")
    service = TrainingService(gpu, completes=api_completes, pause=0.3)
    start_training = tmp_path / "start-training"
    start_training.write_text(START_TRAINING.format(python=sys.executable, port=service.port))
    start_training.chmod(0o755)
    far = f"sftp://{sshd.user}@127.0.0.1:{sshd.port}"
    client_config = render_example("000-robot-client.yaml", [
        ("spool: /var/spool/spoold", f"spool: {client}"),
        ("sftp://dorobot@edge.lan'", f"{far}'"),
        ("sftp://root@gpu.example'", f"{far}'"),
        ("/etc/spoold/edge_key", str(client_key)),
        ("/etc/spoold/gpu_key", str(client_key)),
        ("/etc/spoold/known_hosts", str(sshd.known_hosts)),
        ("sftp://edge/var/spool/spoold/", f"sftp://edge{edge}/"),
        ("http://cloud.example:8000", f"http://127.0.0.1:{service.port}"),
        ("interval: 30s", "interval: 0.2s"),
        ("interval: 60s", "interval: 0.2s"),
        ("settle: 30s", "settle: 1.5s"),
        ("file:///home/robot/DoRobot/models/", f"file://{models}/"),
    ])  # fmt: skip
    edge_config = render_example("000-robot-edge.yaml", [
        ("spool: /var/spool/spoold", f"spool: {edge}"),
        ("sftp://root@gpu.example/data/", f"{far}{gpu}/data/"),
        ("/etc/spoold/cloud_key", str(edge_key)),
        ("/etc/spoold/known_hosts", str(sshd.known_hosts)),
        ("/usr/local/bin/start-training", str(start_training)),
    ])  # fmt: skip
    (tmp_path / "client.yaml").write_text(client_config)
    (tmp_path / "edge.yaml").write_text(edge_config)
    daemons = []
    try:
        daemons.append(start_daemon(tmp_path / "edge.yaml", edge, tmp_path / "edge.log"))
        daemons.append(start_daemon(tmp_path / "client.yaml", client, tmp_path / "client.log"))
        episode = client / "episodes" / "inbox" / "so100_pick_ep000005"
        for camera in ("cam_left", "cam_right"):
            make_frames(episode / camera, count=FRAMES)
        (client / "episodes" / "inbox" / "so100_pick_ep000005.ready").write_text("{}")

        def client_finished() -> dict[str, Any] | None:
            doc = read_sidecar(client, "episodes", "so100_pick_ep000005")
            if doc and doc["state"] == "failed":
                raise AssertionError(f"the client's item failed: {doc['error']}\n{daemons[1].log()}")
            return doc if doc and doc["state"] == "done" else None

        doc = wait_for(client_finished, 120, "the client's item to be done")
    finally:
        for process in daemons:
            process.stop()
        service.close()
    target = models / "so100_pick"
    assert sorted(p.name for p in target.iterdir()) == sorted(TrainingService.MODEL_FILES), "an extra folder level?"
    for name, data in service.written.items():
        assert (target / name).read_bytes() == data, f"{name} was pulled before it was complete"
    held = doc["steps"][2]["result"]["held"]
    assert held["kind"] in (("url", "path") if api_completes else ("path",))
    edge_doc = read_sidecar(edge, "episodes", "so100_pick_ep000005")
    assert edge_doc is not None and edge_doc["fields"]["transaction_id"] == "tx0001"
    videos = sorted((gpu / "data" / "datasets" / "so100_pick").rglob("*.mp4"))
    assert len(videos) == 2 and all(frame_count(video) == FRAMES for video in videos)
    assert not secrets_leaked([client_key, edge_key], [client, edge, tmp_path])


# ---- 004: zip -> fresh cloud instance -> unzip -> detached training -> best weights back -----------------------


TRAIN_PY = """\
import os, pathlib, time
home = pathlib.Path.home()
with open(home / "runs", "a") as runs:
    runs.write("run\\n")
print("epoch 1/3 loss=0.9", flush=True)
deadline = time.monotonic() + 300  # a test that fails leaves no job waiting forever
while not (home / "gate").exists():
    if time.monotonic() > deadline:
        raise SystemExit("no gate within 300 s")
    time.sleep(0.1)  # a poll's interval, bounded by the deadline: not synchronisation
dataset = sorted(str(p.relative_to("dataset")) for p in pathlib.Path("dataset").rglob("*") if p.is_file())
weights = pathlib.Path("output/exp1/weights")
weights.mkdir(parents=True)
(weights / "last.pt").write_text("last")
(weights / "best.pt").write_text("\\n".join(dataset))
print("epoch 3/3 loss=0.1 done", flush=True)
"""


@pytest.fixture
def gpu_user() -> Iterator[pwd.struct_passwd]:
    """An unprivileged `ubuntu` of the cloud instance, with its home in a fresh folder; removed even on failure."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        need_or_skip("the far host's account is a real unprivileged user: needs root and useradd")
    with open(ACCOUNTS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        home = Path(tempfile.mkdtemp(prefix="spoold-gpu-home-"))
        subprocess.run(["userdel", GPU_USER], capture_output=True)
        try:
            # `*`, not useradd's `!`: sshd (UsePAM no) refuses every login to an account whose password is locked.
            subprocess.run(["useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh",
                            "--password", "*", GPU_USER], check=True, capture_output=True)  # fmt: skip
            user = pwd.getpwnam(GPU_USER)
            os.chown(home, user.pw_uid, user.pw_gid)
            home.chmod(0o755)
            yield user
        finally:
            subprocess.run(["pkill", "-KILL", "-u", GPU_USER], capture_output=True)
            subprocess.run(["userdel", GPU_USER], capture_output=True)
            shutil.rmtree(home, ignore_errors=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


def as_user(user: pwd.struct_passwd, path: Path, text: str | None = None) -> None:
    """Make `path` (a folder, or a file holding `text`) owned by `user`, with its parents below the home."""
    if text is None:
        path.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    home = Path(user.pw_dir)
    for part in [path, *path.parents]:
        if part == home or home not in part.parents:
            break
        os.chown(part, user.pw_uid, user.pw_gid)


def test_004_training_on_a_fresh_instance_survives_a_cut_link_and_a_killed_daemon(
    tmp_path: Path, gpu_user: pwd.struct_passwd
) -> None:
    reason = missing_reason()
    if reason or shutil.which("unzip") is None:
        need_or_skip(reason or "unzip is not installed (apt-get install unzip)")
    home = Path(gpu_user.pw_dir)
    spool, models, state = tmp_path / "spool", tmp_path / "models", tmp_path / "state"
    key = tmp_path / "cw_key"
    public = keygen(key)
    as_user(gpu_user, home / ".ssh" / "authorized_keys", public + "\n")
    as_user(gpu_user, home / "training" / "train.py", TRAIN_PY)
    sshd_port, proxy_port = free_port(), free_port()
    config = tmp_path / "spoold.yaml"
    config.write_text(render_example("004-cloud-training.yaml", [
        ("spool: /var/spool/spoold", f"spool: {spool}"),
        ("ubuntu@{instance_ip}", f"{GPU_USER}@{{instance_ip}}:{proxy_port}"),
        ("/home/ubuntu/", f"{home}/"),
        ("/etc/spoold/cw_key", str(key)),
        ("/var/lib/spoold/known_hosts", str(state / "known_hosts")),
        ("connect_timeout: 120s", "connect_timeout: 60s"),
        ("settle: 10s", "settle: 1s"),
        ("interval: 30s", "interval: 0.2s"),
        ("file:///srv/models/", f"file://{models}/"),
    ]))  # fmt: skip
    state.mkdir(mode=0o700)
    log = tmp_path / "daemon.log"
    process = start_daemon(config, spool, log)
    sshd: Sshd | None = None
    proxy: Proxy | None = None
    try:
        item = spool / "training" / "inbox" / "run42"
        for index in range(40):
            (item / "images" / f"{index // 10}").mkdir(parents=True, exist_ok=True)
            (item / "images" / f"{index // 10}" / f"img{index:03d}.txt").write_text(f"image {index}\n")
        (item / "labels.csv").write_text("a,b\n")
        dropped = time.monotonic()
        (spool / "training" / "inbox" / "run42.ready").write_text(json.dumps({"instance_ip": "127.0.0.1"}))
        wait_for(lambda: time.monotonic() - dropped > 5 or (read_sidecar(spool, "training", "run42") or {})
                 .get("state") == "failed", 10, "five seconds of a host that is not up yet")  # fmt: skip
        assert (read_sidecar(spool, "training", "run42") or {}).get("state") != "failed"
        sshd = start_sshd(tmp_path / "sshd", port=sshd_port, user=GPU_USER, authorized_keys="%h/.ssh/authorized_keys")
        proxy = Proxy(sshd_port, port=proxy_port)
        wait_for(lambda: (home / "runs").exists(), 60, "the detached training job to start")

        def tail_shows(text: str) -> Callable[[], bool]:
            def check() -> bool:
                doc = read_sidecar(spool, "training", "run42") or {}
                progress = next((s.get("progress") for s in doc.get("steps", []) if s.get("name") == "exec"
                                 and (s.get("progress") or {}).get("log_tail")), None)  # fmt: skip
                return any(text in line for line in (progress or {}).get("log_tail", []))

            return check

        wait_for(tail_shows("epoch 1/3"), 30, "the job's log tail in the sidecar")
        assert proxy.cut() >= 1
        connections = proxy.connections
        wait_for(lambda: proxy is not None and proxy.connections > connections, 30, "a reconnect after the cut")
        process.kill()
        process.stop()  # closes its log; the process is gone already
        process = start_daemon(config, spool, log)
        connections = proxy.connections
        wait_for(lambda: proxy is not None and proxy.connections > connections, 30, "the restarted daemon to reconnect")
        (home / "gate").touch()

        def finished() -> dict[str, Any] | None:
            doc = read_sidecar(spool, "training", "run42")
            if doc and doc["state"] == "failed":
                raise AssertionError(f"the item failed: {doc['error']}\n{process.log()}")
            return doc if doc and doc["state"] == "done" else None

        wait_for(finished, 60, "the item to be done")
    finally:
        process.stop()
        if proxy is not None:
            proxy.close()
        if sshd is not None:
            sshd.stop()
    assert (home / "runs").read_text() == "run\n", "the detached job ran more than once"
    best = models / "run42" / "best.pt"
    expected = sorted([f"images/{i // 10}/img{i:03d}.txt" for i in range(40)] + ["labels.csv"])
    assert best.read_text().splitlines() == [f"run42/{name}" for name in expected] or \
        best.read_text().splitlines() == expected  # fmt: skip
    recorded = (state / "known_hosts").read_text()
    assert f"[127.0.0.1]:{proxy_port}" in recorded, "the host key was not recorded on first use"
    assert not secrets_leaked([key], [tmp_path])
