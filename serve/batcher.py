"""The step scheduler: requests join and leave the running batch at step boundaries.

One worker thread per engine keeps a running set of slots (engine.slots), up to max_batch
images, and advances all of them by one model evaluation per tick, whatever their prompt, seed,
steps, sampler, guidance, rescale, eta or CFG. Between ticks finished images leave (decoded, and
their request answered once all its images are done) and waiting requests join in arrival
order: the oldest waiting request joins as soon as its images fit, and nothing behind it jumps
ahead, so none starves. Every image equals the same request run alone through Engine.run (up to
the rounding of batch-size-dependent BLAS kernels): each slot keeps its own plan, noise and
sampler state.

Admission policies: "step" (the above) and "request" (whole-request batching: requests join only
an empty running set, together with the waiting requests whose BatchKey equals the oldest's).
Progress, interrupt, skip, disconnects and non-finite latents take effect only at step
boundaries, on the host, so nothing reaches into a step. Every other use of the engine runs on
the same thread (`call`), between ticks.
"""
import collections
import concurrent.futures
import contextlib
import dataclasses
import math
import threading
import time
from dataclasses import dataclass

from lumen.engine import LumenError, slots
from lumen.engine.graphs import GraphCache

from .jobs import INTERRUPTED, DroppedError, Interrupted, Job, ModelError, QueueFullError, prepare

POLICIES = ("step", "request")
STEP_GRAPHS = 32  # step graphs kept: buckets x (CFG, no CFG) x sizes in use


@dataclass
class Progress:
    """What the worker is doing, for A1111's GET /sdapi/v1/progress (a copy, read under the lock).

    step/steps: the oldest running request's; preview: its first image's current x0 estimate
    (decoded, with --preview-every), else None."""

    steps: int = 0  # 0 when idle
    step: int = 0
    started: float = 0.0  # time.monotonic() of that request's first step
    job_no: int = 0  # requests started so far
    interrupted: bool = False  # an interrupt since the oldest running request started
    skipped: bool = False
    preview: object = None


class Batcher:
    """The queue, the running slots and the one thread that steps them (see the module doc)."""

    def __init__(self, engine, max_batch: int = 8, batch_wait_ms: float = 10.0, max_queue: int = 64,
                 timeout_s: float = 300.0, on_batch=None, output_type: str = "pil",
                 policy: str = "step", preview_every: int = 0, on_admit=None, step_graphs=None):
        if policy not in POLICIES:
            raise ValueError(f"batching={policy!r}; expected one of {', '.join(POLICIES)}")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.output_type = output_type  # Engine.run's: PIL images, or "pt"/"np"/"latent" arrays
        self.batch_wait, self.timeout_s, self.policy = batch_wait_ms / 1000, timeout_s, policy
        self.preview_every = preview_every  # decode a preview every N steps (0: never)
        self.on_batch = on_batch  # on_batch(images, seconds) after each UNet call, for metrics
        self.on_admit = on_admit  # on_admit(seconds from arrival to first step)
        # Step graphs (engine.step_graphs) when the engine replays CUDA graphs: one capture per
        # bucket and size. A GraphCache passed in (a test's) is used whatever the engine says.
        if step_graphs is None and getattr(engine, "cuda_graph", False):
            step_graphs = GraphCache(STEP_GRAPHS)
        self.step_graphs = step_graphs
        self.batches = self.images = 0  # UNet calls, and images summed over them
        self.ticks = 0  # step boundaries passed
        self._queue: collections.deque[Job] = collections.deque()
        self._running: list[slots.Slot] = []
        self._calls: collections.deque = collections.deque()  # (fn, future), run between ticks
        self._cond = threading.Condition()
        self._stopping = False
        self._stop_running: str | None = None  # "interrupted" / "skipped" at the next boundary
        self._last_job_s = 1.0
        self._progress = Progress()
        self._oldest: Job | None = None  # the request self._progress describes
        self._requests = 0  # admitted and not yet answered (A1111's job_count)
        self._epoch = 0  # interrupts so far: a request admitted before one is cancelled
        self._thread = threading.Thread(target=self._work, name="lumen-scheduler", daemon=True)
        self._thread.start()

    @property
    def waiting_images(self) -> int:
        with self._cond:
            return sum(job.n for job in self._queue)

    @property
    def running_images(self) -> int:
        with self._cond:
            return len(self._running)

    @property
    def alive(self) -> bool:
        """The worker thread runs (it ends only after stop())."""
        return self._thread.is_alive()

    @property
    def mean_batch_size(self) -> float:
        """Images per UNet call."""
        return self.images / self.batches if self.batches else 0.0

    @contextlib.contextmanager
    def admitted(self):
        """A request's time in the server; yields the interrupt epoch it arrived in."""
        with self._cond:
            self._requests += 1
            epoch = self._epoch
        try:
            yield epoch
        finally:
            with self._cond:
                self._requests -= 1

    def submit(self, job: Job, epoch: int | None = None) -> concurrent.futures.Future:
        """Queue a job; raises QueueFullError past max_queue waiting images or when stopping, and
        Interrupted when an interrupt came after its request's epoch."""
        if job.n > self.max_batch:
            raise ValueError(f"a request of {job.n} images; max_batch={self.max_batch}")
        with self._cond:
            if epoch is not None and epoch != self._epoch:
                raise Interrupted(INTERRUPTED)
            waiting = sum(j.n for j in self._queue)
            if self._stopping or waiting + job.n > self.max_queue:
                ahead = math.ceil((waiting + job.n) / self.max_batch)
                raise QueueFullError(f"{waiting} images are waiting (max_queue={self.max_queue})",
                                     max(1, math.ceil(ahead * self._last_job_s)))
            self._queue.append(job)
            self._cond.notify_all()
        return job.future

    def progress(self) -> tuple[Progress, int]:
        """A copy of the oldest running request's progress, and the requests not yet answered."""
        with self._cond:
            return dataclasses.replace(self._progress), self._requests

    def interrupt(self) -> None:
        """Stop every request admitted so far: waiting ones fail with Interrupted (now, or when
        they submit), running ones are answered with their current x0 estimates at the next
        step boundary."""
        with self._cond:
            self._epoch += 1
            stopped = bool(self._queue or self._running or self._requests)
            while self._queue:
                job = self._queue.popleft()
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(Interrupted(INTERRUPTED))
            if self._running:
                self._stop_running = "interrupted"
            self._progress.interrupted |= stopped

    def skip(self) -> None:
        """Answer the running requests with their current x0 estimates at the next boundary."""
        with self._cond:
            if self._running:
                self._progress.skipped = True
                self._stop_running = self._stop_running or "skipped"

    def call(self, fn) -> concurrent.futures.Future:
        """Run fn() on the worker thread, between two ticks.

        All the engine's torch work belongs on this one thread: with OpenMP, torch ops on a
        second live thread that already ran parallel regions slow each other down (measured
        2.5x on the built-in model, 2 CPU cores).
        """
        future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is stopping", 1)
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the queued and running ones, end the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -----------------------------------------------------------------------------------------
    # The worker

    def _work(self) -> None:
        while True:
            joining = self._wait_for_work()
            if joining is None:
                return
            self._run_calls()
            for job in joining:
                self._join(job)
            if self._running:
                self._tick()
                self.ticks += 1
            self._boundary()

    def _wait_for_work(self) -> list[Job] | None:
        """The jobs that join before the next tick (maybe none); None when stopped and idle."""
        with self._cond:
            while True:
                self._drop_stale()
                if self._calls or self._running:
                    return self._take(self._admissible())
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                # Idle: the oldest request waits up to batch_wait for company on its first step.
                jobs = self._admissible()
                remaining = self._queue[0].created + self.batch_wait - time.monotonic()
                if remaining <= 0 or sum(j.n for j in jobs) >= self.max_batch or self._stopping:
                    return self._take(jobs)
                self._cond.wait(remaining)

    def _admissible(self) -> list[Job]:
        """Waiting jobs that may join now, oldest first, under the admission policy."""
        if self.policy == "request":
            if self._running or not self._queue:
                return []
            head = self._queue[0]
            candidates = [j for j in self._queue if j.key == head.key]
        else:
            candidates = list(self._queue)
        room, jobs = self.max_batch - len(self._running), []
        for job in candidates:
            if job.n > room:
                break  # arrival order: nothing overtakes the oldest waiting request
            jobs.append(job)
            room -= job.n
        return jobs

    def _take(self, jobs: list[Job]) -> list[Job]:
        taken = []
        for job in jobs:
            self._queue.remove(job)
            if job.future.set_running_or_notify_cancel():
                taken.append(job)
        return taken

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as err:  # noqa: BLE001 - the caller gets it
                    future.set_exception(err)

    def _join(self, job: Job) -> None:
        """Prepare the job's slots and add them to the running set (its own errors fail it alone)."""
        try:
            request = job.request if job.request is not None else prepare(self.engine, job)
            new = slots.split(self.engine, request, owner=job)
        except (LumenError, ValueError, TypeError) as err:
            job.future.set_exception(err)
            return
        except Exception as err:  # noqa: BLE001 - out of memory and other model failures
            job.future.set_exception(ModelError(f"{type(err).__name__}: {err}"))
            return
        job.request, job.parts, job.started, job.joined = None, new, time.monotonic(), self.ticks
        if self.on_admit is not None:
            self.on_admit(job.started - job.created)
        with self._cond:
            self._running += new
            self._progress.job_no += 1

    def _tick(self) -> None:
        step = {id(s): s.i + 1 for s in self._running}  # 1-based: the step this tick works on
        try:
            finite = slots.tick(self.engine, self._running, self._record, self.step_graphs)
        except Exception as err:  # noqa: BLE001 - out of memory, a runtime error in the model
            failure = ModelError(f"{type(err).__name__}: {err}")
            for job in self._jobs(self._running):
                self._fail(job, failure)
            return
        for slot, ok in zip(list(self._running), finite):
            if not ok and slot in self._running:
                self._fail(slot.owner, ModelError(
                    f"NonFiniteOutputError: NaN or inf in the x0 estimate in step {step[id(slot)]} of "
                    f"{slot.steps}, computed in {str(self.engine.dtype).removeprefix('torch.')}"))

    def _boundary(self) -> None:
        """Between ticks: dropped, finished and stopped jobs leave; progress is updated."""
        with self._cond:
            stop, self._stop_running = self._stop_running, None
        for job in self._jobs(self._running):
            if job.dropped:
                self._fail(job, DroppedError("the client left while its request ran"))
            elif stop is not None:
                job.stopped = stop
                self._answer(job, final=False)
            elif all(s.done for s in job.parts):
                self._answer(job, final=True)
        self._update_progress()

    def _jobs(self, running: list[slots.Slot]) -> list[Job]:
        return list(dict.fromkeys(s.owner for s in running))

    def _remove(self, job: Job) -> list[slots.Slot]:
        """Takes the job's slots out of the running batch and out of the job: a job that left
        holds its answer only, not its latents, text rows or DeepCache features."""
        with self._cond:
            self._running = [s for s in self._running if s.owner is not job]
        parts, job.parts = job.parts, []
        return parts

    def _fail(self, job: Job, err: Exception) -> None:
        self._remove(job)
        if not job.future.done():
            job.future.set_exception(err)

    def _answer(self, job: Job, final: bool) -> None:
        parts = self._remove(job)
        try:
            images = slots.finish(self.engine, parts, self.output_type, final)
        except Exception as err:  # noqa: BLE001 - non-finite latents or a VAE failure
            job.future.set_exception(ModelError(f"{type(err).__name__}: {err}"))
            return
        self._last_job_s = time.monotonic() - job.started
        job.future.set_result(images)

    def _update_progress(self) -> None:
        with self._cond:
            if not self._running:
                self._progress.steps = self._progress.step = 0  # idle
                self._progress.preview, self._oldest = None, None
                return
            oldest = self._running[0]
            if oldest.owner is not self._oldest:  # a new oldest request: progress starts over
                self._oldest = oldest.owner
                self._progress = Progress(oldest.steps, 0, oldest.owner.started,
                                          self._progress.job_no)
            self._progress.step = oldest.i
        every = self.preview_every
        if every and oldest.i > 0 and oldest.i % every == 0:
            try:
                preview = slots.finish(self.engine, [oldest], "pil", final=False)[0]
            except Exception:  # noqa: BLE001 - a preview never fails a request
                preview = None
            with self._cond:
                self._progress.preview = preview

    def _drop_stale(self) -> None:
        """Jobs whose client left, or that waited past timeout_s, leave the queue unrun."""
        now = time.monotonic()
        for job in list(self._queue):
            if job.future.cancelled():
                self._queue.remove(job)
            elif now - job.created > self.timeout_s:
                self._queue.remove(job)
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(TimeoutError(
                        f"request waited {now - job.created:.1f} s; timeout_s={self.timeout_s}"))

    def _record(self, images: int, seconds: float) -> None:
        self.batches += 1
        self.images += images
        if self.on_batch is not None:
            self.on_batch(images, seconds)
