"""Model actors kept for a whole refresh: each distinct model starts once, however many extractors or steps use it.

    with model_pool():
        run_extraction(ws, "text", text_spec(None), source="text")                  # starts the MiniLM actor
        run_extraction(ws, "caption_text", text_spec(None), source="caption")       # reuses it

Inside the block, `run_extraction` with the Ray engine sends its batches to the pool's actors instead of starting
an actor pool of its own. An actor builds each extractor it is asked for once (`ExtractorSpec.build`) and keeps it.
On leaving the block the actors are killed, also when the block raised.

On GPUs actors are keyed by the model they hold (`model_key`: the model family, id, weights and device), so CLIP's
image and text towers share one actor, `text` and `caption_text` share MiniLM's; each holds its GPU, and an idle
actor of another model is killed (least recently used) when a model needs a GPU that is taken. On CPUs the actors
are slots that keep every model they were given: a process start and a torch import cost more there than the
models themselves (tiny or MiniLM-sized), so a refresh pays one start per slot. CPU actors claim no CPU while idle
(the driver keeps at most two batches in flight per actor, so a step never runs more actors than it was sized for).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from stores.errors import TransientError

# Extractor classes whose instances of one model id share an actor (the towers of one CLIP checkpoint).
_FAMILIES = {"ClipImageEncoder": "clip", "ClipTextEncoder": "clip"}
CPU_SLOTS = ("cpu",)  # the key of the CPU actors, which keep every model they are given
_IN_FLIGHT = 2  # batches queued per actor: one running, one ready, so the actor never waits on the driver


def model_key(spec: Any) -> tuple:
    """The identity of the model a spec loads: (family, model, weights, device, other settings). Two specs with
    the same key are served by the same actors."""
    kwargs = dict(spec.kwargs)
    family = _FAMILIES.get(spec.name, spec.path)
    head = (kwargs.pop("model", None), kwargs.pop("pretrained", None), kwargs.pop("device", None))
    if family == "clip":  # the towers' other arguments (batch size, column names) do not change the model
        kwargs = {}
    return (family, *head, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))


def slot_threads(cpus: int) -> int:
    """Torch threads of a CPU slot actor on a cluster of `cpus` CPUs: the CPUs over the actors a step runs by
    default (one fewer than the CPUs, at least one; runner._default_actors), so that the CPUs a step's actors do
    not take are used: on 2 CPUs the one actor gets both (the driver mostly waits on it); on more, one each."""
    cpus = max(1, cpus)
    return max(1, cpus // max(1, cpus - 1))


def cpu_threads() -> int:
    """`slot_threads` of the Ray cluster this driver is connected to."""
    import ray

    return slot_threads(int(ray.cluster_resources().get("CPU", 1)))


def spec_id(spec: Any) -> tuple:
    """A hashable identity of one extractor spec (its class's "module:Class" and arguments)."""
    return spec.path, tuple(sorted((k, repr(v)) for k, v in spec.kwargs.items()))


class ModelActor:
    """One Ray actor: the extractors of one model, each built once on first use, and the `ModelStage`s that
    apply them (one per feature's source, fields and provenance check).

    It serves two calls at a time (`max_concurrency=2`): a model being built ahead of its use (`warm`) does not
    hold up a step whose model is ready. Builds still run one at a time (`building`: they are import-bound and
    two would only share the interpreter lock), as do batches (`running`), on the torch threads the actor was
    given. With more than one thread, OpenMP's workers sleep rather than spin while they wait (unless
    $OMP_WAIT_POLICY says otherwise): on a 2-core machine, beside one busy process, two spinning threads made
    MiniLM 1.4x slower than one thread, two sleeping ones 1.05x, and with nothing else running they took 0.55x
    its time (bench/threads.py)."""

    def __init__(self, threads: int | None) -> None:
        if threads:
            if threads > 1:  # read when torch loads OpenMP: an actor's fresh process has not imported it yet
                os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            import torch

            torch.set_num_threads(threads)
        self.models: dict[Any, Any] = {}
        self.stages: dict[tuple, Any] = {}
        self.guard = threading.Lock()
        self.built_event: dict[Any, threading.Event] = {}  # set when a model's build ends (built or failed)
        self.building = threading.Lock()
        self.running = threading.Lock()

    def model(self, spec: Any) -> Any:
        """`spec`'s model, built once; a call for a model another call is building waits for that build only."""
        key = spec_id(spec)
        while key not in self.models:
            with self.guard:
                done = self.built_event.get(key)
                mine = done is None
                if mine:
                    done = self.built_event[key] = threading.Event()
            if not mine:
                done.wait()  # built, or failed: then the loop tries again (a failed build is not kept)
                continue
            try:
                with self.building:
                    self.models[key] = spec.build()
            except BaseException:
                with self.guard:
                    del self.built_event[key]
                raise
            finally:
                done.set()
        return self.models[key]

    def built(self) -> list[str]:
        """The extractor classes this actor has built (each once), for reports and tests."""
        return [path.rsplit(":", 1)[-1] for path, _ in self.models]

    def facts(self, spec: Any) -> tuple[dict[str, Any], dict[str, Any] | None, frozenset[str]]:
        """The provenance the model reports here, its image preprocessing config and its class's traits
        (runner.ExtractorSpec.traits): the driver's probe, so the driver imports no model library."""
        model = self.model(spec)
        return dict(model.provenance), getattr(model, "preprocess_cfg", None), spec.traits()

    def run(self, spec: Any, stage: Callable[..., Any], batch: dict[str, Any]) -> dict[str, Any]:
        """`stage(model=...)` wraps the built model for one feature (runner.ModelStage); kept per feature."""
        key = (spec_id(spec), repr(stage))
        model = self.model(spec)
        with self.running:
            if key not in self.stages:
                self.stages[key] = stage(model=model)
            return self.stages[key](batch)

    def warm(self, specs: list[Any]) -> list[str]:
        """Build `specs`' models, in order, ahead of their first batches (one call, so that the actor's second
        thread stays free for the steps); failures are returned, not raised (the extraction's own `facts` call
        meets them again and reports them)."""
        failures = []
        for spec in specs:
            try:
                self.model(spec)
            except Exception as exc:
                failures.append(f"{spec.name}: {type(exc).__name__}: {exc}")
        return failures

    def pid(self) -> int:
        return os.getpid()


@dataclass
class ModelPool:
    """The actors of one refresh, by `model_key`, in least-recently-used order."""

    actors: dict[tuple, list[Any]] = field(default_factory=dict)
    starts: dict[tuple, int] = field(default_factory=dict)  # actors started per model, for reports and tests
    warmed: list[tuple] = field(default_factory=list)  # specs whose models `warm` asked an actor to build
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handles(self, spec: Any, count: int, use_gpu: bool, threads: int | None) -> list[Any]:
        """`count` actors for `spec`'s model: those already up, plus new ones (on a GPU cluster after killing
        idle actors of other models that hold the GPUs needed)."""
        import ray

        key = model_key(spec) if use_gpu else CPU_SLOTS
        with self.lock:
            have = self.actors.pop(key, [])
            self.actors[key] = have  # most recently used last
            if len(have) < count and use_gpu:
                self._free_gpus(count - len(have), keep=key)
            options: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0, "max_concurrency": 2}
            options |= {"num_gpus": 1} if use_gpu else {"scheduling_strategy": "SPREAD"}
            if len(have) < count and not use_gpu and threads is None:
                threads = cpu_threads()  # asked of the cluster only when an actor starts
            while len(have) < count:
                actor = ray.remote(ModelActor).options(**options).remote(None if use_gpu else threads)
                have.append(actor)
                self.starts[key] = self.starts.get(key, 0) + 1
            return have[:count]

    def warm(self, specs: list[Any], address: str | None = None) -> None:
        """Start Ray and build `specs`' models on the actor each extraction asks first, in the background
        (extractors/ray_start.py `in_background`), so that a refresh's ingest and forget overlap Ray's start,
        the actor's process start and the model loads. On CPUs one slot actor builds them all, in this order
        (the order of the refresh's extractions); on a GPU cluster only the first model is built, since the
        next would take its GPU. Returns at once; `run` and `facts` wait for the start (`init_ray` settles it)
        and for their own model's build, not for the builds queued after it (ModelActor serves two calls at a
        time)."""
        from extractors.ray_start import connect_ray, in_background, start_ray

        def start() -> None:
            connect_ray(address)
            use_gpu = start_ray()
            wanted = specs[:1] if use_gpu else specs
            self.handles(wanted[0], 1, use_gpu, None)[0].warm.remote(wanted)
            self.warmed += [spec_id(spec) for spec in wanted]

        if specs:
            in_background(start)

    def _free_gpus(self, needed: int, keep: tuple) -> None:
        import ray

        free = int(ray.available_resources().get("GPU", 0))
        for key in [k for k in self.actors if k != keep]:  # least recently used first
            while free < needed and self.actors[key]:
                ray.kill(self.actors[key].pop())
                free += 1
            if not self.actors[key]:
                del self.actors[key]

    def facts(
        self, spec: Any, use_gpu: bool, threads: int | None
    ) -> tuple[dict[str, Any], Any, frozenset[str]]:
        import ray

        return ray.get(self.handles(spec, 1, use_gpu, threads)[0].facts.remote(spec))

    def run(
        self,
        spec: Any,
        stage: Callable[..., Any],
        inputs: Iterable[Any],
        count: int,
        use_gpu: bool,
        threads: int | None,
    ) -> Iterator[dict[str, Any]]:
        """Apply the model to each input (a batch or the ObjectRef of one) on `count` actors, round robin, with a
        bounded number in flight; results come back in input order."""

        actors = self.handles(spec, count, use_gpu, threads)
        pending: list[Any] = []
        for i, batch in enumerate(inputs):
            pending.append(actors[i % len(actors)].run.remote(spec, stage, batch))
            if len(pending) >= _IN_FLIGHT * len(actors):
                yield _get(pending.pop(0))
        while pending:
            yield _get(pending.pop(0))

    def built(self) -> dict[tuple, list[list[str]]]:
        """For each model key, the extractor classes each of its live actors has built."""
        import ray

        with self.lock:
            live = {key: list(handles) for key, handles in self.actors.items()}
        return {key: ray.get([a.built.remote() for a in handles]) for key, handles in live.items()}

    def forget(self) -> None:
        """Drop the handles without killing (the Ray session they lived in is gone)."""
        with self.lock:
            self.actors.clear()

    def close(self) -> None:
        import ray

        from extractors.ray_start import settle

        settle()  # a warm-up still starting actors would leave them behind
        with self.lock:
            if ray.is_initialized():
                for handles in self.actors.values():
                    for actor in handles:
                        ray.kill(actor)
            self.actors.clear()


def _get(ref: Any) -> Any:
    """`ray.get`, where a SystemError out of Ray's object fetch (seen when a node dies holding a batch's input)
    is a lost result: transient, like Ray's own lost-object errors (extractors/ray_session.py)."""
    import ray

    try:
        return ray.get(ref)
    except SystemError as exc:
        raise TransientError(f"Ray could not return a model batch ({exc}); retrying") from exc


_active: ModelPool | None = None
_guard = threading.Lock()


def active_pool() -> ModelPool | None:
    """The pool of the refresh running in this process, if any (the flow's tasks may run in other threads)."""
    return _active


@contextmanager
def model_pool() -> Iterator[ModelPool]:
    """Keep model actors for the block's extractions; kill them on leaving it, also on an error. Nested blocks
    share the outer pool."""
    global _active
    with _guard:
        outer = _active
        if outer is None:
            _active = ModelPool()
        pool = _active
    if outer is not None:
        yield outer
        return
    try:
        yield pool
    finally:
        with _guard:
            _active = None
        pool.close()
