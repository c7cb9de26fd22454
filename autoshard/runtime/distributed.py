"""Multi-process runs: start-up over ``jax.distributed``, process-local data into global
arrays, and a local launcher.

One ``parallelize``'d function runs unchanged across processes: every process calls it with
the same arguments and JAX runs one SPMD program over the global mesh (``jax.devices()``
lists every process's devices). Only the data differs in how it arrives:

* values every process holds whole (parameters from the same seed, a restored checkpoint)
  are placed by ``ParallelFunction`` itself: each process fills its own shards;
* data each process loads only its part of (its rows of the global batch) becomes a global
  array with :func:`global_array` (``jax.make_array_from_process_local_data``).

>>> from autoshard.runtime import distributed
>>> distributed.initialize()          # no-op without a coordinator; reads AUTOSHARD_* env  # doctest: +SKIP
>>> mesh = ash.make_mesh("data=2,model=4")                         # all processes' devices  # doctest: +SKIP
>>> s = pstep.input_shardings(params, opt_state, batch)[2]["tokens"]                       # doctest: +SKIP
>>> tokens = distributed.global_array(my_rows, s, global_shape=(8, 16))                    # doctest: +SKIP

The launcher (``autoshard launch --processes 2 --devices-per-process 4 -- CMD``) runs CMD
once per process on 127.0.0.1 with ``AUTOSHARD_COORDINATOR``, ``AUTOSHARD_NUM_PROCESSES``,
``AUTOSHARD_PROCESS_ID`` set and ``XLA_FLAGS`` asking for the simulated CPU devices.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

ENV_COORDINATOR = "AUTOSHARD_COORDINATOR"
ENV_NUM_PROCESSES = "AUTOSHARD_NUM_PROCESSES"
ENV_PROCESS_ID = "AUTOSHARD_PROCESS_ID"
ENV_DEVICES_PER_PROCESS = "AUTOSHARD_DEVICES_PER_PROCESS"
# JAX's own spellings, read when ours are absent.
_JAX_ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
            "process_id": "JAX_PROCESS_ID"}

_DEVICE_FLAG = "--xla_force_host_platform_device_count"

#: Log lines of the collectives' transport that say nothing to a user of ``autoshard launch``
#: (gloo prints one per communicator it opens); shown with ``verbose=True``.
TRANSPORT_LOG = re.compile(r"^\[Gloo\] Rank \d+ is connected to \d+ peer ranks\b")
# Gloo writes that line in pieces ("[Gloo] Rank ", the rank, " is connected to ", ...) from one
# thread per communicator, so communicators opening at once interleave them: "[Gloo] Rank [Gloo]
# Rank 2 is connected to 3 peer ranks. ...: 3" with the rest of the other copy ("3 is connected
# to ...", or just "1") on the next line. A line made only of the message's pieces belongs to the
# transport when it starts a message, or while copies begun on earlier lines are still unfinished.
_TRANSPORT_PIECES = re.compile(r"\[Gloo\]|Rank|is connected to|peer ranks\.?|Expected number of connected"
                               r"|is\s*:|\d+|\s+")


class TransportLogFilter:
    """Says which lines of one process's output are the transport's log (see ``TRANSPORT_LOG``)."""

    def __init__(self):
        self._unfinished = 0        # messages begun on dropped lines whose newline is still to come

    def drops(self, line: str) -> bool:
        only_pieces = _TRANSPORT_PIECES.sub("", line) == ""
        begun = line.count("[Gloo]")
        if only_pieces and (line.startswith("[Gloo]") or self._unfinished):
            self._unfinished = max(self._unfinished + begun - 1, 0)
            return True
        self._unfinished = 0
        return bool(TRANSPORT_LOG.match(line))


def _env_int(*names):
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return None


def set_cpu_device_count(n: int) -> None:
    """Ask for ``n`` simulated CPU devices; effective only before JAX's backend starts.
    Appends to ``XLA_FLAGS`` (an existing device count is replaced, other flags kept)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_FLAG}={int(n)}"])


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, devices_per_process: int | None = None,
               timeout_s: int = 120) -> bool:
    """Join a multi-process run; returns whether this process is part of one.

    Arguments left ``None`` are read from the environment (``AUTOSHARD_COORDINATOR``,
    ``AUTOSHARD_NUM_PROCESSES``, ``AUTOSHARD_PROCESS_ID``, ``AUTOSHARD_DEVICES_PER_PROCESS``,
    then JAX's ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``). Without a
    coordinator it does nothing and returns False (a one-process run). Calling it again after
    a successful start returns True. Must run before anything starts JAX's backend
    (``jax.devices()``, any computation).

    >>> initialize("127.0.0.1:12355", num_processes=2, process_id=0)   # doctest: +SKIP
    True
    """
    import jax
    from jax._src import xla_bridge

    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) \
        or os.environ.get(_JAX_ENV["coordinator"])
    if not coordinator_address:
        return False
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES, _JAX_ENV["num_processes"])
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID, _JAX_ENV["process_id"])
    if num_processes is None or process_id is None:
        raise ValueError(f"multi-process start-up with coordinator {coordinator_address} needs the number of "
                         f"processes and this process's id: pass num_processes= and process_id=, or set "
                         f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is not in 0..{num_processes - 1}")
    if devices_per_process is None:
        devices_per_process = _env_int(ENV_DEVICES_PER_PROCESS)
    if xla_bridge.backends_are_initialized():
        raise RuntimeError("autoshard.runtime.distributed.initialize() must run before JAX starts its backend "
                           "(before jax.devices(), device_put or any computation); call it first thing in the program")
    if devices_per_process is not None:
        set_cpu_device_count(devices_per_process)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)
    return True


def is_multiprocess() -> bool:
    import jax
    return jax.process_count() > 1


def is_main_process() -> bool:
    import jax
    return jax.process_index() == 0


def shutdown() -> None:
    """Leave the multi-process run (JAX also does this at exit)."""
    import jax
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


# ------------------------------------------------------------------------ global arrays

def local_index(sharding, global_shape) -> tuple[slice, ...]:
    """The block of a global array of ``global_shape`` that this process's devices hold under
    ``sharding`` (one slice per dim): the rows this process should load.

    On a (data=2, model=4) mesh of two 4-device processes, ``P('data', None)`` on [8, 16]
    gives process 1 ``(slice(4, 8), slice(0, 16))``; a replicated value gives every process
    the whole array.
    """
    global_shape = tuple(global_shape)
    idx_map = sharding.addressable_devices_indices_map(global_shape)
    out = []
    for d, size in enumerate(global_shape):
        starts, stops = [], []
        for idx in idx_map.values():
            start, stop, _ = idx[d].indices(size) if d < len(idx) else (0, size, 1)
            starts.append(start)
            stops.append(stop)
        out.append(slice(min(starts), max(stops)) if starts else slice(0, size))
    return tuple(out)


def local_slice(global_value, sharding):
    """This process's part of a value every process can compute whole (a data loader that
    reads only its rows would produce exactly this)."""
    value = np.asarray(global_value)
    return value[local_index(sharding, value.shape)]


def global_array(local_data, sharding, global_shape=None):
    """A global ``jax.Array`` from this process's part of it
    (``jax.make_array_from_process_local_data``); ``local_data`` is the block
    :func:`local_index` names. Without ``global_shape`` the process-local blocks are assumed
    to tile the split dims evenly."""
    import jax
    return jax.make_array_from_process_local_data(sharding, np.asarray(local_data), global_shape)


def global_arrays(local_tree, shardings, global_shapes=None):
    """:func:`global_array` over a pytree (``shardings``/``global_shapes`` the same structure)."""
    import jax
    if global_shapes is None:
        return jax.tree.map(lambda x, s: global_array(x, s), local_tree, shardings)
    return jax.tree.map(lambda x, s, g: global_array(x, s, tuple(g.shape) if hasattr(g, "shape") else tuple(g)),
                        local_tree, shardings, global_shapes,
                        is_leaf=lambda v: isinstance(v, tuple) and all(isinstance(i, int) for i in v))


def from_host(value, sharding):
    """A global array from a value every process holds whole: each process fills only its own
    shards (no communication). Works for one process too."""
    import jax
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_host(x) -> np.ndarray:
    """The whole value of a (possibly multi-process) array on every process."""
    import jax
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ------------------------------------------------------------------------ local launcher

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _resolve_command(cmd: list[str]) -> list[str]:
    """``autoshard ...`` and ``python ...`` run with this interpreter (the virtual environment's
    scripts may not be on PATH)."""
    if cmd and cmd[0] == "autoshard":
        return [sys.executable, "-m", "autoshard.cli", *cmd[1:]]
    if cmd and cmd[0] in ("python", "python3"):
        return [sys.executable, *cmd[1:]]
    return list(cmd)


def _pump(stream, prefix: str, sink, lock, verbose: bool = True):
    transport_log = TransportLogFilter()
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        if not verbose and transport_log.drops(line):
            continue
        with lock:
            sink.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            sink.flush()
    stream.close()


def _kill_group(proc: subprocess.Popen, sig) -> None:
    try:
        os.killpg(proc.pid, sig)        # the child leads its own process group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def launch_local(cmd: list[str], *, processes: int, devices_per_process: int, timeout_s: float | None = None,
                 port: int | None = None, env: dict | None = None, stdout=None, grace_s: float = 5.0,
                 verbose: bool = False) -> int:
    """Run ``cmd`` as ``processes`` JAX processes on 127.0.0.1, each with
    ``devices_per_process`` simulated CPU devices. Output lines are prefixed ``[p<id>] ``;
    the transport's log lines (``TRANSPORT_LOG``) are dropped unless ``verbose``.

    Returns 0 when every process succeeds; otherwise the first failing exit status (the
    others are killed as soon as one fails), or 124 when ``timeout_s`` passes first.
    """
    if processes < 1 or devices_per_process < 1:
        raise ValueError(f"--processes ({processes}) and --devices-per-process ({devices_per_process}) must be >= 1")
    if not cmd:
        raise ValueError("nothing to launch: write the command after '--', e.g. "
                         "autoshard launch --processes 2 --devices-per-process 4 -- autoshard demo")
    sink = stdout or sys.stdout
    port = port or free_port()
    base = dict(os.environ if env is None else env)
    base.setdefault("JAX_PLATFORMS", "cpu")
    base["PYTHONUNBUFFERED"] = "1"
    flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    base["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_FLAG}={devices_per_process}"])
    base[ENV_COORDINATOR] = f"127.0.0.1:{port}"
    base[ENV_NUM_PROCESSES] = str(processes)
    base[ENV_DEVICES_PER_PROCESS] = str(devices_per_process)
    argv = _resolve_command(cmd)
    lock = threading.Lock()
    procs, pumps = [], []
    try:
        for pid in range(processes):
            penv = dict(base, **{ENV_PROCESS_ID: str(pid)})
            p = subprocess.Popen(argv, env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[p{pid}] ", sink, lock, verbose), daemon=True)
            t.start()
            pumps.append(t)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        status = 0
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, status = failed[0]
                status = 128 - status if status < 0 else status      # killed by a signal
                with lock:
                    print(f"autoshard launch: process {i} exited with status {status}; stopping the others",
                          file=sys.stderr, flush=True)
                break
            if all(c == 0 for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                with lock:
                    print(f"autoshard launch: timed out after {timeout_s:g} s; stopping all processes",
                          file=sys.stderr, flush=True)
                status = 124
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        status = 130
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_group(p, signal.SIGTERM)
        end = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(p, signal.SIGKILL)
                p.wait()
        for t in pumps:
            t.join(timeout=2.0)
    return status
