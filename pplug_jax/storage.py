"""The one file layer: every read and write of a user path, local or `gs://`, goes through here.

Local paths go straight to `os` and `open` (unchanged behaviour, atomic renames). Other schemes
go through `etils.epath` (the layer orbax uses), set to its fsspec backend so `gs://` is served
by gcsfs: one client for our files and orbax's, and one that honours `STORAGE_EMULATOR_HOST`.
Object stores have no rename and no `flock`, so the few writes that need safety there use
Cloud Storage generation preconditions (`create_once`, `replace_if`, `delete_if`).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import glob as glob_lib
import os
import re
import shutil
import tempfile
from typing import IO, Any, Iterator

# Before epath picks a backend (it decides once per process): gs:// through gcsfs, not TF.
os.environ.setdefault('EPATH_USE_TF', 'false')
# Before gcsfs is imported: its classic JSON-API filesystem. gcsfs 2026.10's default subclass
# asks a gRPC storage-control API for the bucket's type on every open, and does not cache an
# unknown answer: a round trip per file on Cloud Storage, and against an emulator (plain
# HTTP) a TLS handshake retried until its deadline, so every open hangs. Zonal buckets, which
# only that subclass serves, are not needed here; set the variable to true to have it back.
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')

from etils import epath  # noqa: E402

from pplug_jax.errors import UserError  # noqa: E402


class StorageError(UserError):
  """A storage path that cannot be used (missing bucket, no permission)."""


def is_remote(path: str) -> bool:
  """Whether a path names an object store (gs://, s3://, ...) rather than the local disk."""
  return '://' in str(path)


READ_BLOCK = 16 << 20  # bytes per ranged request when reading an object in order


def configure_clients() -> None:
  """Settings for every Cloud Storage client, made before each is made (so a variable set
  after import counts too):
  - gcsfs keeps no listings cache: other processes, and tensorstore in this one (orbax's
    arrays), write the same folders, and a cached listing would hide their objects (a
    checkpoint written by another process, a lock that is gone);
  - against an emulator (`STORAGE_EMULATOR_HOST`) every client is anonymous, so none looks for
    credentials: gcsfs gets `token='anon'` (its default asks google-auth, which probes the GCE
    metadata server), google-cloud-storage is anonymous there by itself, and tensorstore is
    pointed at the emulator with its test token."""
  import fsspec.config
  gs = fsspec.config.conf.setdefault('gs', {})
  gs.setdefault('use_listings_cache', False)
  host = os.environ.get('STORAGE_EMULATOR_HOST')
  if host:
    gs.setdefault('token', 'anon')
    os.environ.setdefault('TENSORSTORE_GCS_HTTP_URL', host)
    os.environ.setdefault('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'emulator')


def _p(path: str) -> epath.Path:
  configure_clients()
  return epath.Path(path)


def join(*parts: str) -> str:
  return os.path.join(*parts)  # posix join keeps 'gs://bucket/a' intact


def abspath(path: str) -> str:
  """The absolute form of a local path; a URI is already absolute and is returned as is."""
  return path if is_remote(path) else os.path.abspath(path)


def realpath(path: str) -> str:
  return path if is_remote(path) else os.path.realpath(path)


def exists(path: str) -> bool:
  return _p(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _p(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _p(path).is_file() if is_remote(path) else os.path.isfile(path)


def getsize(path: str) -> int:
  return _p(path).stat().length if is_remote(path) else os.path.getsize(path)


def mtime_ns(path: str) -> int:
  """Last modification time in nanoseconds (an object's update time on a store)."""
  if is_remote(path):
    return int(_p(path).stat().mtime * 1e9)
  return os.stat(path).st_mtime_ns


def listdir(path: str) -> list[str]:
  """The names in a folder (an object prefix on a store)."""
  if is_remote(path):
    return [p.name for p in _p(path).iterdir()]
  return os.listdir(path)


def glob(pattern: str) -> list[str]:
  """Paths matching a pattern whose wildcards are in the last component only."""
  if is_remote(pattern):
    head, tail = pattern.rsplit('/', 1)
    return [os.fspath(p) for p in _p(head).glob(tail)]
  return glob_lib.glob(pattern)


def makedirs(path: str, exist_ok: bool = True) -> None:
  if is_remote(path):
    _p(path).mkdir(parents=True, exist_ok=exist_ok)
  else:
    os.makedirs(path, exist_ok=exist_ok)


def remove(path: str) -> None:
  if is_remote(path):
    _p(path).unlink()
  else:
    os.remove(path)


def rmtree(path: str) -> None:
  if is_remote(path):
    _p(path).rmtree()
  else:
    shutil.rmtree(path)


def walk(path: str) -> Iterator[tuple[str, list[str], list[str]]]:
  if is_remote(path):
    scheme = str(path).split('://', 1)[0]
    for root, dirs, files in _p(path).walk():
      root = os.fspath(root)  # fsspec may drop the scheme
      yield root if '://' in root else f'{scheme}://{root}', list(dirs), list(files)
  else:
    yield from os.walk(path)


def copy(src: str, dst: str) -> None:
  """Copies one file between any two places (local or remote)."""
  if not is_remote(src) and not is_remote(dst):
    shutil.copy(src, dst)
    return
  with open(src, 'rb') as fi, open(dst, 'wb') as fo:
    shutil.copyfileobj(fi, fo, 1 << 24)


def copytree(src: str, dst: str) -> None:
  if not is_remote(src) and not is_remote(dst):
    shutil.copytree(src, dst)
    return
  for root, _, files in walk(src):
    rel = os.path.relpath(root, src) if not is_remote(src) else root[len(src.rstrip('/')):]
    out = join(dst, rel.strip('/')) if rel not in ('.', '') else dst
    makedirs(out)
    for name in files:
      copy(join(root, name), join(out, name))


def open(path: str, mode: str = 'r', encoding: str | None = None) -> IO[Any]:  # noqa: A001
  """Opens a local or remote file. On an object store a written file appears whole on close."""
  if is_remote(path):
    if 'b' not in mode and encoding is None:
      encoding = 'utf-8'
    if 'r' in mode:
      # fsspec's classic read-ahead cache: gcsfs's newer background prefetcher hangs when one
      # file is read from several threads in turn (tf.data's generator threads do that).
      import fsspec
      configure_clients()
      fs, name = fsspec.core.url_to_fs(path)
      kwargs = {'encoding': encoding} if 'b' not in mode else {}
      return fs.open(name, mode, cache_type='readahead', block_size=READ_BLOCK, **kwargs)
    return _p(path).open(mode, encoding=encoding)
  return builtins.open(path, mode, encoding=encoding)


def read_range(path: str, start: int, length: int) -> bytes:
  """`length` bytes from offset `start` (a ranged read on an object store)."""
  with open(path, 'rb') as f:
    f.seek(start)
    return f.read(length)


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole file so that a reader sees the old one or the new one, never half of one:
  locally a temporary file and a rename; on an object store one upload (objects are replaced
  atomically, so there is no rename)."""
  if is_remote(path):
    with open(path, 'wb') as f:
      f.write(data)
    return
  tmp = f'{path}.tmp{os.getpid()}'
  with builtins.open(tmp, 'wb') as f:
    f.write(data)
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)


def chmod_readable(path: str) -> None:
  """Local files get mode 0644 (objects have no modes)."""
  if not is_remote(path):
    os.chmod(path, 0o644)


# --- Cloud Storage generation preconditions (write-once files and the workdir lock) ---------

def _split_gs(path: str) -> tuple[str, str]:
  if not path.startswith('gs://'):
    raise StorageError(f'{path}: only local paths and gs:// support exclusive writes.')
  bucket, _, name = path[len('gs://'):].partition('/')
  return bucket, name


# What to do when Cloud Storage refuses the credentials or a request.
LOGIN = ('run `gcloud auth application-default login` (a workstation), or give the TPU/GCE VM '
         'a service account with access to the bucket (or set GOOGLE_APPLICATION_CREDENTIALS '
         'to a key file)')
# Cloud Storage's bucket names: 3-63 lowercase letters, digits, '-', '_' and '.', beginning
# and ending with a letter or digit (names with dots may be longer; none is needed here).
BUCKET_NAME = re.compile(r'[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]')


@contextlib.contextmanager
def _gcs_errors(path: str, doing: str) -> Iterator[None]:
  """Cloud Storage's refusals of `path` as one-line StorageErrors that say what to do."""
  from google.api_core import exceptions as gexc
  from google.auth import exceptions as auth_exc
  try:
    yield
  except auth_exc.DefaultCredentialsError:
    raise StorageError(f'{path}: no Google Cloud credentials found to {doing} it: '
                       f'{LOGIN}.') from None
  except (auth_exc.RefreshError, gexc.Unauthorized) as e:
    raise StorageError(f'{path}: Cloud Storage refused the credentials ({_short(e)}): '
                       f'{LOGIN}.') from None
  except gexc.Forbidden as e:
    bucket = _split_gs(path)[0]
    raise StorageError(f'{path}: permission denied to {doing} it ({_short(e)}). The '
                       f'credentials in use need {"write" if doing == "write" else "read"} '
                       f'access to gs://{bucket} (e.g. roles/storage.objectUser), or use '
                       'another bucket.') from None


def _short(e: Exception) -> str:
  return str(e).splitlines()[0][:200]


@functools.cache
def _client():
  from google.cloud import storage as gcs
  configure_clients()  # google-cloud-storage is anonymous by itself against an emulator
  return gcs.Client()


def _blob(path: str):
  bucket, name = _split_gs(path)
  return _client().bucket(bucket).blob(name)


def check_bucket(path: str, key: str) -> None:
  """Refuses a gs:// path whose bucket name GCS would refuse, whose bucket does not exist, or
  that the credentials cannot read, naming the config key or flag (before any work)."""
  if not str(path).startswith('gs://'):
    return
  from google.api_core import exceptions as gexc
  bucket, name = _split_gs(path)
  if not BUCKET_NAME.fullmatch(bucket):
    raise StorageError(f'{key}={path}: {bucket!r} is not a valid Cloud Storage bucket name '
                       '(3-63 lowercase letters, digits, -, _ and ., beginning and ending with a '
                       'letter or digit). Fix the path.')
  try:
    with _gcs_errors(path, 'read'):
      # objects.list (read access) rather than buckets.get, which object roles lack
      list(_client().list_blobs(bucket, prefix=name, max_results=1))
  except StorageError as e:
    raise StorageError(f'{key}={e}') from None
  except gexc.NotFound:
    raise StorageError(f'{key}={path}: the bucket gs://{bucket} does not exist. Create it '
                       f'(gcloud storage buckets create gs://{bucket}) or fix the path.') from None
  except gexc.GoogleAPIError as e:
    raise StorageError(f'{key}={path}: cannot reach bucket gs://{bucket} ({_short(e)}). Check '
                       'the name and the network.') from None


PATH_KEYS = ('data.lamp_dir', 'data.records_dir', 'llm.path', 'llm.tokenizer', 'encoder.path')


def check_config_buckets(config) -> None:
  """Every gs:// path of the config is in a bucket that exists (before any long work)."""
  for key in PATH_KEYS:
    section, name = key.split('.')
    value = config[section].get(name, '') if section in config else ''
    if value:
      check_bucket(value, f'config.{key}')


def read_generation(path: str) -> tuple[bytes, int] | None:
  """An object's bytes and generation, or None when it does not exist."""
  from google.api_core import exceptions as gexc
  blob = _blob(path)
  try:
    with _gcs_errors(path, 'read'):
      data = blob.download_as_bytes()
  except gexc.NotFound:
    return None
  return data, int(blob.generation)


def create_once(path: str, data: bytes) -> int | None:
  """Creates the object only if it does not exist; its generation, or None if it existed."""
  from google.api_core import exceptions as gexc
  blob = _blob(path)
  try:
    with _gcs_errors(path, 'write'):
      blob.upload_from_string(data, if_generation_match=0)
  except gexc.PreconditionFailed:
    return None
  return int(blob.generation)


def replace_if(path: str, data: bytes, generation: int) -> int | None:
  """Overwrites the object only if it is still at `generation`; the new one, or None."""
  from google.api_core import exceptions as gexc
  blob = _blob(path)
  try:
    with _gcs_errors(path, 'write'):
      blob.upload_from_string(data, if_generation_match=generation)
  except (gexc.PreconditionFailed, gexc.NotFound):
    return None
  return int(blob.generation)


def delete_if(path: str, generation: int) -> bool:
  """Deletes the object only if it is still at `generation`."""
  from google.api_core import exceptions as gexc
  try:
    with _gcs_errors(path, 'write'):
      _blob(path).delete(if_generation_match=generation)
  except (gexc.PreconditionFailed, gexc.NotFound):
    return False
  return True


# --- Model folders on an object store --------------------------------------------------------

@functools.cache
def local_model_dir(path: str) -> str:
  """A local folder with a model folder's small files (config, tokenizer), for the libraries
  that read only local paths (transformers' tokenizers). Weights (*.safetensors, *.bin) stay
  remote and are read by ranges. A local path is returned as is; the copy is a temporary
  folder outside every user path, removed at exit."""
  if not is_remote(path):
    return path
  import atexit
  out = tempfile.mkdtemp(prefix='pplug_jax_model_')
  atexit.register(shutil.rmtree, out, True)
  for root, _, files in walk(path):
    rel = root[len(path.rstrip('/')):].strip('/')
    for name in files:
      if name.endswith(('.safetensors', '.bin', '.pt', '.pth', '.msgpack', '.h5')):
        continue
      os.makedirs(os.path.join(out, rel), exist_ok=True)
      copy(join(root, name), os.path.join(out, rel, name))
  return out


def dirname(path: str) -> str:
  return os.path.dirname(path)


def basename(path: str) -> str:
  return os.path.basename(path)


def save_safetensors(tensors: dict, path: str) -> None:
  """safetensors.numpy.save_file for any path (the file appears whole)."""
  from safetensors.numpy import save
  write_bytes(path, save(tensors))


def load_safetensors(path: str) -> dict:
  """safetensors.numpy.load_file for any path."""
  from safetensors.numpy import load
  with open(path, 'rb') as f:
    return load(f.read())
