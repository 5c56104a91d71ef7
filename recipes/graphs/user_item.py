"""User-item graphs from the train part of a split, normalised as MMRec's models expect them.

Nodes are all users then all items of the split (contiguous ids from `id_maps`, items offset by n_users),
so validation- and test-only nodes exist but carry no edge: only label == 0 rows become edges.

    >>> adj = ui_adjacency(split, norm="sym")      # FREEDOM / LightGCN input
    >>> edges = csr_to_edges(adj)                   # Arrow (src, dst, weight) for storage
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from stores.bipartite import Norm, bipartite, normalize, rw_normalize_self_loops, sym_normalize
from stores.ids import sorted_codes

if TYPE_CHECKING:
    import torch

# the normalisations live in stores/bipartite.py (stored graphs are normalised on read); named here for recipes
__all__ = [
    "EDGE_SCHEMA",
    "Norm",
    "bipartite",
    "csr_to_edges",
    "edges_table",
    "edges_to_csr",
    "normalize",
    "rw_normalize_self_loops",
    "sym_normalize",
    "to_torch_sparse",
    "train_matrix",
    "ui_adjacency",
]

EDGE_SCHEMA = pa.schema(
    [
        pa.field("src", pa.int32(), nullable=False),
        pa.field("dst", pa.int32(), nullable=False),
        pa.field("weight", pa.float32(), nullable=False),
    ]
)


def train_matrix(split: pa.Table) -> sp.csr_matrix:
    """Binary users x items matrix of the train rows, shaped by all users/items of the split.

    Rows and columns are the contiguous ids of `id_maps(split)`. Repeated (user, item) pairs collapse to 1,
    as in FREEDOM's dict-built adjacency.
    """
    if "label" not in split.column_names:
        raise ValueError(
            "expected a split (a table with a 'label' column); run recipes.splits.make_split first"
        )
    u, _ = sorted_codes(split["user_id"], with_uniques=False)
    i, _ = sorted_codes(split["item_id"], with_uniques=False)
    shape = (int(u.max()) + 1 if len(u) else 0, int(i.max()) + 1 if len(i) else 0)
    train = pc.fill_null(pc.equal(split["label"], 0), False).to_numpy(zero_copy_only=False)
    mat = sp.csr_matrix(
        (np.ones(int(train.sum()), dtype=np.float32), (u[train], i[train])), shape=shape, dtype=np.float32
    )
    mat.sum_duplicates()
    mat.data[:] = 1.0
    return mat


def ui_adjacency(split: pa.Table, norm: Norm = "sym") -> sp.csr_matrix:
    """User-item adjacency over (n_users + n_items) nodes from the split's train rows only.

    norm: "none" raw binary bipartite A; "sym" D^-1/2 A D^-1/2 with degree + 1e-7 (FREEDOM, LightGCN,
    BM3, ... in MMRec); "lattice" D^-1 (A + I) (LATTICE).
    """
    return normalize(bipartite(train_matrix(split)), norm)


def to_torch_sparse(mat: sp.spmatrix) -> torch.Tensor:
    """A coalesced float32 torch sparse COO tensor of a SciPy matrix (what MMRec's models hold)."""
    import torch

    coo = sp.coo_matrix(mat)
    indices = torch.from_numpy(np.vstack((coo.row, coo.col)).astype(np.int64))
    values = torch.from_numpy(coo.data.astype(np.float32))
    return torch.sparse_coo_tensor(indices, values, coo.shape, check_invariants=True).coalesce()


def edges_table(src: np.ndarray, dst: np.ndarray, weight: np.ndarray) -> pa.Table:
    """Arrow edge table (src int32, dst int32, weight float32); raises past int32 node ids."""
    for name, arr in (("src", src), ("dst", dst)):
        if len(arr) and int(np.max(arr)) >= 2**31:
            raise ValueError(
                f"{name} node id {int(np.max(arr))} exceeds int32; graphs here hold < 2^31 nodes"
            )
    return pa.table(
        [
            pa.array(np.asarray(src, dtype=np.int32)),
            pa.array(np.asarray(dst, dtype=np.int32)),
            pa.array(np.asarray(weight, dtype=np.float32)),
        ],
        schema=EDGE_SCHEMA,
    )


def csr_to_edges(mat: sp.spmatrix) -> pa.Table:
    """Edge table of a sparse matrix, one row per stored entry, row-major order."""
    csr = sp.csr_matrix(mat)
    csr.sum_duplicates()
    src = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
    return edges_table(src, csr.indices, csr.data)


def edges_to_csr(edges: pa.Table, shape: tuple[int, int] | int) -> sp.csr_matrix:
    """Sparse float32 matrix of an edge table; `shape` is (rows, cols) or the node count of a square graph.

    Repeated (src, dst) rows are summed.
    """
    if isinstance(shape, int):
        shape = (shape, shape)
    src = edges["src"].to_numpy()
    dst = edges["dst"].to_numpy()
    weight = edges["weight"].to_numpy().astype(np.float32)
    mat = sp.csr_matrix((weight, (src, dst)), shape=shape, dtype=np.float32)
    mat.sum_duplicates()
    return mat
