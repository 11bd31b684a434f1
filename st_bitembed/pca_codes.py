"""PCA codes: a store code fitted to a corpus, that rescores at 4 bits per dimension about as well as int8 codes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

from st_bitembed.modules.quantize import gaussian_least_mse, gaussian_optimal_half_range

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "pca_codes.safetensors"
# The widest code of one component: a 13th bit would take its error from 1e-7 to 3e-8 of its variance, nothing a
# ranking sees, and the Gaussian quantizer's tables grow with 2^bits.
MAX_COMPONENT_BITS = 12
# Variance, relative to the largest, below which a direction has none (float64 eigh's rounding is ~1e-16 of it).
_NO_VARIANCE = 1e-12
# Alternations of the first pass's rotation fit (ITQ): on SciFact's abstracts, 10, 20 and 50 found as many true
# neighbours among the first candidates (the sample's size counts more); 20 fit 20,000 x 1,024 in ~22 s on 2 cores.
_ROTATION_ITERATIONS = 20
# Rows packed or unpacked at a time (their bits are spread one per byte in between).
_ROWS_PER_BLOCK = 8192


class PCACodes:
    """Transform coding of embeddings for a search store: principal components fitted on a sample of the corpus, bits
    allocated to them by how much each moves a query's score, a uniform code per component.

    The coordinates of sentence embeddings are far from alike: on all-MiniLM-L6-v2's, the first principal component
    has over 1,000x the variance of the last with any. Codes of a fixed width per coordinate (a :class:`Quantize`
    head's int4) spend as many bits on directions that hardly move a score as on those that decide it. These codes
    spend ``bits_per_dimension * dim`` bits per vector where they lower the expected error of a query's score most
    (greedily, bit by bit; a component with ``b`` bits has the least-MSE uniform quantizer for a Gaussian of its
    variance, and the weight of its error is the mean square of a query along it, taken from the corpus): leading
    components get up to :data:`MAX_COMPONENT_BITS` bits, the last ones none (they stand at the corpus mean). A
    vector's codes are packed into ``ceil(bits_per_dimension * dim / 8)`` bytes: the components ordered by decreasing
    width, the codes of each width as bit planes (every code's top bit, then every code's next bit...).

    As the clusters of an inverted-file index, they are fitted to the corpus they code (a few thousand of its
    embeddings suffice; :meth:`fit`): fitted on text unlike it (Wikipedia passages for scientific abstracts) they
    keep only part of their advantage. Used as the store of a :class:`~st_bitembed.index.NestedCodeIndex`; its binary
    first pass is the sign bits of the vectors the codes stand for, so the store still holds everything the index
    searches, taken in a rotated basis fitted with them: iterative quantization (ITQ, Gong & Lazebnik 2011), the
    rotation whose sign bits lose least of the sample's vectors, whose Hamming ranking holds more of the true
    neighbours among its first candidates than the sign bits of the coordinates themselves.

    Args:
        mean: ``[dim]`` mean of the corpus.
        basis: ``[dim, dim]`` principal directions, as columns.
        widths: ``[dim]`` bits of each component's code (:data:`MAX_COMPONENT_BITS` to 0, not increasing).
        steps: ``[dim]`` quantization step of each component (any positive value where its width is 0).
        binary_rotation: ``[dim, dim]`` orthogonal matrix: the binary codes are the sign bits of ``embeddings @
            binary_rotation``; ``None``: of the embeddings' own coordinates (sentence-transformers' binary codes).

    Example:
        ::

            import torch
            from st_bitembed.pca_codes import PCACodes

            corpus = torch.nn.functional.normalize(torch.randn(2000, 64) * torch.linspace(3, 0.1, 64), dim=-1)
            codes = PCACodes.fit(corpus, bits_per_dimension=4)
            stored = codes.encode(corpus)  # uint8 [2000, 32]
            approximations = codes.decode(stored)  # float32 [2000, 64]
    """

    def __init__(
        self,
        mean: np.ndarray,
        basis: np.ndarray,
        widths: np.ndarray,
        steps: np.ndarray,
        binary_rotation: np.ndarray | None = None,
    ) -> None:
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.basis = np.ascontiguousarray(basis, dtype=np.float32)
        self.widths = np.asarray(widths, dtype=np.int64)
        self.steps = np.ascontiguousarray(steps, dtype=np.float32)
        self.dimension = len(self.mean)
        identity = np.eye(self.dimension, dtype=np.float32)
        self.binary_rotation = (
            identity if binary_rotation is None else np.ascontiguousarray(binary_rotation, np.float32)
        )
        if (
            self.basis.shape != (self.dimension, self.dimension)
            or self.widths.shape != (self.dimension,)
            or self.steps.shape != (self.dimension,)
            or self.widths.min(initial=0) < 0
            or self.widths.max(initial=0) > MAX_COMPONENT_BITS
            or not (self.steps > 0).all()
            or (np.diff(self.widths) > 0).any()
            or self.binary_rotation.shape != (self.dimension, self.dimension)
        ):
            raise ValueError(
                f"PCACodes need a mean [dim], a basis [dim, dim], widths [dim] of {MAX_COMPONENT_BITS} to 0 bits, "
                f"not increasing, positive steps [dim] and a binary rotation [dim, dim]; got {self.mean.shape}, "
                f"{self.basis.shape}, {self.widths.shape} (widths {self.widths.min(initial=0)} to "
                f"{self.widths.max(initial=0)}), {self.steps.shape}, {self.binary_rotation.shape}."
            )
        self.total_bits = int(self.widths.sum())
        self._offsets = np.where(self.widths > 0, 2 ** np.maximum(self.widths - 1, 0), 0)  # unsigned = code + offset
        # A component's value is (unsigned code - offset + 0.5) * step + its mean; one of no bits is its mean.
        mean_components = self.mean @ self.basis
        self._code_origin = np.where(
            self.widths > 0, (0.5 - self._offsets) * self.steps + mean_components, mean_components
        ).astype(np.float32)
        self._components_to_bits = self.basis.T @ self.binary_rotation  # decode, then rotate: one product
        # Components by decreasing width (as fit orders them): each width's codes are one slice of the vector.
        bounds = np.flatnonzero(np.diff(self.widths, prepend=-1, append=-1))
        self._groups = [
            (int(self.widths[start]), slice(int(start), int(end)))
            for start, end in zip(bounds[:-1], bounds[1:])
            if self.widths[start]
        ]

    @classmethod
    def fit(cls, embeddings: np.ndarray | torch.Tensor, bits_per_dimension: float = 4.0) -> PCACodes:
        """Codes fitted to ``embeddings`` (``[N, dim]``, a sample of the corpus they will code, ``N >= dim``; the more
        the better the first pass's rotation), spending ``round(bits_per_dimension * dim)`` bits per vector."""
        sample = np.asarray(embeddings.detach().float().cpu() if isinstance(embeddings, torch.Tensor) else embeddings)
        if sample.ndim != 2 or len(sample) < sample.shape[1] or not np.isfinite(sample).all():
            raise ValueError(
                f"Fit PCACodes on finite embeddings [N, dim] of the corpus, at least as many as dimensions (a few "
                f"thousand: the principal directions of fewer are noise); got shape {sample.shape}."
            )
        if not 0 < bits_per_dimension <= MAX_COMPONENT_BITS:
            raise ValueError(f"bits_per_dimension must lie in (0, {MAX_COMPONENT_BITS}], got {bits_per_dimension}.")
        sample = sample.astype(np.float64)
        mean = sample.mean(axis=0)
        variances, basis = np.linalg.eigh(np.cov(sample, rowvar=False))
        variances, basis = variances[::-1], basis[:, ::-1]
        # Directions without variance come out of eigh with ~1e-16 of the largest, not 0: no bits for them.
        variances = np.where(variances > _NO_VARIANCE * variances.max(initial=0), variances, 0.0)
        # A query's score moves by its component times the error: weigh each error by the mean square of a query along
        # it, the corpus's (its variance plus its mean's share).
        query_weights = variances + (mean @ basis) ** 2
        widths = _allocate_bits(variances * query_weights, round(bits_per_dimension * len(mean)))
        order = np.argsort(-widths, kind="stable")  # the widest codes first: each width's codes in one slice
        widths, variances, basis = widths[order], variances[order], basis[:, order]
        half_ranges = np.array([gaussian_optimal_half_range(int(w)) if w else 1.0 for w in widths])
        steps = np.where(widths > 0, half_ranges * np.sqrt(variances) / 2.0 ** np.maximum(widths - 1, 0), 1.0)
        steps = np.maximum(steps, np.finfo(np.float32).tiny)
        return cls(mean, basis, widths, steps, _binary_rotation(sample))

    @property
    def bytes_per_vector(self) -> int:
        return math.ceil(self.total_bits / 8)

    def encode(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        """Packed codes, uint8 ``[N, bytes_per_vector]``, of embeddings ``[N, dim]``."""
        embeddings = self._check(embeddings)
        return np.concatenate(
            [self._pack(self._unsigned_codes(block)) for block in _blocks(embeddings)]
            or [np.empty((0, self.bytes_per_vector), np.uint8)]
        )

    def components(self, codes: np.ndarray) -> np.ndarray:
        """The principal components (float32 ``[N, dim]``, the mean's included) that packed ``codes`` stand for."""
        if codes.ndim != 2 or codes.dtype != np.uint8 or codes.shape[1] != self.bytes_per_vector:
            raise ValueError(
                f"Expected packed PCA codes, uint8 [N, {self.bytes_per_vector}] (PCACodes.encode), got {codes.dtype} "
                f"{codes.shape}."
            )
        parts = [self._components(block) for block in _blocks(codes)] or [np.empty((0, self.dimension), np.float32)]
        return np.concatenate(parts)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """The embeddings (float32 ``[N, dim]``) that packed ``codes`` stand for."""
        return self.components(codes) @ self.basis.T

    def sign_bits(self, codes: np.ndarray) -> np.ndarray:
        """The binary codes (sentence-transformers' ``ubinary`` layout, sign bit ``>= 0``) of the embeddings
        ``codes`` stand for, in the rotated basis (:attr:`binary_rotation`): an index's first pass, from its store."""
        return np.packbits(self.components(codes) @ self._components_to_bits >= 0, axis=1)

    def query_bits(self, queries: torch.Tensor) -> np.ndarray:
        """Binary codes of float queries, as :meth:`sign_bits` gives the store's."""
        return np.packbits(queries.detach().cpu().float().numpy() @ self.binary_rotation >= 0, axis=1)

    def rescoring_documents(self, codes: np.ndarray) -> torch.Tensor:
        """What :meth:`rescoring_queries` are scored against: the unit vectors ``codes`` stand for, in the principal
        basis (the basis is orthonormal: dot products are those of the embeddings, without rotating every row back)."""
        return F.normalize(torch.from_numpy(self.components(codes)), dim=-1)

    def rescoring_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Float queries ``[Q, dim]`` as unit vectors in the principal basis."""
        return F.normalize(queries.float().cpu(), dim=-1) @ torch.from_numpy(self.basis)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "basis": self.basis, "widths": self.widths, "steps": self.steps}
        save_file({**tensors, "binary_rotation": self.binary_rotation}, str(folder / WEIGHTS_FILE))
        description = {"dimension": self.dimension, "bits_per_vector": self.total_bits}
        (folder / CONFIG_FILE).write_text(json.dumps(description, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> PCACodes:
        tensors = load_file(str(Path(folder) / WEIGHTS_FILE))
        return cls(tensors["mean"], tensors["basis"], tensors["widths"], tensors["steps"], tensors["binary_rotation"])

    def _check(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().cpu().float().numpy()
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dimension:
            raise ValueError(f"Expected embeddings [N, {self.dimension}], got shape {embeddings.shape}.")
        if not np.isfinite(embeddings).all():
            raise ValueError("Embeddings with NaN or infinite values have no codes: check the model's output.")
        return embeddings

    def _unsigned_codes(self, embeddings: np.ndarray) -> np.ndarray:
        components = (embeddings - self.mean) @ self.basis
        codes = np.floor(components / self.steps).astype(np.int64) + self._offsets
        return np.clip(codes, 0, np.maximum(2**self.widths - 1, 0))

    def _pack(self, unsigned: np.ndarray) -> np.ndarray:
        # Each group of components of one width as bit planes: the top bit of each of its codes, then the next...
        planes = [
            (unsigned[:, None, columns] >> np.arange(width - 1, -1, -1)[:, None])
            .astype(np.uint8)
            .reshape(len(unsigned), -1)
            & 1
            for width, columns in self._groups
        ]
        return np.packbits(np.concatenate(planes or [np.empty((len(unsigned), 0), np.uint8)], axis=1), axis=1)

    def _components(self, packed: np.ndarray) -> np.ndarray:
        # Each width's codes shifted and or-ed in a tensor of their own, the narrowest that holds them, in torch: 4x
        # numpy's shift-or into a uint16 array's columns (12,000 of the student's rows: 7.7 vs 30 ms, 2 cores).
        bits = torch.from_numpy(np.unpackbits(packed, axis=1, count=self.total_bits))
        values = torch.from_numpy(self._code_origin).expand(len(packed), -1).clone()
        steps, start = torch.from_numpy(self.steps), 0
        for width, columns in self._groups:
            size = columns.stop - columns.start
            planes = bits[:, start : start + width * size].view(len(packed), width, size)
            codes = planes[:, 0].to(torch.uint8 if width <= 8 else torch.int16, copy=True)  # up to 12 bits
            for plane in range(1, width):
                codes.bitwise_left_shift_(1).bitwise_or_(planes[:, plane])
            values[:, columns] += codes * steps[columns]
            start += width * size
        return values.numpy()


def _allocate_bits(error_weights: np.ndarray, total_bits: int) -> np.ndarray:
    """Widths (bits per component, summing to at most ``total_bits``) that minimise
    ``sum(error_weights * mse(width))``, ``mse`` the Gaussian least-MSE of a uniform quantizer relative to the variance
    (1 with no bits: the mean), by giving each next bit to the component whose weighted error it lowers most (optimal:
    the gains of successive bits decrease)."""
    mse = np.array([1.0] + [gaussian_least_mse(bits) for bits in range(1, MAX_COMPONENT_BITS + 1)] + [0.0])
    widths = np.zeros(len(error_weights), dtype=np.int64)
    for _ in range(total_bits):
        gains = np.where(widths < MAX_COMPONENT_BITS, error_weights * (mse[widths] - mse[widths + 1]), -1.0)
        best = int(gains.argmax())
        if gains[best] <= 0:  # every component with any variance at its widest
            break
        widths[best] += 1
    return widths


def _binary_rotation(sample: np.ndarray) -> np.ndarray:
    """Iterative quantization (Gong & Lazebnik, 2011): from a random rotation, alternately the sign bits ``B`` of the
    rotated sample and the rotation ``R`` closest to mapping the sample onto them (orthogonal Procrustes: ``U V^T`` of
    ``X^T B``'s SVD), each step lowering ``||B - X R||``: the rotated coordinates sit far from 0, where a vector and
    its near neighbours agree on the sign."""
    random = np.random.default_rng(0).standard_normal((sample.shape[1], sample.shape[1]))
    rotation = np.linalg.qr(random)[0]
    for _ in range(_ROTATION_ITERATIONS):
        left, _, right = np.linalg.svd(sample.T @ np.sign(sample @ rotation))
        rotation = left @ right
    return rotation


def _blocks(rows: np.ndarray) -> list[np.ndarray]:
    return [rows[start : start + _ROWS_PER_BLOCK] for start in range(0, len(rows), _ROWS_PER_BLOCK)]
