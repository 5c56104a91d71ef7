"""Feature reads for trainers: everything a snapshot pins as NumPy / PyTorch, plus BPR and full-ranking datasets.

`FeatureReader(workspace, snapshot)` holds only the workspace URI, the snapshot name and the NumPy arrays it has
loaded, so it pickles into `DataLoader` workers; workers never open Lance (its runtime does not survive a fork),
they only cut batches from arrays. Ids are the split's contiguous maps (sorted string ids, as every graph uses).

    >>> reader = FeatureReader("./mmfeat-data", "ml100k-v1")
    >>> text, has_text = reader.feature("text")            # float32 [n_items, d], bool [n_items]
    >>> adj = reader.graph("main_ui_sym")                  # torch sparse [n_users + n_items]^2
    >>> sid, has_sid = reader.semantic_ids("text_rq")      # int64 [n_items, levels + 1]: codes, then suffix
    >>> loader = reader.bpr(batch_size=2048, features=["text"]).loader(num_workers=2)  # persistent, spawn
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from stores import artifacts
from stores.features import feature_table
from stores.snapshots import check_snapshot
from stores.workspace import Workspace

PARTS = {"train": 0, "valid": 1, "test": 2}


def _part_label(part: str) -> int:
    if part not in PARTS:
        raise ValueError(f"split part {part!r}; expected one of {list(PARTS)}")
    return PARTS[part]


def _index(values: pa.ChunkedArray | pa.Array, ids: np.ndarray, what: str) -> np.ndarray:
    idx = pc.index_in(values, value_set=pa.array(ids, pa.string()))
    if idx.null_count:
        bad = pc.filter(values, pc.is_null(idx)).to_pylist()[:3]
        raise KeyError(
            f"{what} ids {bad} are not in the snapshot's id map; the table does not belong to its split"
        )
    return idx.to_numpy(zero_copy_only=False).astype(np.int64)


class FeatureReader:
    """Read-only view of one snapshot: id maps, feature matrices, split parts and graphs, loaded lazily and cached."""

    def __init__(self, workspace: Workspace | str | os.PathLike, snapshot: str):
        ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
        self.uri = ws.uri
        self.storage_options = ws.storage_options
        self.snapshot = snapshot
        self._manifest: dict | None = None
        self._arrays: dict[str, object] = {}

    def __repr__(self) -> str:
        return f"FeatureReader({self.uri!r}, {self.snapshot!r})"

    def __getstate__(self) -> dict:
        return {
            "uri": self.uri,
            "storage_options": self.storage_options,
            "snapshot": self.snapshot,
            "manifest": self._manifest,
            "arrays": self._arrays,
        }

    def __setstate__(self, state: dict) -> None:
        self.uri, self.storage_options, self.snapshot = (
            state["uri"],
            state["storage_options"],
            state["snapshot"],
        )
        self._manifest, self._arrays = state["manifest"], state["arrays"]

    def _ws(self) -> Workspace:
        return Workspace(self.uri, self.storage_options)

    @property
    def manifest(self) -> dict:
        """The snapshot's manifest, checked once: an invalidated or stale snapshot raises `SnapshotError`."""
        if self._manifest is None:
            self._manifest = check_snapshot(self._ws(), self.snapshot)
        return self._manifest

    def _cached(self, key: str, load):
        if key not in self._arrays:
            self._arrays[key] = load()
        return self._arrays[key]

    # ---- ids and interactions ----------------------------------------------------------------------------------

    def _split(self) -> dict[str, np.ndarray]:
        def load() -> dict[str, np.ndarray]:
            from stores.ids import id_maps

            info = self.manifest
            table = f"split_{info['split']}"
            split = self._ws().read(
                table, columns=["user_id", "item_id", "label"], version=info["tables"][table]
            )
            users, items = id_maps(split)
            return {
                "users": users,
                "items": items,
                "user": _index(split["user_id"], users, "user"),
                "item": _index(split["item_id"], items, "item"),
                "label": split["label"].to_numpy(zero_copy_only=False).astype(np.int8),
            }

        return self._cached("split", load)

    @property
    def users(self) -> np.ndarray:
        """User ids; position = contiguous user index."""
        return self._split()["users"]

    @property
    def items(self) -> np.ndarray:
        """Item ids; position = contiguous item index (the row of every feature matrix)."""
        return self._split()["items"]

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def user_index(self, ids: list[str] | np.ndarray) -> np.ndarray:
        return _index(pa.array(list(ids), pa.string()), self.users, "user")

    def item_index(self, ids: list[str] | np.ndarray) -> np.ndarray:
        return _index(pa.array(list(ids), pa.string()), self.items, "item")

    def interaction_arrays(self, part: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """(user, item) int64 index arrays of one split part ("train", "valid" or "test"), in split row order."""
        s = self._split()
        rows = s["label"] == _part_label(part)
        return s["user"][rows], s["item"][rows]

    def interactions(self, part: str = "train") -> torch.Tensor:
        """int64 tensor [n, 2] of (user, item) indices of one split part."""
        u, i = self.interaction_arrays(part)
        return torch.from_numpy(np.stack([u, i], axis=1))

    def positives(self, parts: str | tuple[str, ...] = "train") -> sp.csr_matrix:
        """Binary users x items CSR of the interactions in `parts` (repeated pairs count once)."""
        parts = (parts,) if isinstance(parts, str) else tuple(parts)

        def load() -> sp.csr_matrix:
            us, its = zip(*(self.interaction_arrays(p) for p in parts), strict=True) if parts else ((), ())
            u = np.concatenate(us) if us else np.zeros(0, np.int64)
            i = np.concatenate(its) if its else np.zeros(0, np.int64)
            mat = sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(self.n_users, self.n_items))
            mat.sum_duplicates()
            mat.data[:] = 1.0
            return mat

        return self._cached("positives:" + ",".join(parts), load)

    # ---- features -------------------------------------------------------------------------------------------------

    def feature_array(self, feature: str) -> tuple[np.ndarray, np.ndarray]:
        """float32 [n_items, d] vectors of `feature` aligned to `items` (zero rows where missing) and the bool mask.
        A zero row is a placeholder: `stores.missing.fill_missing(matrix, mask, "mean")` gives MMRec's fill."""
        feature = feature.removeprefix(artifacts.VECTOR_PREFIX)
        if feature not in self.manifest["features"]:
            raise KeyError(
                f"feature {feature!r} is not in snapshot {self.snapshot!r}; it pins "
                f"{self.manifest['features'] or 'no features'}"
            )

        def load() -> tuple[np.ndarray, np.ndarray]:
            table = feature_table(feature)
            matrix, mask, _ = artifacts.feature_matrix(
                self._ws(), feature, self.items, self.manifest["tables"][table]
            )
            return matrix, mask

        return self._cached(f"feature:{feature}", load)

    def feature(self, feature: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 tensor [n_items, d], bool tensor [n_items]) for `feature`; rows without a vector are zero."""
        matrix, mask = self.feature_array(feature)
        return torch.from_numpy(matrix), torch.from_numpy(mask)

    def semantic_id_array(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """int64 [n_items, levels + 1]: each item's semantic-ID codes, then its collision suffix (-1 for an item
        without codes), and the bool mask of the items that have them (`mmfeat semantic-ids --name NAME`).

        Read at the version the snapshot pins (`mmfeat snapshot create ... --semantic-ids NAME`), so rebuilding
        the codes later changes nothing this reader serves."""
        pinned = self.manifest.get("semantic_ids", [])
        if name not in pinned:
            raise KeyError(
                f"semantic IDs {name!r} are not in snapshot {self.snapshot!r}; it pins {pinned}. Create a "
                f"snapshot with `--semantic-ids {name}`"
            )

        def load() -> tuple[np.ndarray, np.ndarray]:
            table = self.manifest["semantic_id_manifests"][name]["table"]
            codes = self._ws().read(
                table, columns=["item_id", "codes", "suffix"], version=self.manifest["tables"][table]
            )
            return artifacts.semantic_id_matrix(codes, self.items)

        return self._cached(f"semantic_ids:{name}", load)

    def semantic_ids(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 tensor [n_items, levels + 1], bool tensor [n_items]): `semantic_id_array` as tensors."""
        codes, mask = self.semantic_id_array(name)
        return torch.from_numpy(codes), torch.from_numpy(mask)

    # ---- graphs ---------------------------------------------------------------------------------------------------

    def graph_names(self, node_kind: str | None = None) -> list[str]:
        """Graphs in the snapshot, optionally only those over `node_kind` ("user+item", "item" or "user")."""
        infos = self.manifest["graph_manifests"]
        return [g for g in self.manifest["graphs"] if node_kind is None or infos[g]["node_kind"] == node_kind]

    def graph_matrix(self, name: str) -> sp.csr_matrix:
        """A pinned graph as SciPy CSR over users then items ("user+item"), items or users, by index."""
        if name not in self.manifest["graphs"]:
            raise KeyError(
                f"graph {name!r} is not in snapshot {self.snapshot!r}; it pins {self.manifest['graphs']}"
            )

        def load() -> sp.csr_matrix:
            info = self.manifest["graph_manifests"][name]
            table = info["table"]
            if info.get("layout") == artifacts.UI_PAIRS:  # train pairs, normalised on read
                pairs = self._ws().read(table, columns=["src", "dst"], version=self.manifest["tables"][table])
                return artifacts.ui_pairs_matrix(pairs, self.users, self.items, info["params"]["norm"])
            edges = self._ws().read(table, version=self.manifest["tables"][table])
            kind = info["node_kind"]
            nu, ni = self.n_users, self.n_items
            ends = []
            for side in ("src", "dst"):
                if kind == "item":
                    ends.append(_index(edges[side], self.items, "item"))
                elif kind == "user":
                    ends.append(_index(edges[side], self.users, "user"))
                else:  # users and items may share ids: index each kind in its own range
                    is_user = pc.equal(edges[f"{side}_kind"], "user")
                    idx = np.empty(edges.num_rows, np.int64)
                    mask = is_user.to_numpy(zero_copy_only=False)
                    idx[mask] = _index(edges[side].filter(is_user), self.users, "user")
                    idx[~mask] = nu + _index(edges[side].filter(pc.invert(is_user)), self.items, "item")
                    ends.append(idx)
            n = {"item": ni, "user": nu}.get(kind, nu + ni)
            weight = edges["weight"].to_numpy().astype(np.float32)
            return sp.csr_matrix((weight, (ends[0], ends[1])), shape=(n, n), dtype=np.float32)

        return self._cached(f"graph:{name}", load)

    def graph(self, name: str) -> torch.Tensor:
        """A pinned graph as a coalesced float32 torch sparse COO tensor."""
        coo = self.graph_matrix(name).tocoo()
        indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
        return torch.sparse_coo_tensor(
            indices, torch.from_numpy(coo.data), coo.shape, check_invariants=True
        ).coalesce()

    # ---- datasets -------------------------------------------------------------------------------------------------

    def bpr(
        self, batch_size: int = 2048, features: list[str] | tuple[str, ...] = (), seed: int = 0
    ) -> BprDataset:
        return BprDataset(self, batch_size=batch_size, features=features, seed=seed)

    def user_batches(
        self, part: str = "test", batch_size: int = 256, exclude: tuple[str, ...] = ("train",)
    ) -> UserBatches:
        return UserBatches(self, part=part, batch_size=batch_size, exclude=exclude)


def pair_keys(user: np.ndarray, item: np.ndarray, n_items: int) -> np.ndarray:
    """Sorted unique int64 keys user * n_items + item: a compact set of (user, item) pairs for membership tests."""
    return np.unique(user.astype(np.int64) * n_items + item.astype(np.int64))


def sample_negatives(
    rng: np.random.Generator, user: np.ndarray, n_items: int, pos_keys: np.ndarray, max_rounds: int = 64
) -> np.ndarray:
    """One uniformly drawn item per user that is not among the user's positives (`pos_keys`, see `pair_keys`).

    Rejection sampling in whole arrays; the rare user left after `max_rounds` (one who interacted with almost every
    item) draws from an explicit complement.
    """
    neg = rng.integers(0, n_items, size=len(user), dtype=np.int64)
    todo = np.arange(len(user))
    for _ in range(max_rounds):
        keys = user[todo] * n_items + neg[todo]
        at = np.minimum(np.searchsorted(pos_keys, keys), len(pos_keys) - 1)
        todo = todo[pos_keys[at] == keys] if len(pos_keys) else todo[:0]
        if not len(todo):
            return neg
        neg[todo] = rng.integers(0, n_items, size=len(todo), dtype=np.int64)
    for j in todo:
        lo, hi = np.searchsorted(pos_keys, [user[j] * n_items, (user[j] + 1) * n_items])
        free = np.setdiff1d(np.arange(n_items), pos_keys[lo:hi] - user[j] * n_items)
        if not len(free):
            raise ValueError(f"user index {user[j]} interacted with all {n_items} items; no negative exists")
        neg[j] = rng.choice(free)
    return neg


class BprDataset(Dataset):
    """BPR triples in whole batches: element `b` of the current epoch is a dict of int64 tensors `user`, `pos`,
    `neg` [<= batch_size] and, per requested feature F, float32 rows `pos_F` and `neg_F` [.., d].

    Negatives are drawn uniformly among items the user has no train interaction with, from a generator seeded by
    (seed, epoch, b), so the batches are the same whatever the number of workers or their order. Use `loader()`
    for worker processes (spawn-started, persistent, feature rows gathered in the caller's process), or
    `DataLoader(ds, batch_size=None, num_workers=k)` and call `set_epoch(e)` before each epoch. An index
    `(epoch, b)` reads batch `b` of that epoch whatever `set_epoch` said last. `pairs` (user, item index arrays)
    replaces the train part, as positives and as the exclusion set: an unlearning retain set.
    """

    def __init__(
        self,
        reader: FeatureReader,
        batch_size: int = 2048,
        features: list[str] | tuple[str, ...] = (),
        seed: int = 0,
        pairs: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size}; expected a positive number")
        self.user, self.item = reader.interaction_arrays("train") if pairs is None else pairs
        self.user, self.item = np.asarray(self.user, np.int64), np.asarray(self.item, np.int64)
        self.n_items = reader.n_items
        self.pos_keys = pair_keys(self.user, self.item, self.n_items)
        self.features = {f: reader.feature_array(f)[0] for f in features}
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self._perm: tuple[int, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_perm": None}  # a worker redraws the permutation rather than receive it

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.user) // self.batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.user)))
        return self._perm[1]

    def indices(self, b: int | tuple[int, int]) -> dict[str, np.ndarray]:
        """int64 arrays `user`, `pos`, `neg` of batch `b` (or `(epoch, b)`), without feature rows."""
        epoch, b = b if isinstance(b, tuple) else (self.epoch, b)
        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} out of range (0..{len(self) - 1})")
        rows = self._order(epoch)[b * self.batch_size : (b + 1) * self.batch_size]
        user, pos = self.user[rows], self.item[rows]
        neg = sample_negatives(
            np.random.default_rng([self.seed, epoch, b]), user, self.n_items, self.pos_keys
        )
        return {"user": user, "pos": pos, "neg": neg}

    def with_features(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """`indices`' arrays as tensors plus the feature rows `pos_F`/`neg_F` gathered from the matrices."""
        out = {k: torch.from_numpy(v) for k, v in batch.items()}
        for name, matrix in self.features.items():
            out[f"pos_{name}"] = torch.from_numpy(matrix.take(batch["pos"], axis=0))
            out[f"neg_{name}"] = torch.from_numpy(matrix.take(batch["neg"], axis=0))
        return out

    def __getitem__(self, b: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        return self.with_features(self.indices(b))

    def loader(
        self, num_workers: int = 2, multiprocessing_context: str | None = "spawn", prefetch_factor: int = 4
    ) -> BprLoader:
        """Batches of this dataset read by `num_workers` persistent worker processes; see `BprLoader`."""
        return BprLoader(self, num_workers, multiprocessing_context, prefetch_factor)


class _Indices(Dataset):
    """What a worker holds: the interaction arrays and positive keys, no feature matrices. Element `(epoch, b)`
    is `BprDataset.indices` as NumPy arrays, which cross the worker pipe as ~100 KB instead of ~30 MB of rows."""

    def __init__(self, ds: BprDataset):
        self.ds = BprDataset.__new__(BprDataset)
        self.ds.__dict__.update({**ds.__dict__, "features": {}, "_perm": None})

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, np.ndarray]:
        return self.ds.indices(key)


class _EpochBatches(Sampler):
    """Yields `(epoch, b)` for every batch, reading the dataset's epoch when an epoch starts: the epoch travels
    with each index, so `set_epoch` in the main process reaches persistent workers."""

    def __init__(self, ds: BprDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __iter__(self):
        epoch = self.ds.epoch
        return ((epoch, b) for b in range(len(self.ds)))


def _as_is(batch):
    return batch  # keep the worker's NumPy arrays: pickled inline, no shared-memory segment per tensor


class BprLoader:
    """Iterates `BprDataset`'s batches of its current epoch (the same batches as `ds[b]`, in order) with worker
    processes that live as long as the loader: they start once (spawn by default, since Lance is not fork-safe;
    they never open the workspace), receive the interaction arrays once, draw the negatives and send back only
    index arrays; the feature rows are gathered here from the matrices already in memory.

        >>> loader = reader.bpr(batch_size=4096, features=["text"]).loader(num_workers=2)
        >>> for epoch in range(10):
        ...     loader.dataset.set_epoch(epoch)
        ...     for batch in loader: ...
        >>> loader.close()

    `num_workers=0` reads in the calling process.
    """

    def __init__(
        self,
        ds: BprDataset,
        num_workers: int = 2,
        multiprocessing_context: str | None = "spawn",
        prefetch_factor: int = 4,
    ):
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers}; expected 0 or more")
        self.dataset = ds
        workers = (
            {}
            if num_workers == 0
            else {
                "multiprocessing_context": multiprocessing_context,
                "persistent_workers": True,
                "prefetch_factor": prefetch_factor,
            }
        )
        self._loader = DataLoader(
            _Indices(ds),
            batch_size=None,
            sampler=_EpochBatches(ds),
            num_workers=num_workers,
            collate_fn=_as_is,
            **workers,
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        for batch in self._loader:
            yield self.dataset.with_features(batch)

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage-collected)."""
        it = self._loader._iterator
        self._loader._iterator = None
        if it is not None:
            it._shutdown_workers()


class UserBatches(Dataset):
    """Full-ranking evaluation batches (MMRec's all-ranking protocol). Element `b` is a dict: `user` [B] indices,
    `exclude_row`/`exclude_item` (positions in the batch and items to mask, the users' train items) and
    `truth_row`/`truth_item` (the held-out items to find). Only users with at least one held-out item appear."""

    def __init__(
        self,
        reader: FeatureReader | None = None,
        part: str = "test",
        batch_size: int = 256,
        exclude: tuple[str, ...] = ("train",),
        *,
        truth: sp.csr_matrix | None = None,
        exclude_matrix: sp.csr_matrix | None = None,
    ):
        if truth is None:
            if reader is None:
                raise ValueError("give a reader (and part) or a truth matrix")
            truth = reader.positives(part)
            exclude_matrix = reader.positives(tuple(exclude)) if exclude else None
        self.truth = sp.csr_matrix(truth)
        self.exclude = sp.csr_matrix(exclude_matrix) if exclude_matrix is not None else None
        self.user_ids = np.flatnonzero(np.diff(self.truth.indptr)).astype(np.int64)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.user_ids) // self.batch_size)

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} out of range (0..{len(self) - 1})")
        users = self.user_ids[b * self.batch_size : (b + 1) * self.batch_size]
        out = {"user": torch.from_numpy(users)}
        for name, mat in (("truth", self.truth), ("exclude", self.exclude)):
            if mat is None:
                rows = cols = np.zeros(0, np.int64)
            else:
                sub = mat[users].tocoo()
                rows, cols = sub.row.astype(np.int64), sub.col.astype(np.int64)
            out[f"{name}_row"], out[f"{name}_item"] = torch.from_numpy(rows), torch.from_numpy(cols)
        return out
