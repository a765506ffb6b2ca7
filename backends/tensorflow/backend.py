"""TensorFlow backend: micro-batching with one GradientTape per micro-batch, behind the common trial interface.

:class:`MicroBatchTrainer` compiles two ``tf.function``\\ s once: ``accumulate`` runs
one micro-batch under its own ``GradientTape`` and adds its gradients, weighted by the
micro-batch's share of the window's samples, into non-trainable ``tf.Variable``
accumulators; ``apply`` steps the optimizer once per window and zeroes them. Only
one micro-batch's activations are alive at a time, which is what saves memory (one
tape around all micro-batches would keep every activation until the end). The batch
dimension of the traced signature is ``None``, so a short last micro-batch runs the
same graph: no retrace, no padding.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Callable, Iterable, Sequence

import numpy as np


def _tensorflow_log_level(level: str) -> str:
    """TensorFlow's C++ log level: errors only, or warnings too inside a memory-capped process.

    Under ``RLIMIT_DATA`` (a budgeted trial worker on the CPU) an allocation failure in
    a oneDNN convolution crashes TensorFlow 2.21 with SIGSEGV right after it logs the
    warning "OOM when allocating tensor"; that line, in the worker's log, is then the
    only evidence the worker has that the trial ran out of memory.
    """
    try:
        import resource

        soft_limit, _ = resource.getrlimit(resource.RLIMIT_DATA)
        capped = soft_limit != resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):
        capped = False
    return str(min(int(level), 1)) if capped and level.isdigit() else level


@contextlib.contextmanager
def _stderr_silenced(enabled: bool = True):
    """Send file descriptor 2 to /dev/null for a while.

    TensorFlow 2.21's C++ start-up notices (oneDNN, absl's "before InitializeLog")
    ignore ``TF_CPP_MIN_LOG_LEVEL`` and would reach the user's terminal. A Python
    exception raised inside is printed later, after the descriptor is restored.
    """
    if not enabled:
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_REQUESTED_LOG_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["TF_CPP_MIN_LOG_LEVEL"] = _tensorflow_log_level(_REQUESTED_LOG_LEVEL)
if "keras" not in sys.modules:  # Keras picks its backend once, at import; this one needs TensorFlow
    os.environ["KERAS_BACKEND"] = "tensorflow"

# Start-up notices are shown only to someone who asked for TensorFlow's info logs.
with _stderr_silenced(enabled=not (_REQUESTED_LOG_LEVEL.isdigit() and int(_REQUESTED_LOG_LEVEL) < 2)):
    import keras
    import tensorflow as tf

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"autobatch's tensorflow backend needs Keras on TensorFlow, but Keras was imported with the "
        f"{keras.backend.backend()!r} backend; set KERAS_BACKEND=tensorflow or import this module first"
    )
tf.get_logger().setLevel(logging.ERROR)
try:
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
except ImportError:  # absl comes with TensorFlow, but nothing here needs it
    pass

from autobatch.core.adaptive import AdaptiveStepper  # noqa: E402
from autobatch.backends.base import Backend, TrialMeasurements, TrialProgress  # noqa: E402
from autobatch.core.config import TrialBudget, TrialConfig  # noqa: E402
from autobatch.core.noise import NoiseScaleEstimator  # noqa: E402
from autobatch.core.schedule import TrialSchedule, run_schedule, trial_extras  # noqa: E402
from autobatch.core.windows import SteadyStateTimer, Window  # noqa: E402
from autobatch.tasks.workload import Workload  # noqa: E402

_OOM_TEXTS = ("OOM when allocating", "ResourceExhausted", "std::bad_alloc", "Failed to allocate memory")

PerSampleLoss = Callable[[Any, Any], Any]


class TensorFlowBackend(Backend):
    name = "tensorflow"

    def __init__(self) -> None:
        self._memory_capped = False

    def default_device(self) -> str:
        return "cuda:0" if tf.config.list_physical_devices("GPU") else "cpu"

    def fork_safe(self, device: str) -> bool:
        # On the CPU a process forked after the import (no op run yet) trains and
        # repeats exactly (checked with tensorflow-cpu 2.21); TensorFlow's GPU runtime
        # is not known to survive a fork, so GPU trials get a new process each.
        return not _is_gpu(device)

    def apply_memory_cap(self, budget_bytes: int, device: str) -> None:
        if not _is_gpu(device):
            return  # the worker has set RLIMIT_DATA
        gpu = _physical_gpu(device)
        # memory_limit is in MiB; it must be set before TensorFlow initialises the GPU.
        limit_mib = max(1, int(budget_bytes) // 2**20)
        tf.config.set_logical_device_configuration(gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=limit_mib)])
        self._memory_capped = True

    def is_oom(self, error: BaseException) -> bool:
        # The error or what it was raised from: TensorFlow on the CPU wraps some OOMs (see is_oom_error).
        return is_oom_error(error)

    def peak_memory_bytes(self, device: str) -> int | None:
        return _memory_info(device, "peak")

    def current_memory_bytes(self, device: str) -> int | None:
        return _memory_info(device, "current")

    def reset_peak_memory(self, device: str) -> None:
        if _is_gpu(device):
            tf.config.experimental.reset_memory_stats(_tf_device_name(device))

    def run_trial(
        self, workload: Workload, config: TrialConfig, budget: TrialBudget, device: str, progress: TrialProgress
    ) -> TrialMeasurements:
        if _is_gpu(device):
            gpu = _physical_gpu(device)  # fail loudly rather than let soft placement run on the CPU
            if not self._memory_capped:
                _allow_memory_growth(gpu)  # without a cap, take what is used rather than the whole GPU
        keras.utils.set_random_seed(budget.seed)
        precision = MixedPrecision(device, enabled=budget.mixed_precision)
        with tf.device(_tf_device_name(device)):
            with precision.policy_scope():
                model = workload.build_model("tensorflow")
            optimizer = precision.wrap(make_optimizer(workload.optimizer, config.learning_rate))
            trainer = MicroBatchTrainer(
                model,
                optimizer,
                make_loss(workload.loss),
                x_spec=batch_spec(workload.x_train),
                y_spec=batch_spec(workload.y_train),
                # the noise scale needs two batch sizes, a micro-batch's and its window's: only with accumulation
                measure_noise=budget.measure_noise and config.accumulation_steps > 1,
            )
            data = ArrayData(workload.x_train, workload.y_train)
            schedule = TrialSchedule(
                len(workload.y_train), config.micro_batch_size, config.accumulation_steps, budget
            )
            progress.mark_baseline()
            estimator = NoiseScaleEstimator()

            def train(window: Window, micro_batches, measure: bool) -> float:
                for micro_batch, (x, y) in zip(window.micro_batches, micro_batches):
                    trainer.accumulate(x, y, tf.constant(len(micro_batch) / window.size, tf.float32))
                loss = float(trainer.apply())  # reading the loss waits for the update to finish
                # A short last micro-batch would give the estimator a third batch size: its window is left out.
                if measure and trainer.measures_noise and len({len(mb) for mb in window.micro_batches}) == 1:
                    estimator.add_window(config.micro_batch_size, window.size, *trainer.last_noise_norms())
                return loss

            eval_batch = budget.eval_batch_size or config.micro_batch_size

            def validate() -> float:
                return trainer.evaluate(workload.x_val, workload.y_val, eval_batch, limit=budget.val_samples)

            timer = SteadyStateTimer(budget.warmup_steps)
            outcome = run_schedule(
                schedule, feed=data.windows, train=train, evaluate=validate, progress=progress, timer=timer
            )
        return TrialMeasurements(
            samples_per_second=timer.samples_per_second,
            val_loss=outcome.val_loss,
            samples_trained=outcome.samples_trained,
            steps_timed=timer.timed_windows,
            timings={"train": outcome.train_seconds, "eval": outcome.eval_seconds},
            extras={
                "final_train_loss": outcome.last_train_loss,
                "traces": dict(trainer.trace_counts),
                **trial_extras(outcome, estimator),
            },
        )


class MicroBatchTrainer:
    """Gradient accumulation for a Keras model: one tape per micro-batch, one optimizer step per window.

    Use it from your own loop::

        trainer = MicroBatchTrainer(model, keras.optimizers.Adam(1e-3), "cross_entropy")
        loss = trainer.train_window([(x1, y1), (x2, y2), (x3, y3)])

    or call :meth:`accumulate` per micro-batch with its share of the window's samples
    and :meth:`apply` once per window. ``x_spec``/``y_spec`` fix the traced signature
    (give the batch dimension as ``None``, see :func:`batch_spec`); without them the
    functions generalise their shapes after the first distinct one, so at most a
    second trace. :attr:`trace_counts` tells how often each function was traced.
    ``measure_noise`` also records, per window, the squared norms of the micro-batch
    gradients and of the window's (:meth:`last_noise_norms`), for :mod:`autobatch.core.noise`.
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        loss: "str | PerSampleLoss",
        *,
        x_spec: Any = None,
        y_spec: Any = None,
        measure_noise: bool = False,
    ):
        self.model = model
        self.optimizer = optimizer
        self.measures_noise = measure_noise
        self.loss_fn: PerSampleLoss = make_loss(loss) if isinstance(loss, str) else loss
        self.trace_counts = {"accumulate": 0, "apply": 0, "evaluate": 0}
        self._variables = list(model.trainable_variables)
        if not self._variables:
            raise ValueError("model has no trainable variables; build it (keras.Input) before making a trainer")
        if not optimizer.built:
            optimizer.build(self._variables)
        self._accumulators = [
            tf.Variable(tf.zeros(v.shape, dtype=v.dtype), trainable=False, name="grad_accumulator")
            for v in self._variables
        ]
        self._window_loss = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="window_loss")
        if measure_noise:
            self._micro_sq_sum = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="micro_grad_sq_sum")
            self._micro_count = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="micro_batch_count")
            self._noise_norms = tf.Variable([0.0, 0.0], dtype=tf.float32, trainable=False, name="noise_norms")

        if x_spec is not None and y_spec is not None:
            share_spec = tf.TensorSpec((), tf.float32)
            self.accumulate = tf.function(self._accumulate, input_signature=[x_spec, y_spec, share_spec])
            self._evaluate_batch = tf.function(self._loss_sum, input_signature=[x_spec, y_spec])
        else:
            self.accumulate = tf.function(self._accumulate, reduce_retracing=True)
            self._evaluate_batch = tf.function(self._loss_sum, reduce_retracing=True)
        self.apply = tf.function(self._apply)

    @property
    def trace_count(self) -> int:
        """Traces of the training functions (``accumulate`` + ``apply``); 2 after any number of windows."""
        return self.trace_counts["accumulate"] + self.trace_counts["apply"]

    @property
    def accumulated_gradients(self) -> list:
        """The gradients summed since the last :meth:`apply` (scaled, under a LossScaleOptimizer)."""
        return [accumulator.read_value() for accumulator in self._accumulators]

    def last_noise_norms(self) -> tuple[float, float]:
        """The last window's (mean squared norm of its micro-batch gradients, squared norm of its gradient)."""
        micro_sq, window_sq = self._noise_norms.numpy().tolist()
        return float(micro_sq), float(window_sq)

    def train_window(self, micro_batches: Iterable[tuple[Any, Any]]) -> float:
        """One optimizer step over ``micro_batches`` [(x, y), ...]; returns the window's mean loss."""
        micro_batches = list(micro_batches)
        total = sum(int(len(y)) for _, y in micro_batches)
        for x, y in micro_batches:
            self.accumulate(x, y, tf.constant(len(y) / total, tf.float32))
        return float(self.apply())

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int, limit: int | None = None) -> float:
        """Mean per-sample loss over the first ``limit`` samples (all when ``None``), each weighing the same."""
        count = len(y) if limit is None else min(limit, len(y))
        total = 0.0
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            total += float(self._evaluate_batch(x[start:stop], y[start:stop]))
        return total / count

    def _accumulate(self, x, y, share):
        """Gradients of one micro-batch's mean loss × ``share``, added into the accumulators."""
        self.trace_counts["accumulate"] += 1  # runs only while tracing
        with tf.GradientTape() as tape:
            predictions = self.model(x, training=True)
            loss = tf.reduce_mean(self.loss_fn(y, predictions)) * share
            if self.model.losses:  # regularisers: the shares sum to 1, so once per window in all
                loss += tf.add_n([tf.cast(extra, tf.float32) for extra in self.model.losses]) * share
            scaled = self.optimizer.scale_loss(loss)  # a LossScaleOptimizer scales; others pass it through
        gradients = tape.gradient(scaled, self._variables)
        for accumulator, gradient in zip(self._accumulators, gradients):
            if gradient is None:
                continue
            if isinstance(gradient, tf.IndexedSlices):
                accumulator.scatter_add(
                    tf.IndexedSlices(tf.cast(gradient.values, accumulator.dtype), gradient.indices, gradient.dense_shape)
                )
            else:
                accumulator.assign_add(tf.cast(gradient, accumulator.dtype))
        if self.measures_noise:
            # The gradient of this micro-batch's mean loss is the tape's divided by share × loss scale.
            squared = _squared_norm(gradients)
            self._micro_sq_sum.assign_add(squared / tf.square(share * self._loss_scale()))
            self._micro_count.assign_add(1.0)
        self._window_loss.assign_add(loss)
        return loss

    def _apply(self):
        """One optimizer step with the accumulated gradients, then zero them; returns the window's loss."""
        self.trace_counts["apply"] += 1
        gradients = [accumulator.read_value() for accumulator in self._accumulators]
        if self.measures_noise:  # before the step, which may change the loss scale
            window_sq = _squared_norm(gradients) / tf.square(self._loss_scale())
            micro_sq = self._micro_sq_sum.read_value() / tf.maximum(self._micro_count.read_value(), 1.0)
            self._noise_norms.assign(tf.stack([micro_sq, window_sq]))
            self._micro_sq_sum.assign(0.0)
            self._micro_count.assign(0.0)
        # A LossScaleOptimizer unscales here, once, and skips the step if any gradient is not finite.
        self.optimizer.apply_gradients(zip(gradients, self._variables))
        window_loss = self._window_loss.read_value()
        for accumulator in self._accumulators:
            accumulator.assign(tf.zeros_like(accumulator))
        self._window_loss.assign(0.0)
        return window_loss

    def _loss_scale(self):
        """What the loss, and so every gradient, is multiplied by: a LossScaleOptimizer's scale, else 1."""
        return tf.cast(self.optimizer.scale_loss(tf.constant(1.0, tf.float32)), tf.float32)

    def _loss_sum(self, x, y):
        self.trace_counts["evaluate"] += 1
        predictions = self.model(x, training=False)
        return tf.reduce_sum(self.loss_fn(y, predictions))


class ArrayData:
    """numpy arrays served by ``tf.data`` as micro-batches, in the order the window plan gives."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        with tf.device("/CPU:0"):
            self.x = tf.convert_to_tensor(np.ascontiguousarray(x))
            self.y = tf.convert_to_tensor(np.ascontiguousarray(y))

    def micro_batches(self, index_arrays: Iterable[np.ndarray]) -> "tf.data.Dataset":
        """A dataset yielding ``(x[idx], y[idx])`` for each index array, prefetched in the background."""
        index_arrays = list(index_arrays)
        lengths = np.array([len(idx) for idx in index_arrays], dtype=np.int64)
        flat = np.concatenate(index_arrays).astype(np.int64) if index_arrays else np.empty(0, np.int64)
        x, y = self.x, self.y
        with tf.device("/CPU:0"):
            rows = tf.RaggedTensor.from_row_lengths(flat, lengths)
            return (
                tf.data.Dataset.from_tensor_slices(rows)
                .map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx)))
                .prefetch(tf.data.AUTOTUNE)
            )


    def windows(self, chunks: Iterable[Sequence[Window]]):
        """Each window with its micro-batches as a lazy iterator of ``(x, y)``, one pipeline per chunk.

        Lazy, so a window's micro-batches come out of the prefetching pipeline one at a
        time, as the trainer asks for them.
        """
        for windows in chunks:
            batches = iter(self.micro_batches(mb for window in windows for mb in window.micro_batches))
            for window in windows:
                yield window, (next(batches) for _ in window.micro_batches)


def _squared_norm(gradients) -> "tf.Tensor":
    """Σ |g|² over a list of gradients, in float32 (a sparse one is summed into its dense form first)."""
    total = tf.constant(0.0, tf.float32)
    for gradient in gradients:
        if gradient is None:
            continue
        if isinstance(gradient, tf.IndexedSlices):  # repeated indices add up before squaring
            gradient = tf.convert_to_tensor(gradient)
        total += tf.reduce_sum(tf.square(tf.cast(gradient, tf.float32)))
    return total


class MixedPrecision:
    """Keras mixed precision: ``mixed_float16`` with loss scaling on a GPU, ``mixed_bfloat16`` on the CPU.

    The policy is set only while the model is built (layers take it then), so it does
    not leak into later models in the same process. bfloat16 has float32's range, so
    the CPU needs no loss scaling.
    """

    def __init__(self, device: str, enabled: bool):
        self.enabled = enabled
        self.loss_scaling = enabled and _is_gpu(device)
        self.policy = ("mixed_float16" if _is_gpu(device) else "mixed_bfloat16") if enabled else None

    @contextlib.contextmanager
    def policy_scope(self):
        if self.policy is None:
            yield
            return
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(self.policy)
        try:
            yield
        finally:
            keras.mixed_precision.set_global_policy(previous)

    def wrap(self, optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
        return keras.mixed_precision.LossScaleOptimizer(optimizer) if self.loss_scaling else optimizer


def batch_spec(array: np.ndarray) -> "tf.TensorSpec":
    """The signature of micro-batches of ``array``: its sample shape and dtype, any batch size."""
    return tf.TensorSpec((None, *array.shape[1:]), tf.as_dtype(array.dtype))


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    if name == "adam":
        # torch's default epsilon, so both frameworks run the same update rule
        return keras.optimizers.Adam(learning_rate=learning_rate, epsilon=1e-8)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9)
    raise ValueError(f"optimizer={name!r} is not supported by the tensorflow backend; allowed: 'adam', 'sgd'")


def make_loss(name: str) -> PerSampleLoss:
    """A per-sample loss ``(y_true, predictions) -> (batch,)`` in float32."""
    if name == "cross_entropy":
        return _cross_entropy
    if name == "mse":
        return _mean_squared_error
    raise ValueError(f"loss={name!r} is not supported by the tensorflow backend; allowed: 'cross_entropy', 'mse'")


def _cross_entropy(y_true, logits):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y_true, logits=tf.cast(logits, tf.float32))


def _mean_squared_error(y_true, predictions):
    y_true = tf.cast(y_true, tf.float32)
    predictions = tf.reshape(tf.cast(predictions, tf.float32), tf.shape(y_true))
    squared = tf.square(predictions - y_true)
    rank = len(squared.shape)
    return tf.reduce_mean(squared, axis=list(range(1, rank))) if rank > 1 else squared


def _physical_gpu(device: str):
    gpus = tf.config.list_physical_devices("GPU")
    index = _device_index(device)
    if index >= len(gpus):
        raise RuntimeError(
            f"device={device!r}: TensorFlow {tf.__version__} sees {len(gpus)} GPU(s); "
            "tensorflow-cpu cannot use a GPU (install tensorflow[and-cuda]), or run on device='cpu'"
        )
    return gpus[index]


def _allow_memory_growth(gpu) -> None:
    try:
        tf.config.experimental.set_memory_growth(gpu, True)
    except (RuntimeError, ValueError):  # the GPU is initialised already, or has virtual devices
        pass


def _memory_info(device: str, key: str) -> int | None:
    """The GPU allocator's ``current`` or ``peak`` bytes; ``None`` on the CPU or where TensorFlow has no GPU."""
    if not _is_gpu(device):
        return None
    try:
        return int(tf.config.experimental.get_memory_info(_tf_device_name(device))[key])
    except (ValueError, RuntimeError):
        return None


def _is_gpu(device: str) -> bool:
    return device.startswith(("cuda", "gpu", "GPU", "/GPU"))


def _device_index(device: str) -> int:
    _, _, index = device.rpartition(":")
    return int(index) if index.isdigit() else 0


def _tf_device_name(device: str) -> str:
    return f"/GPU:{_device_index(device)}" if _is_gpu(device) else "/CPU:0"


__all__ = [
    "TensorFlowBackend",
    "MicroBatchTrainer",
    "ArrayData",
    "MixedPrecision",
    "batch_spec",
    "make_optimizer",
    "make_loss",
]


# -- Adaptive micro-batching (autobatch.core.adaptive) ---------------------------------------------------


class AdaptiveMicroBatchTrainer(AdaptiveStepper):
    """Adaptive micro-batching for a Keras model in your own loop: one call per window (optimizer step).

    ::

        step = AdaptiveMicroBatchTrainer(model, keras.optimizers.Adam(1e-3), "cross_entropy",
                                         micro_batch_size=256, x_spec=batch_spec(x), y_spec=batch_spec(y))
        for x_window, y_window in windows:  # each is one effective batch
            loss = step(x_window, y_window)
        print(step.adaptations)

    Built on :class:`MicroBatchTrainer` (one tape per micro-batch, gradients summed in
    variable accumulators, one optimizer step per window). When a micro-batch raises
    TensorFlow's OOM, the accumulators are zeroed, the model's non-trainable variables
    (BatchNorm statistics, counters) are put back as they were before the window, and the
    window is redone at half the micro-batch: same samples, same order, same effective
    batch and learning rate. Give ``x_spec``/``y_spec`` with a ``None`` batch dimension
    (:func:`batch_spec`) so a new size runs the same traced graph. An OOM in the optimizer
    step raises :class:`autobatch.core.adaptive.OptimizerStepOOMError`.

    On the CPU, TensorFlow 2.21's oneDNN kernels do not always raise a recoverable OOM:
    a convolution whose output cannot be allocated crashes the process (SIGSEGV or
    ``std::bad_alloc``), and one whose scratch memory cannot be allocated aborts the
    runtime (``AbortedError``; every later step fails), which this class raises as
    :class:`autobatch.core.adaptive.UnrecoverableOOMError`. Neither can be redone in that
    process; ``autobatch train`` redoes the window in a new process from its last
    checkpoint (see :mod:`autobatch.training.train`). It also does so for a plain
    ``ResourceExhaustedError`` on the CPU under a memory cap (``recover_in_process=False``):
    the allocator keeps what it grew to, so a redo in that process has little memory
    left for anything else, and fails in odd places (numpy, protobuf) if at all.
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        loss: "str | PerSampleLoss",
        *,
        micro_batch_size: int | None = None,
        max_micro_batch: int | None = None,
        min_micro_batch: int = 1,
        grow_after: int | None = None,
        adaptive: bool = True,
        x_spec: Any = None,
        y_spec: Any = None,
        on_adaptation=None,
        controller=None,
        trainer: "MicroBatchTrainer | None" = None,
        recover_in_process: bool = True,
    ):
        self._take_controller(
            controller,
            micro_batch_size,
            max_micro_batch=max_micro_batch,
            min_micro_batch=min_micro_batch,
            grow_after=grow_after,
            adaptive=adaptive,
            on_adaptation=on_adaptation,
        )
        self.model = model
        self.trainer = trainer or MicroBatchTrainer(model, optimizer, loss, x_spec=x_spec, y_spec=y_spec)
        self.recover_in_process = recover_in_process
        self._is_oom = is_oom_error

    def __call__(self, x, y, *, epoch: int | None = None) -> float:
        return self.step(x, y, epoch=epoch)

    def step(self, x, y, *, epoch: int | None = None) -> float:
        """One optimizer step over the window ``(x, y)``; returns the window's mean loss."""
        window_size = int(len(y))
        state = list(self.model.non_trainable_variables)
        saved = [tf.identity(variable.value) for variable in state]
        trainer = self.trainer

        def accumulate(start: int, stop: int, share: float) -> None:
            try:
                trainer.accumulate(x[start:stop], y[start:stop], tf.constant(share, tf.float32))
            except Exception as error:
                if not is_oom_error(error):
                    raise
                if self.recover_in_process and isinstance(error, tf.errors.ResourceExhaustedError):
                    raise  # the controller splits the window and redoes it here
                raise _unrecoverable(error) from error

        def apply() -> float:
            return float(trainer.apply())

        def release() -> None:
            reset_accumulators(trainer)
            for variable, value in zip(state, saved):
                variable.assign(value)
            import gc

            gc.collect()

        return self.controller.run_window(
            window_size, accumulate, apply, is_oom=self._is_oom, release=release, epoch=epoch
        )


def make_adaptive_train_step(model: keras.Model, optimizer, loss, **options) -> AdaptiveMicroBatchTrainer:
    """The step builder: a callable ``step(x_window, y_window) -> loss`` that adapts its micro-batch.

    ``options`` are those of :class:`AdaptiveMicroBatchTrainer` (``micro_batch_size`` at least).
    """
    return AdaptiveMicroBatchTrainer(model, optimizer, loss, **options)


def fit_adaptive(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    micro_batch_size: int,
    epochs: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    validation_data: "tuple[np.ndarray, np.ndarray] | None" = None,
    **options,
) -> dict:
    """``model.fit`` for a compiled Keras model, with adaptive micro-batching inside each batch.

    ``batch_size`` is the effective batch (one optimizer step); it stays fixed while the
    micro-batch adapts. Uses the model's compiled optimizer and loss. Returns a history
    ``{"loss": [...], "val_loss": [...], "adaptations": [...]}``, one loss per epoch.
    """
    from autobatch.core.windows import SampleStream, plan_windows

    if model.optimizer is None or getattr(model, "loss", None) is None:
        raise ValueError("fit_adaptive needs a compiled model: call model.compile(optimizer=..., loss=...) first")
    step = AdaptiveMicroBatchTrainer(
        model,
        model.optimizer,
        _per_sample_loss(model.loss),
        micro_batch_size=micro_batch_size,
        x_spec=batch_spec(np.asarray(x)),
        y_spec=batch_spec(np.asarray(y)),
        **options,
    )
    stream = SampleStream(len(y), seed=seed, shuffle=shuffle)
    history: dict = {"loss": [], "val_loss": []}
    for epoch in range(1, epochs + 1):
        total, count = 0.0, 0
        for window in plan_windows(stream, len(y), batch_size, 1):
            indices = window.micro_batches[0]
            total += step(x[indices], y[indices], epoch=epoch) * len(indices)
            count += len(indices)
        history["loss"].append(total / count)
        if validation_data is not None:
            x_val, y_val = validation_data
            history["val_loss"].append(step.trainer.evaluate(x_val, y_val, step.micro_batch_size))
    history["adaptations"] = [adaptation.to_dict() for adaptation in step.adaptations]
    return history


def _per_sample_loss(loss) -> PerSampleLoss:
    """A compiled Keras loss as a function ``(y_true, predictions) -> (batch,)``."""
    if isinstance(loss, str):
        return keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.call  # the unreduced per-sample values
    if callable(loss):
        return loss
    raise ValueError(f"loss={loss!r}: fit_adaptive needs one loss (a name, a keras.losses.Loss or a function)")


# oneDNN kernels that cannot allocate their scratch memory raise these, as AbortedError
# ("Compute received an exception: ... could not create a memory object" in MaxPoolGrad).
_ONEDNN_OOM_TEXTS = ("could not create a memory object", "could not create a primitive")


def is_oom_error(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, shows TensorFlow ran out of memory.

    :meth:`TensorFlowBackend.is_oom` is this function, so trials and training agree.

    oneDNN's allocation failures come as ``AbortedError``; an allocation that fails while
    a ``tf.function`` binds its inputs or serialises its graph comes as a ``TypeError``
    whose cause is numpy's ``MemoryError``, or as protobuf's ``EncodeError``.
    """
    from autobatch.core.adaptive import UnrecoverableOOMError

    if isinstance(error, UnrecoverableOOMError):
        return False  # already judged: not one to redo in this process
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (tf.errors.ResourceExhaustedError, MemoryError)):
            return True
        if isinstance(error, (tf.errors.InternalError, tf.errors.UnknownError, RuntimeError)) and any(
            marker in str(error) for marker in _OOM_TEXTS
        ):
            return True
        if isinstance(error, tf.errors.AbortedError) and any(text in str(error) for text in _ONEDNN_OOM_TEXTS):
            return True
        if type(error).__name__ == "EncodeError" and "Failed to serialize" in str(error):
            return True
        if "Unable to allocate" in str(error):  # numpy's MemoryError, re-raised by tf.function's binding
            return True
        error = error.__cause__ or error.__context__
    return False


def _unrecoverable(error: BaseException):
    from autobatch.core.adaptive import UnrecoverableOOMError, first_line

    detail = first_line(error)
    return UnrecoverableOOMError(
        f"TensorFlow ran out of memory in a way this process cannot train on from ({detail}): its runtime may have "
        "aborted, and its allocator keeps the memory it took; start a new process with a smaller micro-batch "
        "(autobatch train does this itself, from its last checkpoint)",
        detail=detail,
    )


def reset_accumulators(trainer: MicroBatchTrainer) -> None:
    """Zero a trainer's gradient accumulators and window loss: the window starts again."""
    for accumulator in trainer._accumulators:
        accumulator.assign(tf.zeros_like(accumulator))
    trainer._window_loss.assign(0.0)


class TrainingSession:
    """What ``autobatch train`` needs from TensorFlow: a Keras model of the workload trained window by window.

    Used by the training process of :mod:`autobatch.training.train`; the loop over epochs, the
    progress and the checkpoints' timing live there, framework-free.
    """

    def __init__(self, workload: Workload, config: TrialConfig, *, device: str, seed: int, mixed_precision: bool, controller):
        if _is_gpu(device):
            gpu = _physical_gpu(device)
            _allow_memory_growth(gpu)  # no-op when the budget set a logical device with a memory limit
        #: on the CPU TensorFlow's OOMs crash or poison the process: each is redone in a new one
        self.crash_prone_oom = not _is_gpu(device)
        self.device_name = _tf_device_name(device)
        keras.utils.set_random_seed(seed)
        precision = MixedPrecision(device, enabled=mixed_precision)
        with tf.device(self.device_name):
            with precision.policy_scope():
                self.model = workload.build_model("tensorflow")
            self.optimizer = precision.wrap(make_optimizer(workload.optimizer, config.learning_rate))
            self.step = AdaptiveMicroBatchTrainer(
                self.model,
                self.optimizer,
                make_loss(workload.loss),
                x_spec=batch_spec(workload.x_train),
                y_spec=batch_spec(workload.y_train),
                controller=controller,
                recover_in_process=not self.crash_prone_oom,
            )
        self.x = np.ascontiguousarray(workload.x_train)
        self.y = np.ascontiguousarray(workload.y_train)
        self.is_oom = is_oom_error
        self._device = device

    def run_window(self, indices: np.ndarray, epoch: int | None = None) -> float:
        with tf.device(self.device_name):
            return self.step(self.x[indices], self.y[indices], epoch=epoch)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
        with tf.device(self.device_name):
            try:
                return self.step.trainer.evaluate(x, y, batch_size)
            except Exception as error:
                if not is_oom_error(error) or isinstance(error, tf.errors.ResourceExhaustedError):
                    raise
                raise _unrecoverable(error) from error

    def release(self) -> None:
        import gc

        gc.collect()

    def save(self, path: str) -> None:
        """``.keras``: the whole model; ``.weights.h5``: its weights; ``.npz``: every variable by path."""
        path = str(path)
        if path.endswith(".npz"):
            with open(path, "wb") as handle:
                np.savez(handle, **{variable.path: np.asarray(variable.numpy()) for variable in self.model.variables})
        elif path.endswith(".weights.h5"):
            self.model.save_weights(path)
        else:
            self.model.save(path)

    def save_checkpoint(self, path: str) -> None:
        values = [variable.numpy() for variable in self._state_variables()]
        with open(path, "wb") as handle:
            np.savez(handle, *values)

    def load_checkpoint(self, path: str) -> None:
        with np.load(path) as archive:
            values = [archive[f"arr_{i}"] for i in range(len(archive.files))]
        variables = self._state_variables()
        if len(values) != len(variables):
            raise RuntimeError(f"checkpoint {path} holds {len(values)} variables, the model and optimizer {len(variables)}")
        for variable, value in zip(variables, values):
            variable.assign(value)

    def _state_variables(self) -> list:
        return [*self.model.variables, *self.optimizer.variables]

    def peak_memory_bytes(self) -> int | None:
        return _memory_info(self._device, "peak")

    def current_memory_bytes(self) -> int | None:
        return _memory_info(self._device, "current")


__all__ += [
    "AdaptiveMicroBatchTrainer",
    "make_adaptive_train_step",
    "fit_adaptive",
    "is_oom_error",
    "reset_accumulators",
    "TrainingSession",
]
