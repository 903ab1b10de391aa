"""A ScaNN searcher in a helper process, so that loading one never stalls the process that serves.

ScaNN's loader (`load_searcher`) is C++ that holds the GIL from start to end: at 1M items x 64-d it
appends the hashed dataset row by row and packs it, 0.37-0.45 s in which no other Python thread runs
(perf: half of it `DenseDataset<uint8>::Append`'s memmove). A server hot-swapping a ScaNN bundle then
answered nothing for that long (bench freshness at 1M: p99 62-70x steady in every swap, 0 failed).
The C++ destructor of the old searcher holds it too.

`SearcherProcess` runs the loaded searcher in a child process (this file, run as a script, imports only
numpy and ScaNN) and forwards the two calls towerann makes, `search` and `search_batched`, over a pair
of pipes; the parent waits in `os.read`/`os.write`, which release the GIL, so the load, the searches
and the old searcher's teardown all run beside the requests instead of in front of them. One call at a
time per process (a lock). Measured at 1M items x 128-d: the helper's load left no gap over 8 ms in the
parent's other threads (in process: one of 450 ms); a search's p50 0.97 against 0.91 ms in process at
K=100, 1.15 against 1.16 ms at K=1000.
The child exits when its stdin closes (`close()`, or the parent's death).

Protocol (little-endian): the child answers its start with a status frame; each request is
`<5i` (rows, dim, final_n, pre_reorder_n, leaves) + rows x dim float32; each answer is a status frame
then `<2i` (rows, cols) + rows x cols int32 indices + rows x cols float32 scores. A status frame is
`<i` length (0: ok) and that many bytes of an error message.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

REQUEST = struct.Struct("<5i")
SHAPE = struct.Struct("<2i")
STATUS = struct.Struct("<i")
START_TIMEOUT_S = 120.0  # a load of the assets; 1M items take ~1 s


class SearcherProcessError(RuntimeError):
    """The helper process could not load the searcher, or died."""


def _read_exactly(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError(f"pipe closed with {left} of {n} bytes unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_status(fd: int) -> str | None:
    (length,) = STATUS.unpack(_read_exactly(fd, STATUS.size))
    return _read_exactly(fd, length).decode("utf-8", "replace") if length else None


class SearcherProcess:
    """`search` / `search_batched` / `serialize` of a ScaNN searcher loaded from `directory` in a child."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid = os.getpid()
        self._start()

    def _start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        proc = subprocess.Popen(
            # -P: not this file's folder first on sys.path, where index/scann.py would shadow ScaNN's package
            [sys.executable, "-P", str(Path(__file__).resolve()), str(self.directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # ScaNN's log lines; errors come back as status frames
            env=env,
        )
        self._proc, self._pid = proc, os.getpid()
        try:
            error = _read_status(self._out_fd())
        except EOFError as e:
            self.close()
            raise SearcherProcessError(f"{self.directory}: the ScaNN helper process exited while loading ({e})") from e
        if error is not None:
            self.close()
            raise SearcherProcessError(f"{self.directory}: {error}")

    def _out_fd(self) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        return self._proc.stdout.fileno()

    def _in_fd(self) -> int:
        assert self._proc is not None and self._proc.stdin is not None
        return self._proc.stdin.fileno()

    def _call(self, q: np.ndarray, final_n: int, pre_reorder_n: int, leaves: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(q, dtype=np.float32)
        rows, dim = q.shape
        with self._lock:
            if self._proc is not None and self._pid != os.getpid():
                self._proc = None  # a forked worker: the parent's child and pipes are the parent's
            if self._proc is None or self._proc.poll() is not None:  # died since (killed, OOM): load it again
                self._start()
            try:
                _write_all(self._in_fd(), REQUEST.pack(rows, dim, final_n, pre_reorder_n, leaves) + q.tobytes())
                error = _read_status(self._out_fd())
                if error is not None:
                    raise SearcherProcessError(f"ScaNN search failed in the helper process: {error}")
                r, c = SHAPE.unpack(_read_exactly(self._out_fd(), SHAPE.size))
                idx = np.frombuffer(_read_exactly(self._out_fd(), 4 * r * c), np.int32).reshape(r, c)
                dist = np.frombuffer(_read_exactly(self._out_fd(), 4 * r * c), np.float32).reshape(r, c)
            except (EOFError, BrokenPipeError, OSError) as e:
                self.close()
                raise SearcherProcessError(f"the ScaNN helper process for {self.directory} died ({e})") from e
        return idx, dist

    def search(self, q: np.ndarray, final_n: int, pre_reorder_n: int, leaves: int) -> tuple[np.ndarray, np.ndarray]:
        idx, dist = self._call(q[None, :], final_n, pre_reorder_n, leaves)
        return idx[0], dist[0]

    def search_batched(
        self, q: np.ndarray, final_n: int, pre_reorder_n: int, leaves: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return self._call(q, final_n, pre_reorder_n, leaves)

    def serialize(self, directory: str, relative_path: bool = True) -> None:
        """The searcher is the files it was loaded from (the main tier never changes after a build)."""
        for f in self.directory.iterdir():
            shutil.copy2(f, Path(directory) / f.name)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or self._pid != os.getpid():
            return
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the child exits on its closed stdin anyway
            pass


def _serve(directory: str, inp: BinaryIO, out: BinaryIO) -> int:
    """The child: load, say so, then answer requests until stdin closes."""
    in_fd, out_fd = inp.fileno(), out.fileno()

    def status(error: str | None) -> None:
        msg = (error or "").encode()
        _write_all(out_fd, STATUS.pack(len(msg)) + msg)

    try:
        from scann.scann_ops.py import scann_ops_pybind

        searcher: Any = scann_ops_pybind.load_searcher(directory)
    except Exception as e:  # a missing ScaNN, bad assets: one line for the parent's error
        status(f"ScaNN could not load it ({type(e).__name__}: {e})")
        return 1
    status(None)
    while True:
        try:
            head = _read_exactly(in_fd, REQUEST.size)
        except EOFError:
            return 0
        rows, dim, final_n, pre_reorder_n, leaves = REQUEST.unpack(head)
        q = np.frombuffer(_read_exactly(in_fd, 4 * rows * dim), np.float32).reshape(rows, dim)
        try:
            if rows == 1:  # the single-query entry point: less per-call work than a batch of one
                i, d = searcher.search(q[0], final_n, pre_reorder_n, leaves)
                idx, dist = np.asarray(i)[None, :], np.asarray(d)[None, :]
            else:
                idx, dist = searcher.search_batched(q, final_n, pre_reorder_n, leaves)
        except Exception as e:
            status(f"{type(e).__name__}: {e}")
            continue
        idx = np.ascontiguousarray(idx, np.int32)
        dist = np.ascontiguousarray(dist, np.float32)
        status(None)
        _write_all(out_fd, SHAPE.pack(*idx.shape) + idx.tobytes() + dist.tobytes())


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer))
