"""Several devices and processes with JAX's own runtime (docs/scale.md).

One device mesh with a single `data` axis serves every job. A training batch is sharded over that
axis (its leading, per-example axis), the trainable state is replicated, and `jit` inserts the
collectives (the gradient all-reduce) itself: the global batch is the one the config names, on
any number of devices. Precompute jobs (embeddings, pseudo-labels, boxes) split their file lists
over processes with `process_shard` and write one output per item atomically.

Several processes (hosts) join through `jax.distributed.initialize`, started by `initialize`
from the environment:

    JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i   explicit
    SLURM_NTASKS > 1 (srun)                                                 JAX's SLURM detection
    AMSAM_DISTRIBUTED=auto                          JAX's cluster detection (Cloud TPU, Open MPI)

Every process builds the same global batch on its host (the data order is a function of the
seed and the step), so `shard_batch` only cuts it: no process waits for another's data.
"""

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from amsam_jax.utils.errors import AmsamError, first_line

DATA = "data"
ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"  # read by JAX itself too
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_MODE = "AMSAM_DISTRIBUTED"  # "auto": JAX's cluster auto-detection
ENV_HEARTBEAT = "AMSAM_HEARTBEAT_TIMEOUT_S"
ENV_INIT_TIMEOUT = "AMSAM_INIT_TIMEOUT_S"
HEARTBEAT_TIMEOUT_S = 60  # a dead peer is declared dead after this long without heartbeats
INIT_TIMEOUT_S = 300
EXIT_PEER_FAILED = 3
PEER_FAILED = "another process of this run stopped or cannot be reached"  # the one line's words
# Messages of the runtime errors a dead or unreachable peer causes in this process: a Gloo
# collective whose TCP pair was reset, a coordination-service barrier or heartbeat failure.
_PEER_FAILURE = (
    "gloo",
    "heartbeat",
    "coordination",
    "connection reset",
    "connection refused",
    "barrier",
    "deadline_exceeded",
    "unavailable:",
)

T = TypeVar("T")
_DEVICE_LIMIT = {"data": 0}  # a command's `--mesh-data` (`limit_devices`); 0: no limit


class MeshError(AmsamError):
    """A device or process setting that cannot work; one line naming the setting."""


# ----------------------------------------------------------------------------- processes


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise MeshError(name, f"must be an integer, got {value!r}") from None


def joins_processes() -> bool:
    """Whether the environment asks this process to join a multi-process run (`initialize`).

    Raises:
        MeshError: an invalid `AMSAM_DISTRIBUTED`.
    """
    mode = os.environ.get(ENV_MODE, "")
    if mode not in ("", "auto", "off"):
        raise MeshError(ENV_MODE, f"must be 'auto' or 'off', got {mode!r}")
    slurm = (_env_int("SLURM_NTASKS", 1) or 1) > 1 and "SLURM_JOB_ID" in os.environ
    return mode != "off" and bool(os.environ.get(ENV_ADDRESS) or mode == "auto" or slurm)


def initialize() -> bool:
    """Joins the processes of a multi-process run (see the module docstring); call it first.

    A no-op without those variables (a single process) or when already initialised. The heartbeat
    timeout (`AMSAM_HEARTBEAT_TIMEOUT_S`, default 60) bounds how long the others run on after a
    process dies; `AMSAM_INIT_TIMEOUT_S` (default 300) how long they wait for every process to
    join.

    Returns:
        whether this process is part of a multi-process run.

    Raises:
        MeshError: an incomplete or invalid setting, or processes that did not all join.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if not joins_processes():
        return False
    address = os.environ.get(ENV_ADDRESS) or None
    kwargs: dict[str, Any] = {
        "heartbeat_timeout_seconds": _env_int(ENV_HEARTBEAT, HEARTBEAT_TIMEOUT_S),
        "initialization_timeout": _env_int(ENV_INIT_TIMEOUT, INIT_TIMEOUT_S),
        "shutdown_timeout_seconds": _env_int(ENV_HEARTBEAT, HEARTBEAT_TIMEOUT_S),
    }
    if address:
        count, index = _env_int(ENV_NUM_PROCESSES), _env_int(ENV_PROCESS_ID)
        if count is None or index is None:
            raise MeshError(
                ENV_ADDRESS, f"is set: set {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} as well"
            )
        if not 0 <= index < count:
            raise MeshError(ENV_PROCESS_ID, f"{index} is not in [0, {ENV_NUM_PROCESSES}={count})")
        kwargs.update(coordinator_address=address, num_processes=count, process_id=index)
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:  # JAX's own errors (timeout, bad address, ...)
        raise MeshError(address or "jax.distributed", f"cannot join ({first_line(e)})") from None
    return jax.process_count() > 1


def process_count() -> int:
    return jax.process_count()


def process_index() -> int:
    return jax.process_index()


def is_main_process() -> bool:
    """Whether this process writes the run's shared files (metrics, plots, summaries)."""
    return jax.process_index() == 0


def process_shard(items: Sequence[T]) -> list[T]:
    """This process's share of `items`: every `process_count()`-th, from `process_index()`."""
    return list(items[jax.process_index() :: jax.process_count()])


def sync(name: str) -> None:
    """Returns once every process reached `sync(name)` (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
    """Process 0's `flag`, on every process: one decision for a choice each makes by itself
    (a checkpoint due by the clock). A no-op with one process."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(flag), np.int32)))


def agree_any(flag: bool) -> bool:
    """Whether any process's `flag` is set, on every process (a stop that a signal asked of one
    process, or of each at a different moment). A no-op with one process."""
    if jax.process_count() == 1:
        return bool(flag)
    flags = multihost_utils.process_allgather(np.asarray(bool(flag), np.int32))
    return bool(np.any(flags))


def agree_values(values: Sequence[float]) -> list[float]:
    """Process 0's float64 `values`, bit for bit, on every process (a result that process 0
    computed alone, or that another host's CPU could round differently). A no-op with one
    process."""
    if jax.process_count() == 1:
        return [float(v) for v in values]
    # As int32 pairs: the broadcast sums in the default (float32) precision unless x64 is on.
    bits = np.ascontiguousarray(np.asarray(values, np.float64)).view(np.int32)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(bits), np.int32)
    return [float(v) for v in shared.view(np.float64)]


def is_peer_failure(error: BaseException) -> bool:
    """Whether a runtime error means another process died or cannot be reached."""
    if isinstance(error, AmsamError | KeyboardInterrupt) or jax.process_count() == 1:
        return False
    text = str(error).lower()
    return any(s in text for s in _PEER_FAILURE)


def add_mesh_flag(parser) -> None:
    """The precompute and evaluation commands' `--mesh-data N` (see `limit_devices`)."""
    parser.add_argument(
        "--mesh-data",
        type=int,
        default=0,
        metavar="N",
        help="devices to use (0: all local devices; several processes: see docs/scale.md)",
    )


def peer_failure_line(index, reason: str, hint: str) -> str:
    """The one line a surviving process prints when another process of its run died."""
    return f"error: process {index}: {PEER_FAILED} ({reason[:200]}); {hint}"


def stop_on_peer_failure(body: Callable[[], int], hint: str) -> Callable[[], int]:
    """`body`, which in a multi-process run turns a dead peer into one line and a quick exit.

    The process then exits at once with status 3 (`os._exit`): JAX's exit handler would
    otherwise wait at a shutdown barrier that can never complete, and abort after the heartbeat
    timeout with a stack trace.
    """

    def guarded_body() -> int:
        try:
            return body()
        except Exception as e:
            if not is_peer_failure(e):
                raise
            print(peer_failure_line(jax.process_index(), first_line(e), hint), file=sys.stderr,
                  flush=True)  # fmt: skip
            sys.stdout.flush()
            os._exit(EXIT_PEER_FAILED)

    return guarded_body


# ----------------------------------------------------------------------------- the mesh


def limit_devices(data: int) -> None:
    """A command's `--mesh-data N`: the default device count of `make_mesh` and `local_mesh`
    for this process (0: every device), for the library code the command calls.

    Raises:
        MeshError: a negative count.
    """
    if data < 0:
        raise MeshError("--mesh-data", f"must be >= 0 (0: all devices), got {data}")
    _DEVICE_LIMIT["data"] = data


def make_mesh(data: int = 0) -> Mesh:
    """The device mesh with one `data` axis over `data` devices (0: every device of every process).

    Raises:
        MeshError: more devices than exist, or a multi-process run that leaves a process out.
    """
    devices = jax.devices()
    if data < 0:
        raise MeshError("mesh.data", f"must be >= 0 (0: all devices), got {data}")
    n = data or _DEVICE_LIMIT["data"] or len(devices)
    if n > len(devices):
        raise MeshError("mesh.data", f"{n} devices asked for, {len(devices)} exist")
    if jax.process_count() > 1 and n != len(devices):
        raise MeshError(
            "mesh.data",
            f"{n} of {len(devices)} devices: a run of {jax.process_count()} processes uses every "
            "device (set 0)",
        )
    return Mesh(np.asarray(devices[:n]), (DATA,))


def local_mesh(data: int = 0) -> Mesh:
    """A mesh over this process's own devices only (0: all of them), for per-process work."""
    devices = jax.local_devices()
    n = min(data or _DEVICE_LIMIT["data"] or len(devices), len(devices))
    return Mesh(np.asarray(devices[:n]), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicated_outputs(mesh: Mesh | None) -> dict:
    """`jax.jit` keyword arguments of a step over `mesh`: every output replicated, so the next
    call's inputs have the same layout (one compile). None (one device): none."""
    return {} if mesh is None else {"out_shardings": replicated(mesh)}


def data_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    """Axis `axis` of an `ndim`-dimensional array split over the data axis."""
    spec = [None] * ndim
    spec[axis] = DATA
    return NamedSharding(mesh, P(*spec))


def check_divides(what: str, size: int, mesh: Mesh) -> None:
    """Raises MeshError when a global batch of `size` examples does not split evenly."""
    n = mesh.devices.size
    if size % n:
        raise MeshError(
            what, f"{size} does not divide over the {n} devices of the mesh (set mesh.data)"
        )


def _global(x, sharding: NamedSharding) -> jax.Array:
    """The global array `x` (the same host value on every process) laid out as `sharding`."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_global(jax.random.key_data(x), sharding))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree: T, mesh: Mesh) -> T:
    """Every leaf (host or device arrays, PRNG keys) copied onto every device of `mesh`."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: _global(x, sharding), tree)


def shard_batch(tree: T, mesh: Mesh, axis: int = 0, replicate_keys: Sequence[str] = ()) -> T:
    """A global batch with axis `axis` of every leaf split over the mesh's data axis.

    Args:
        tree: the batch (a dict of host arrays, the same on every process), e.g. (B, ...) leaves
            for a step, or (n_batches, B, ...) with `axis=1` for stacked epoch data.
        mesh: the mesh (`make_mesh`).
        axis: the per-example axis.
        replicate_keys: top-level keys of a dict `tree` whose leaves are replicated instead
            (arrays indexed by the examples, e.g. SUM's per-image embeddings).

    Raises:
        MeshError: a leaf whose `axis` does not divide over the mesh's devices.
    """

    def put(path, x):
        top = path[0].key if path and isinstance(path[0], jax.tree_util.DictKey) else None
        if top in replicate_keys:
            return _global(x, replicated(mesh))
        shape = np.shape(x)
        name = "/".join(str(getattr(k, "key", k)) for k in path) or "batch"
        check_divides(f"batch {name} axis {axis}", shape[axis], mesh)
        return _global(x, data_sharding(mesh, len(shape), axis))

    return jax.tree_util.tree_map_with_path(put, tree)


def to_host(tree: T) -> T:
    """Host NumPy copies of replicated (or single-device) arrays: a state that jitted code on one
    process can use without the others (export, evaluation, plots)."""

    def get(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(get(jax.random.key_data(x)))
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.array(x.addressable_data(0), copy=True)
        return np.array(x, copy=True)

    return jax.tree.map(get, tree)
