"""Real servers on loopback for the tests that read shards from object stores and web servers.

Each is started by the test that needs it, on 127.0.0.1 with a free port, waits for readiness in a
bounded loop, and is stopped when the test ends: a plain HTTP server over a folder (in a thread, with a
hook that can cut a response half-way, as a reset connection does), and the standalone S3 server of
``moto[server]`` as a subprocess (a real HTTP S3 API).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing answered on 127.0.0.1:{port} within {timeout} s")


class _Handler(SimpleHTTPRequestHandler):
    """Serves a folder; ``cut(path, attempt)`` decides whether this response stops half-way."""

    cut: Callable[[str, int], bool] = staticmethod(lambda path, attempt: False)
    attempts: dict = {}
    lock = threading.Lock()

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        with self.lock:
            attempt = self.attempts.get(self.path, 0)
            self.attempts[self.path] = attempt + 1
        if not self.cut(self.path, attempt):
            return super().do_GET()
        path = Path(self.translate_path(self.path))
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])  # half the body, then the connection goes away
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True


@contextlib.contextmanager
def http_server(root: Path, cut: Callable[[str, int], bool] | None = None) -> Iterator[tuple[str, dict]]:
    """Serve ``root`` over HTTP on loopback; yields (base URL, attempts per path)."""
    handler = type("Handler", (_Handler,), {"cut": staticmethod(cut or (lambda path, attempt: False)),
                                            "attempts": {}, "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), partial(handler, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.attempts
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.contextmanager
def s3_server(bucket: str = "shards") -> Iterator[dict[str, str]]:
    """moto's standalone S3 server as a subprocess, with ``bucket`` created; yields the environment
    (endpoint and credentials, the standard AWS variables) that readers and writers need."""
    executable = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = free_port()
    proc = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        wait_for_port(port)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=bucket)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for this process (and the children it starts), then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
