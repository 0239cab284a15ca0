"""What every kernel family shares: the dispatch predicate, input checks, tiling and addressing.

Kernels walk each sample of [B, C, H, W] tensors as a flat index j in [0, N), N = C*H*W, in the
memory order of the state x (so x, the output and same-layout inputs are read coalesced); every
other tensor is addressed through its own strides, so contiguous, channels-last and strided views
such as noise[:, i] all work. When every tensor is dense in that order (DENSE), the offset of j
is just j and the index arithmetic compiles away.
"""
import os

import torch

from lumen.engine.errors import InvalidInputError, InvalidTypeError

from ._triton import HAVE_TRITON, INTERPRETED, tl, triton

PREDICTION_CODES = {"v_prediction": 0, "epsilon": 1, "sample": 2}
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024  # elements per tile: a power of two for tl.arange, 4 KiB of fp32 per operand
MAX_CHUNKS = 256  # chunks per sample; every CFG program re-reads this many partial stats
# In-sample indices and offsets are int32 (batch offsets are int64); 2^30 elements per sample
# leaves room for the last chunk's overhang and for strided views of twice the span.
MAX_SAMPLE_ELEMENTS = 2**30
# Pointers to single values (dp.a[i], dp.coef[i], w, phi and their placeholders) are 16-byte
# aligned only for some i: not specialising on their alignment keeps one compiled kernel per step.
UNALIGNED_SCALARS = ("w_ptr", "phi_ptr", "a_ptr", "s_ptr", "coef_ptr")
# Scalar operands are shared by the batch (stride 0) or per sample (the scheduler's slots, each
# at its own step of its own plan): the kernels read sample b's value at ptr + b * stride.
KERNEL_MODES = ("auto", "reference", "triton")


def kernel_mode() -> str:
    """LUMEN_KERNELS: auto (Triton on CUDA), reference, triton (also CPU: interpreter)."""
    mode = os.environ.get("LUMEN_KERNELS", "auto")
    if mode not in KERNEL_MODES:
        raise InvalidInputError(f"LUMEN_KERNELS={mode!r}; expected one of "
                                f"{', '.join(KERNEL_MODES)}")
    return mode


def use_triton(t: torch.Tensor) -> bool:
    """The one dispatch predicate: Triton kernels for t's device, else the torch reference."""
    mode = kernel_mode()
    if mode == "reference" or not HAVE_TRITON:
        return False
    return t.is_cuda or (mode == "triton" and INTERPRETED)


# ---------------------------------------------------------------------------------------------
# Input checks (host metadata only: no tensor value is read, so graph capture is unaffected)


def check_tensor(name, t, dtypes, shape=None):
    if not isinstance(t, torch.Tensor):
        raise InvalidTypeError(f"{name} of type {type(t).__name__}; expected a torch.Tensor")
    if t.dtype not in dtypes:
        raise InvalidTypeError(f"{name}.dtype={t.dtype}; expected one of "
                               f"{', '.join(str(d) for d in dtypes)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise InvalidInputError(f"{name}.shape={tuple(t.shape)}; expected {tuple(shape)}")


def check_scalars(x, **scalars):
    """Every named value is fp32 on x's device: all shared by the batch (0-dim, [3] for coef_i)
    or all per sample ([B], [B, 3] for coef_i), as the first one given is."""
    per_sample = None
    for name, t in scalars.items():
        if not isinstance(t, torch.Tensor):
            check_tensor(name, t, (torch.float32,))
        row = (3,) if name == "coef_i" else ()
        if per_sample is None:
            per_sample = t.ndim == len(row) + 1
        shape = (x.shape[0], *row) if per_sample else row
        if tuple(t.shape) not in (row, (x.shape[0], *row)):
            raise InvalidInputError(f"{name}.shape={tuple(t.shape)}; expected {row} (shared) or "
                                    f"{(x.shape[0], *row)} (per sample)")
        check_tensor(name, t, (torch.float32,), shape)
        check_device(name, t, x)


def per_sample(t: torch.Tensor, row: int = 0) -> torch.Tensor:
    """A scalar operand shaped to broadcast over [B, C, H, W] in the torch references: as is
    when shared; [B] -> [B, 1, 1, 1]; a [B, 3] coefficient row -> [3, B, 1, 1, 1] (so that
    coef[k] is sample by sample what the shared row's coef[k] is)."""
    if t.ndim == row:
        return t
    return t.view(-1, 1, 1, 1) if row == 0 else t.T.reshape(3, -1, 1, 1, 1)


def sample_stride(t: torch.Tensor, row: int = 0) -> int:
    """Elements between two samples' values of a scalar operand: 0 when the batch shares it."""
    return t.stride(0) if t.ndim > row else 0


def check_device(name, t, x):
    if t.device != x.device:
        raise InvalidInputError(f"{name} on {t.device}; expected x's device {x.device}")


def check_prediction_type(prediction_type):
    if prediction_type not in PREDICTION_CODES:
        raise InvalidInputError(f"prediction_type={prediction_type!r}; expected one of "
                                f"{', '.join(PREDICTION_CODES)}")


def check_model_output(m, x, cfg):
    """m: [2B, C, H, W] ([neg, pos]) when cfg else [B, C, H, W], in fp32, fp16 or bf16."""
    if not isinstance(cfg, bool):
        raise InvalidTypeError(f"cfg={cfg!r} of type {type(cfg).__name__}; expected bool")
    check_tensor("x", x, (torch.float32,))
    if x.ndim != 4 or x.numel() == 0:
        raise InvalidInputError(f"x.shape={tuple(x.shape)}; expected non-empty [B, C, H, W]")
    B, C, H, W = x.shape
    check_tensor("m", m, MODEL_DTYPES, ((2 * B) if cfg else B, C, H, W))
    check_device("m", m, x)


def check_launchable(x):
    """The Triton launchers need CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    if not HAVE_TRITON:
        raise InvalidInputError("the Triton kernels were called but triton is not installed; "
                                "use the torch references (LUMEN_KERNELS=reference)")
    if not (x.is_cuda or (x.device.type == "cpu" and INTERPRETED)):
        raise InvalidInputError(f"x on {x.device}; expected a CUDA tensor (CPU tensors only "
                                "under TRITON_INTERPRET=1 set before importing kernels)")


# ---------------------------------------------------------------------------------------------
# Tiling and addressing


class Walk:
    """How a launch walks [B, C, H, W] tensors: x's memory order, sizes and chunking."""

    def __init__(self, x: torch.Tensor):
        if x[0].numel() > MAX_SAMPLE_ELEMENTS:
            raise InvalidInputError(f"x.shape={tuple(x.shape)}: {x[0].numel()} elements per sample; "
                                    f"the kernels address at most {MAX_SAMPLE_ELEMENTS} per sample")
        # Non-batch dims of x from outermost to innermost in memory (ties keep C, H, W order).
        self.perm = tuple(sorted((1, 2, 3), key=lambda d: -x.stride(d)))
        self.batch = x.shape[0]
        self.d1, self.d2, self.d3 = (x.shape[d] for d in self.perm)
        self.n = self.d1 * self.d2 * self.d3
        # Chunks of whole tiles; at most MAX_CHUNKS per sample, so partial stats stay small.
        tiles = triton.cdiv(self.n, BLOCK)
        self.iters = triton.next_power_of_2(triton.cdiv(tiles, MAX_CHUNKS)) if HAVE_TRITON else 1
        self.chunk = BLOCK * self.iters
        self.chunks = triton.cdiv(self.n, self.chunk)
        self.chunks_pow2 = max(16, triton.next_power_of_2(self.chunks)) if HAVE_TRITON else 16

    @property
    def grid(self):
        return (self.batch, self.chunks)

    def empty(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 [B, C, H, W], dense in x's memory order."""
        order = (0,) + self.perm
        t = torch.empty([x.shape[d] for d in order], dtype=torch.float32, device=x.device)
        return t.permute([order.index(d) for d in range(4)])

    def strides(self, t: torch.Tensor) -> tuple[int, int, int, int]:
        """(batch, outer, middle, inner) strides of t in the walk order."""
        return (t.stride(0),) + tuple(t.stride(d) for d in self.perm)

    def dense(self, *tensors) -> bool:
        """Whether every tensor's in-sample offset of j is j (size-1 dims have no stride)."""
        want = (self.d2 * self.d3, self.d3, 1)
        sizes = (self.d1, self.d2, self.d3)
        return all(s == w or n == 1 for t in tensors
                   for s, w, n in zip(self.strides(t)[1:], want, sizes))


@triton.jit
def tile_offsets(b, j, stride_b, stride_1, stride_2, stride_3, D2, D3, DENSE: tl.constexpr):
    """Memory offsets of in-sample flat indices j of sample b (walk order, see module doc).

    b is an int64 program id, so b * stride_b cannot wrap however large the batch is.
    """
    if DENSE:
        off = j
    else:
        i3 = j % D3
        i12 = j // D3
        off = (i12 // D2) * stride_1 + (i12 % D2) * stride_2 + i3 * stride_3
    return b * stride_b + off


@triton.jit
def tile_sum(x):
    """tl.sum(x, axis=0), spelled as tl.sum is (a reduce with triton's own _sum_combine).

    tl.sum is itself @jit-decorated when triton is imported, so if triton was imported before
    TRITON_INTERPRET=1 was set (diffusers imports it), calling it from an interpreted kernel
    fails; tl.reduce is patched by the interpreter, which maps _sum_combine to numpy's sum.
    """
    return tl.reduce(x, 0, tl.standard._sum_combine)


@triton.jit
def batch_index():
    """This program's sample b as int64: batch offsets b * stride exceed int32 on large batches."""
    return tl.program_id(0).to(tl.int64)
