"""A real S3-compatible server on loopback for tests: moto's S3 app behind werkzeug, in a thread of this process.

The objects live in moto's in-process backend, so :meth:`LoopbackS3.stop` then :meth:`LoopbackS3.start` is an
object store that goes away and comes back on the same port with its data, as a restarted MinIO would.
Training runs in child processes and reach it through ``S3_ENDPOINT_URL`` and the ``AWS_*`` variables
(:meth:`LoopbackS3.env`), exactly as they would reach a real store.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Optional

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

CREDENTIALS = {'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing', 'AWS_DEFAULT_REGION': 'us-east-1'}


class _OneRequestPerConnection(MotoRequestHandler):
    # HTTP/1.0: each connection serves one request and closes, so once the listening socket is closed the
    # store is really gone (with keep-alive, pooled client connections would still be answered).
    protocol_version = 'HTTP/1.0'

    def log_request(self, *args, **kwargs) -> None:  # one line per request would drown the test output
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class LoopbackS3:
    """An S3 endpoint at ``http://127.0.0.1:<free port>`` that can be stopped and restarted on the same port."""

    def __init__(self, port: Optional[int] = None):
        self.port = port or _free_port()
        self.endpoint = f'http://127.0.0.1:{self.port}'
        self._server = None
        self._thread: Optional[threading.Thread] = None
        self._moto = DomainDispatcherApplication(create_backend_app)
        self._dropper: Optional[socket.socket] = None
        self.dropped = 0  # connections turned away while stopped with count_attempts
        self.writes = 0  # PUT / POST / DELETE requests answered (or refused) since the last fail_writes_after
        self._writes_allowed: Optional[int] = None

    def fail_writes_after(self, n: Optional[int]) -> None:
        """From now on, answer the first ``n`` write requests (PUT, POST, DELETE) and refuse every later one with
        403 AccessDenied, as a store whose credentials lose write access part-way does (``None``: accept all).
        A 403 is not retried by botocore, so the failure happens exactly at write ``n + 1``."""
        self.writes, self._writes_allowed = 0, n

    def _app(self, environ, start_response):
        if environ['REQUEST_METHOD'] in ('PUT', 'POST', 'DELETE'):
            self.writes += 1
            if self._writes_allowed is not None and self.writes > self._writes_allowed:
                body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                        b'<Message>write access revoked (test)</Message></Error>')
                start_response('403 Forbidden', [('Content-Type', 'application/xml'),
                                                 ('Content-Length', str(len(body)))])
                return [body]
        return self._moto(environ, start_response)

    def start(self) -> 'LoopbackS3':
        if self._dropper is not None:
            # shutdown first: on Linux a plain close() leaves the socket listening while accept() blocks on it.
            self._dropper.shutdown(socket.SHUT_RDWR)
            self._dropper.close()
            self._dropper = None
        self._server = make_server('127.0.0.1', self.port, self._app, threaded=True,
                                   request_handler=_OneRequestPerConnection)
        self._thread = threading.Thread(target=self._server.serve_forever, name='loopback-s3', daemon=True)
        self._thread.start()
        return self

    def stop(self, count_attempts: bool = False) -> None:
        """Stops serving. With ``count_attempts`` the port stays bound by a socket that closes every connection
        unanswered and counts it in :attr:`dropped`, so a test can tell that clients really tried meanwhile."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()  # closes the listening socket: new connections are refused
            self._thread.join()
            self._server = None
        if count_attempts:
            self._dropper = socket.socket()
            self._dropper.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._dropper.bind(('127.0.0.1', self.port))
            self._dropper.listen(64)
            threading.Thread(target=self._drop, args=(self._dropper,), name='loopback-s3-down', daemon=True).start()

    def _drop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed by start()
                return
            self.dropped += 1
            conn.close()

    @property
    def running(self) -> bool:
        return self._server is not None

    def env(self) -> dict:
        """What a process needs to reach this store (Streaming and boto3 read these)."""
        return {'S3_ENDPOINT_URL': self.endpoint, **CREDENTIALS}

    def client(self):
        import boto3

        return boto3.client('s3', endpoint_url=self.endpoint, aws_access_key_id=CREDENTIALS['AWS_ACCESS_KEY_ID'],
                            aws_secret_access_key=CREDENTIALS['AWS_SECRET_ACCESS_KEY'],
                            region_name=CREDENTIALS['AWS_DEFAULT_REGION'])

    def keys(self, bucket: str, prefix: str = '') -> list[str]:
        pages = self.client().get_paginator('list_objects_v2').paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj['Key'] for page in pages for obj in page.get('Contents', []))


def set_env(monkeypatch, server: LoopbackS3) -> None:
    """Points this process (prep-data, boto3) at ``server``; no real AWS configuration can leak in."""
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    for key in ('AWS_PROFILE', 'AWS_SESSION_TOKEN', 'AWS_CONFIG_FILE', 'AWS_SHARED_CREDENTIALS_FILE'):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv('AWS_CONFIG_FILE', os.devnull)
    monkeypatch.setenv('AWS_SHARED_CREDENTIALS_FILE', os.devnull)
