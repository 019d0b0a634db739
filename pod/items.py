"""How an item is written for the model: digit pieces, one token of its own, or a collaborative or semantic code.

A model trained from random weights cannot be expected to learn that the pieces `1 7` and `1 7 3` name
unrelated items: with `digits` (the paper's form) an item is only as learnable as its number's pieces are
composable. The other modes give items vocabulary entries of their own, appended after the
SentencePiece vocabulary and shared by encoder input and decoder output (T5 ties the two embeddings):

- `token`: one token per item (independent indexing): a recommendation is one decoder step and an exact
  top-k over the item columns.
- `collaborative`: Hua et al. 2023 (CID+IID): items that are bought near each other share a prefix of
  cluster tokens, found by recursive spectral clustering of the item co-occurrence graph of the training
  split, and a final token numbers the item inside its leaf cluster. Rare items then borrow statistics from
  their cluster's frequent ones, and the vocabulary grows by a few hundred tokens, not by one per item.
- `semantic`: TIGER (Rajput et al. 2023): residual k-means codes of item embeddings, L levels of C codes
  and a final token that tells apart the items sharing all L of them. TIGER embeds the items' text with a
  pretrained sentence encoder; without pretrained weights we embed the training split's co-occurrence graph
  spectrally, so the codes carry the same collaborative signal as `collaborative`'s, quantized coarse to
  fine instead of clustered top-down (see `ItemIndex.semantic`).

An `ItemIndex` holds each item's code as indices into its own block of extra tokens (0-based); the tokenizer
adds its offset. It is saved as `items.json` beside `spiece.model` (absent file = `digits`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ITEM_MODES = ("digits", "token", "collaborative", "semantic")
ITEMS_FILE = "items.json"
ITEMS_FORMAT = "pod-items"
ITEMS_VERSION = 1

# Collaborative defaults: 16 clusters per level and leaves of at most 64 items give Beauty (12k items) codes
# of 2-3 cluster tokens plus one leaf token, and ~100 extra tokens in all.
DEFAULT_CLUSTERS = 16
DEFAULT_LEAF_SIZE = 64
DEFAULT_WINDOW = 3

# Semantic defaults: TIGER used 3 levels of 256 codes for catalogs of ~10^4-10^5 items. 3 levels of 32 codes
# give 32,768 paths, room for 300 to 20,000 items with few collisions, for 96 level tokens plus a few
# disambiguation tokens; 32 spectral dimensions hold a department structure of a few dozen clusters.
DEFAULT_LEVELS = 3
DEFAULT_CODEBOOK = 32
DEFAULT_DIM = 32
KMEANS_ITERATIONS = 30  # Lloyd steps per level (fewer when the assignment stops changing)
KMEANS_RESTARTS = 3  # k-means++ seedings per level; the one with the lowest squared error is kept


@dataclass
class ItemIndex:
    """Per-item codes over a block of extra vocabulary tokens (empty for `digits`)."""

    mode: str
    codes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    token_names: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ITEM_MODES:
            raise ValueError(f"item ids must be one of {', '.join(ITEM_MODES)}, not {self.mode!r}")
        if self.mode == "digits" and (self.codes or self.token_names):
            raise ValueError("digits items have no extra tokens")

    @property
    def num_tokens(self) -> int:
        """How many vocabulary entries the index adds after the SentencePiece vocabulary."""
        return len(self.token_names)

    @classmethod
    def digits(cls) -> ItemIndex:
        return cls("digits")

    @classmethod
    def token(cls, items: Iterable[int]) -> ItemIndex:
        """One token per item, in item order (`<item_17>`)."""
        ordered = sorted(set(items))
        return cls(
            "token",
            {item: (k,) for k, item in enumerate(ordered)},
            [f"<item_{item}>" for item in ordered],
        )

    @classmethod
    def collaborative(
        cls,
        sequences: Iterable[Sequence[int]],
        items: Iterable[int],
        clusters: int = DEFAULT_CLUSTERS,
        leaf_size: int = DEFAULT_LEAF_SIZE,
        window: int = DEFAULT_WINDOW,
        seed: int = 0,
    ) -> ItemIndex:
        """Cluster paths from the co-occurrence graph of `sequences` (pass the TRAINING part only, or the
        codes leak the validation and test targets), for every item in `items`.

        Tokens: `<c{level}_{cluster}>` for each level and cluster number (shared by all parents at that
        level, as in Hua et al.), then `<i{position}>` for the position inside a leaf. Items never seen in
        training have no edges; they end up clustered together and split in item order.
        """
        if clusters < 2 or leaf_size < 1 or window < 1:
            raise ValueError("collaborative item ids need clusters >= 2, leaf_size >= 1 and window >= 1")
        ordered = sorted(set(items))
        graph = cooccurrence(sequences, ordered, window)
        paths = cluster_paths(graph, clusters, leaf_size, seed)
        depth = max((len(prefix) for prefix, _ in paths), default=0)
        widest = max((pos for _, pos in paths), default=0) + 1
        names = [f"<c{level}_{c}>" for level in range(depth) for c in range(clusters)]
        names += [f"<i{p}>" for p in range(widest)]
        codes = {
            item: tuple(level * clusters + c for level, c in enumerate(prefix)) + (depth * clusters + pos,)
            for item, (prefix, pos) in zip(ordered, paths)
        }
        params = {"clusters": clusters, "leaf_size": leaf_size, "window": window, "seed": seed, "depth": depth}
        return cls("collaborative", codes, names, params)

    @classmethod
    def semantic(
        cls,
        sequences: Iterable[Sequence[int]],
        items: Iterable[int],
        levels: int = DEFAULT_LEVELS,
        codebook: int = DEFAULT_CODEBOOK,
        dim: int = DEFAULT_DIM,
        window: int = DEFAULT_WINDOW,
        seed: int = 0,
    ) -> ItemIndex:
        """TIGER-style semantic IDs (Rajput et al. 2023) from the co-occurrence graph of `sequences` (pass the
        TRAINING part only, or the codes leak the validation and test targets), for every item in `items`.

        Each item gets an embedding (`spectral_embedding`), which residual k-means quantizes: level 0 clusters
        the embeddings into `codebook` codes, level l the residuals left after subtracting the centroids of
        levels < l, so the first token says roughly where an item lies and later ones refine it. A last token
        numbers the items that share all `levels` codes (0, 1, ... in item order), making every ID unique.

        Why a spectral embedding: TIGER quantizes content embeddings from a pretrained sentence encoder, and
        this project trains without pretrained weights. The leading eigenvectors of the training split's
        normalized co-occurrence graph put items bought near each other close together, which is the
        closeness a recommender's codes should share. Items without a co-occurrence in training have no
        embedding to quantize; they get a seeded random code at each level, which spreads them over the paths
        (one shared path would need as many disambiguation tokens as there are such items).

        Tokens: `<s{level}_{code}>` for each level and code (level l's block starts at `l * codebook`), then
        `<u{k}>` for the disambiguation position. All codes have `levels + 1` tokens, so none is a prefix of
        another. Deterministic given the inputs and `seed`.
        """
        if levels < 1 or codebook < 2 or dim < 1 or window < 1:
            raise ValueError("semantic item ids need levels >= 1, codebook >= 2, dim >= 1 and window >= 1")
        ordered = sorted(set(items))
        graph = cooccurrence(sequences, ordered, window)
        vectors, linked = spectral_embedding(graph, dim, seed)
        quantized = np.random.default_rng(seed).integers(codebook, size=(len(ordered), levels))
        if linked.any():
            quantized[linked] = residual_kmeans(vectors[linked], levels, codebook, seed)
        seen: dict[tuple[int, ...], int] = {}
        codes: dict[int, tuple[int, ...]] = {}
        for item, row in zip(ordered, quantized.tolist()):
            prefix = tuple(level * codebook + c for level, c in enumerate(row))
            position = seen.get(prefix, 0)
            seen[prefix] = position + 1
            codes[item] = (*prefix, levels * codebook + position)
        widest = max(seen.values(), default=0)
        names = [f"<s{level}_{c}>" for level in range(levels) for c in range(codebook)]
        names += [f"<u{k}>" for k in range(widest)]
        params = {
            "levels": levels,
            "codebook": codebook,
            "dim": dim,
            "window": window,
            "seed": seed,
            "iterations": KMEANS_ITERATIONS,
            "restarts": KMEANS_RESTARTS,
            "linked_items": int(linked.sum()),  # items with a co-occurrence; the rest got random codes
            "shared_prefixes": sum(1 for n in seen.values() if n > 1),  # L-level paths the last token splits
        }
        return cls("semantic", codes, names, params)

    def to_json(self) -> dict:
        return {
            "format": ITEMS_FORMAT,
            "version": ITEMS_VERSION,
            "mode": self.mode,
            "params": self.params,
            "tokens": self.token_names,
            "codes": {str(item): list(code) for item, code in sorted(self.codes.items())},
        }

    @classmethod
    def from_json(cls, obj: dict) -> ItemIndex:
        if obj.get("format") != ITEMS_FORMAT or obj.get("version", 0) > ITEMS_VERSION:
            raise ValueError(f"not a POD item index (format {obj.get('format')!r}, version {obj.get('version')!r})")
        index = cls(
            obj["mode"],
            {int(k): tuple(v) for k, v in obj.get("codes", {}).items()},
            list(obj.get("tokens", [])),
            dict(obj.get("params", {})),
        )
        bad = [item for item, code in index.codes.items() if not code or max(code) >= index.num_tokens]
        if bad:
            raise ValueError(f"item index: codes of items {bad[:5]} point outside its {index.num_tokens} tokens")
        return index

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> ItemIndex:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{path}: {exc}") from None


def cooccurrence(sequences: Iterable[Sequence[int]], items: Sequence[int], window: int = DEFAULT_WINDOW):
    """Symmetric item graph (scipy CSR, rows in `items` order): items `d <= window` apart in a sequence add
    `1/d`, so direct successors weigh most and items a user bought far apart stay loosely tied."""
    from scipy import sparse

    row_of = {item: k for k, item in enumerate(items)}
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for seq in sequences:
        idx = [row_of[i] for i in seq if i in row_of]
        for d in range(1, window + 1):
            for a, b in zip(idx, idx[d:]):
                if a != b:
                    rows += (a, b)
                    cols += (b, a)
                    vals += (1.0 / d, 1.0 / d)
    n = len(items)
    return sparse.csr_matrix(
        (np.asarray(vals), (np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64))), shape=(n, n)
    )


def cluster_paths(graph, clusters: int, leaf_size: int, seed: int) -> list[tuple[tuple[int, ...], int]]:
    """For each row of `graph`: the cluster numbers from the root down, and its position in its leaf."""
    n = graph.shape[0]
    out: list[tuple[tuple[int, ...], int]] = [((), 0)] * n
    stack: list[tuple[np.ndarray, tuple[int, ...]]] = [(np.arange(n), ())]
    while stack:
        rows, prefix = stack.pop()
        if len(rows) <= leaf_size:
            for pos, r in enumerate(np.sort(rows)):
                out[r] = (prefix, pos)
            continue
        labels = spectral_split(graph[rows][:, rows], min(clusters, len(rows)), seed)
        for c in range(labels.max() + 1):
            stack.append((rows[labels == c], (*prefix, c)))
    return out


def spectral_split(graph, k: int, seed: int) -> np.ndarray:
    """Labels 0..m-1 (m <= k, numbered by decreasing size) from regularized spectral clustering.

    The degree regularization (`d + mean degree`, Qin and Rohe 2013) keeps items with few or no edges from
    producing degenerate eigenvectors. A split that leaves 90% of the rows in one cluster (a graph with
    hardly any edges) falls back to equal slices in spectral order, so the recursion always shrinks.
    """
    from scipy.sparse import diags
    from scipy.sparse.linalg import eigsh
    from sklearn.cluster import KMeans

    n = graph.shape[0]
    degree = np.asarray(graph.sum(axis=1)).ravel()
    tau = max(float(degree.mean()), 1e-6)
    scale = diags(1.0 / np.sqrt(degree + tau))
    norm = (scale @ graph @ scale).tocsr()
    if n <= 800:
        _, vectors = np.linalg.eigh(norm.toarray())
        vectors = vectors[:, -k:]
    else:
        v0 = np.random.default_rng(seed).standard_normal(n)
        _, vectors = eigsh(norm, k=k, which="LA", v0=v0, tol=1e-6)
    lengths = np.linalg.norm(vectors, axis=1, keepdims=True)
    points = np.divide(vectors, lengths, out=np.zeros_like(vectors), where=lengths > 1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fewer distinct clusters than k" is handled below
        labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(points)
    sizes = np.bincount(labels, minlength=k)
    if sizes.max() > 0.9 * n:
        order = np.lexsort((np.arange(n), np.round(vectors[:, -1], 9)))
        labels = np.empty(n, dtype=np.int64)
        for c, part in enumerate(np.array_split(order, k)):
            labels[part] = c
        sizes = np.bincount(labels, minlength=k)
    # renumber by decreasing size (then first row), so codes do not depend on k-means' label order
    ranked = sorted((c for c in range(k) if sizes[c]), key=lambda c: (-sizes[c], int(np.argmax(labels == c))))
    remap = np.full(k, -1, dtype=np.int64)
    remap[ranked] = np.arange(len(ranked))
    return remap[labels]


def spectral_embedding(graph, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Item vectors (rows of `graph`, at most `dim` columns; unit length) and which rows have one (a mask).

    The columns are the leading eigenvectors of the degree-regularized normalized adjacency (as in
    `spectral_split`), without the first, which mostly measures degree, scaled by their eigenvalues (clipped
    at 0), so strong community structure outweighs the noisy tail. Rows are then scaled to unit length:
    what places an item is which items it is bought with, not how often it is bought. Rows without edges
    (items never co-occurring in training) are zero in every such eigenvector, so they stay zero and out of
    the mask. Eigenvector signs are fixed (largest entry positive), so the vectors do not depend on the solver's.
    """
    from scipy.sparse import diags
    from scipy.sparse.linalg import eigsh

    n = graph.shape[0]
    degree = np.asarray(graph.sum(axis=1)).ravel()
    width = max(1, min(dim, n - 2))
    vectors = np.zeros((n, width))
    if n >= 3 and degree.any():
        tau = max(float(degree.mean()), 1e-6)
        scale = diags(1.0 / np.sqrt(degree + tau))
        norm = (scale @ graph @ scale).tocsr()
        k = width + 1
        if n <= 800:
            values, eig = np.linalg.eigh(norm.toarray())
            values, eig = values[-k:], eig[:, -k:]
        else:
            v0 = np.random.default_rng(seed).standard_normal(n)
            values, eig = eigsh(norm, k=k, which="LA", v0=v0, tol=1e-6)
        order = np.argsort(-values, kind="stable")[1:]
        values, eig = values[order], eig[:, order]
        big = np.argmax(np.abs(eig), axis=0)
        eig = eig * np.where(eig[big, np.arange(eig.shape[1])] < 0, -1.0, 1.0)
        vectors = eig * np.clip(values, 0.0, None)
    lengths = np.linalg.norm(vectors, axis=1)
    linked = (degree > 0) & (lengths > 1e-9)
    vectors[linked] /= lengths[linked, None]
    vectors[~linked] = 0.0
    return vectors, linked


def residual_kmeans(points: np.ndarray, levels: int, codebook: int, seed: int) -> np.ndarray:
    """Codes (rows of `points` x `levels`, each in 0..codebook-1) by residual quantization: level l runs
    k-means on what the centroids of levels < l left unexplained, so each level refines the one before."""
    rng = np.random.default_rng(seed)
    residual = np.asarray(points, dtype=np.float64).copy()
    out = np.zeros((len(points), levels), dtype=np.int64)
    if len(points) == 0:
        return out
    for level in range(levels):
        centroids = kmeans(residual, codebook, rng)
        labels = _squared_distances(residual, centroids).argmin(axis=1)
        out[:, level] = labels
        residual -= centroids[labels]
    return out


def kmeans(
    points: np.ndarray,
    k: int,
    rng: np.random.Generator,
    iterations: int = KMEANS_ITERATIONS,
    restarts: int = KMEANS_RESTARTS,
) -> np.ndarray:
    """At most `k` centroids of `points`, the best (lowest squared error) of `restarts` runs of `_lloyd`: one
    seeding can put two centroids in one clump and leave two clumps to share one, and Lloyd steps never
    undo that. Deterministic given `rng`'s state."""
    best, best_error = None, np.inf
    for _ in range(max(1, restarts)):
        centroids = _lloyd(points, k, rng, iterations)
        error = float(_squared_distances(points, centroids).min(axis=1).sum())
        if error < best_error - 1e-12:
            best, best_error = centroids, error
    return best


def _lloyd(points: np.ndarray, k: int, rng: np.random.Generator, iterations: int) -> np.ndarray:
    """k-means++ seeding, then up to `iterations` Lloyd steps (stopping when no point changes cluster). A
    cluster left empty restarts at the point farthest from its centroid, so a codebook's codes stay in use."""
    n = len(points)
    k = min(k, n)
    centroids = np.empty((k, points.shape[1]))
    centroids[0] = points[rng.integers(n)]
    nearest = ((points - centroids[0]) ** 2).sum(axis=1)
    for j in range(1, k):
        total = float(nearest.sum())
        pick = rng.choice(n, p=nearest / total) if total > 1e-12 else int(rng.integers(n))
        centroids[j] = points[pick]
        nearest = np.minimum(nearest, ((points - centroids[j]) ** 2).sum(axis=1))
    labels = None
    for _ in range(iterations):
        distances = _squared_distances(points, centroids)
        new = distances.argmin(axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, points)
        used = counts > 0
        centroids[used] = sums[used] / counts[used, None]
        empty = np.flatnonzero(~used)
        if len(empty):
            far = np.argsort(-distances[np.arange(n), labels], kind="stable")[: len(empty)]
            centroids[empty] = points[far]
    return centroids


def _squared_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(rows x centroids) squared Euclidean distances, without the rows x centroids x dims intermediate."""
    d = (points**2).sum(axis=1)[:, None] - 2.0 * points @ centroids.T + (centroids**2).sum(axis=1)[None, :]
    return np.maximum(d, 0.0)
