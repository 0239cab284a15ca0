"""Dynamic batching: compatible requests that arrive within a short wait run as one Engine.run.

Requests are compatible when they agree on everything that shapes the sampling loop (BatchKey):
image size, steps, the SamplerConfig (sampler, spacing, churn), guidance scale (so CFG on/off),
rescale and eta. Prompts, negative prompts and seeds may differ: every image draws its noise
from its own generator, so it equals the image of the same request served alone (up to the
fp32 rounding of batch-size-dependent BLAS kernels). One worker thread per engine runs the
batches one after another, and every other use of the engine (`call`); each request gets its
images back through its own future, never by its position in a queue. For A1111's controls the
batcher also keeps the running batch's progress (from Engine.run's step callback), counts the
requests in flight, and cancels those that have not started on interrupt.
"""
import collections
import concurrent.futures
import contextlib
import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field

import torch

from lumen.engine import SamplerConfig


class QueueFullError(Exception):
    """Admission refused: too many images are waiting; retry_after is a guess in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ModelError(Exception):
    """The model failed on a batch (out of memory, a runtime error); the server keeps serving."""


class DroppedError(Exception):
    """The request left before its batch started (client gone or server stopping)."""


class Interrupted(Exception):
    """POST /sdapi/v1/interrupt cancelled the request while it waited for its batch."""


INTERRUPTED = "interrupted by POST /sdapi/v1/interrupt before its batch started"


@dataclass(frozen=True)
class BatchKey:
    """What shapes the loop: requests with equal keys can share one Engine.run."""

    height: int
    width: int
    steps: int
    config: SamplerConfig  # sampler, spacing and churn
    guidance_scale: float  # 1 means CFG off
    guidance_rescale: float
    eta: float
    clip_skip: int | None = None  # text-encoder layers skipped (A1111's CLIP_stop_at_last_layers - 1)

    @property
    def cfg(self) -> bool:
        return self.guidance_scale != 1


@dataclass(eq=False)
class Job:
    """One request: its images' prompts and seeds, and the future its images come back on."""

    key: BatchKey
    prompts: tuple[str, ...]  # one per image
    negative_prompts: tuple[str, ...]  # one per image
    seeds: tuple[int, ...]  # one per image
    created: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def __post_init__(self):
        assert len(self.prompts) == len(self.negative_prompts) == len(self.seeds) > 0

    @property
    def n(self) -> int:
        return len(self.seeds)

    def cancel(self) -> None:
        """Drop the job unless its batch already started (then its result is discarded)."""
        self.future.cancel()


def run_batch(engine, key: BatchKey, jobs: list[Job], output_type: str = "pil",
              callback=None) -> list:
    """One Engine.run for all the jobs' images, in job order; image i uses seed i's generator.

    callback(i), if given, is Engine.run's: called on the host after step i."""
    prompts = [p for job in jobs for p in job.prompts]
    negatives = [p for job in jobs for p in job.negative_prompts]
    generators = [torch.Generator().manual_seed(s) for job in jobs for s in job.seeds]
    return engine.with_config(key.config).run(
        prompt=prompts, negative_prompt=negatives if key.cfg else None, generator=generators,
        num_inference_steps=key.steps, guidance_scale=key.guidance_scale,
        guidance_rescale=key.guidance_rescale, eta=key.eta, height=key.height, width=key.width,
        clip_skip=key.clip_skip, output_type=output_type, callback=callback).images


@dataclass
class Progress:
    """What the worker is doing, for A1111's GET /sdapi/v1/progress (read under the lock)."""

    steps: int = 0  # of the running batch; 0 when idle
    step: int = 0  # steps done
    started: float = 0.0  # time.monotonic() when the running batch started
    batch_no: int = 0  # batches started so far
    interrupted: bool = False  # an interrupt since the running (or last) batch started
    skipped: bool = False


class Batcher:
    """A queue of jobs and the one thread that runs them in batches of up to max_batch images."""

    def __init__(self, engine, max_batch: int = 8, batch_wait_ms: float = 10.0, max_queue: int = 64,
                 timeout_s: float = 300.0, on_batch=None, output_type: str = "pil"):
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.output_type = output_type  # Engine.run's: PIL images, or "pt"/"np"/"latent" arrays
        self.batch_wait, self.timeout_s = batch_wait_ms / 1000, timeout_s
        self.on_batch = on_batch  # on_batch(images, seconds) after each batch, for metrics
        self.batches = self.images = 0
        self._queue: collections.deque[Job] = collections.deque()
        self._calls: collections.deque = collections.deque()  # (fn, future), run before batches
        self._cond = threading.Condition()
        self._stopping = False
        self._last_batch_s = 1.0
        self._progress = Progress()
        self._requests = 0  # admitted and not yet answered (A1111's job_count)
        self._epoch = 0  # interrupts so far: a request admitted before one is cancelled
        self._thread = threading.Thread(target=self._work, name="lumen-batcher", daemon=True)
        self._thread.start()

    @property
    def waiting_images(self) -> int:
        with self._cond:
            return sum(job.n for job in self._queue)

    @property
    def alive(self) -> bool:
        """The worker thread runs (it ends only after stop())."""
        return self._thread.is_alive()

    @property
    def mean_batch_size(self) -> float:
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
        with self._cond:
            if epoch is not None and epoch != self._epoch:
                raise Interrupted(INTERRUPTED)
            waiting = sum(j.n for j in self._queue)
            if self._stopping or waiting + job.n > self.max_queue:
                batches_ahead = math.ceil((waiting + job.n) / self.max_batch)
                raise QueueFullError(f"{waiting} images are waiting (max_queue={self.max_queue})",
                                     max(1, math.ceil(batches_ahead * self._last_batch_s)))
            self._queue.append(job)
            self._cond.notify_all()
        return job.future

    def progress(self) -> tuple[Progress, int]:
        """A copy of the running batch's progress, and the requests admitted and not answered."""
        with self._cond:
            return dataclasses.replace(self._progress), self._requests

    def interrupt(self) -> None:
        """Cancel every request admitted so far that has not started (each fails with
        Interrupted: queued jobs now, the others when they submit); the running batch completes."""
        with self._cond:
            self._progress.interrupted = True
            self._epoch += 1
            while self._queue:
                job = self._queue.popleft()
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(Interrupted(INTERRUPTED))

    def skip(self) -> None:
        """Marks the running batch skipped; it completes (a batch runs as one Engine.run)."""
        with self._cond:
            self._progress.skipped = True

    def call(self, fn) -> concurrent.futures.Future:
        """Run fn() on the worker thread, ahead of the next batch.

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

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run_calls()
            self._run(batch)

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

    def _next_batch(self) -> list[Job] | None:
        """The oldest job plus the compatible jobs behind it, once its wait is over or it is full."""
        with self._cond:
            while True:
                self._drop_stale()
                if self._calls:
                    return []  # run the calls first, then come back for a batch
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                head = self._queue[0]
                batch = [j for j in self._queue if j.key == head.key]
                images = self._fit(batch)
                remaining = head.created + self.batch_wait - time.monotonic()
                if remaining <= 0 or images >= self.max_batch or self._stopping:
                    break
                self._cond.wait(remaining)
            return self._take(batch)

    def _fit(self, candidates: list[Job]) -> int:
        total = 0
        for job in candidates:
            if total + job.n > self.max_batch:
                break
            total += job.n
        return total

    def _take(self, candidates: list[Job]) -> list[Job]:
        """Remove the jobs that fit in one batch (FIFO), marking their futures as running."""
        batch, total = [], 0
        for job in candidates:
            if total + job.n > self.max_batch:
                break
            self._queue.remove(job)
            if job.future.set_running_or_notify_cancel():
                batch.append(job)
                total += job.n
        return batch

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

    def _on_step(self, i: int) -> None:
        with self._cond:
            self._progress.step = i + 1

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        with self._cond:
            self._progress = Progress(batch[0].key.steps, 0, time.monotonic(),
                                      self._progress.batch_no + 1)
        try:
            self._run_batch(batch)
        finally:
            with self._cond:
                self._progress.steps = self._progress.step = 0  # idle

    def _run_batch(self, batch: list[Job]) -> None:
        start = time.perf_counter()
        try:
            images = run_batch(self.engine, batch[0].key, batch, self.output_type, self._on_step)
        except (ValueError, TypeError) as err:  # engine's InvalidInput/InvalidTypeError
            if len(batch) > 1:  # one request's input is at fault: serve each alone to tell which
                for job in batch:
                    self._run([job])  # sets the job's own result or error
                return
            batch[0].future.set_exception(err)
            return
        except Exception as err:  # noqa: BLE001 - out of memory, non-finite output, a model failure
            failure = ModelError(f"{type(err).__name__}: {err}")
            for job in batch:
                job.future.set_exception(failure)
            return
        seconds = time.perf_counter() - start
        self._record(len(images), seconds)
        offset = 0
        for job in batch:
            job.future.set_result(images[offset:offset + job.n])
            offset += job.n

    def _record(self, images: int, seconds: float) -> None:
        self.batches += 1
        self.images += images
        self._last_batch_s = seconds
        if self.on_batch is not None:
            self.on_batch(images, seconds)
