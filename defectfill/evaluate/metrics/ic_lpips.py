"""Intra-cluster LPIPS (Ojha et al. 2021, used by DFMGAN and DefectFill).

Plain pairwise LPIPS over all generated images rewards a generator that copies
each reference image once. IC-LPIPS instead groups every generated image with
its nearest reference image (by LPIPS), takes the mean pairwise LPIPS among the
generated images of each group, and averages these over the groups: a generator
that only reproduces its references scores near 0.

DFMGAN's implementation (the one DefectFill's numbers follow) reports two
values, and so does this module:

- `value`, the headline (DFMGAN's `clpips`): the mean over every reference's
  cluster, where a cluster with fewer than two images (no pair) counts as 0.
  A generator that sends everything to a few references is penalised for the
  empty clusters, which is what IC-LPIPS is meant to measure;
- `value_excluding_singletons` (DFMGAN's `clpips_rz`): the mean over the
  clusters that hold a pair only.

Cluster cap: as in DFMGAN, a cluster keeps its first `max_per_cluster` (200)
generated images in the order given; later ones are dropped (and counted), so
pairwise work stays bounded. With no cluster holding a pair both values are
undefined and the record says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from defectfill.core.errors import DefectFillError

DFMGAN_CLUSTER_CAP = 200  # DFMGAN keeps at most this many generated images per cluster

# distance(a, b) with a, b of shape (N, 3, H, W) in [-1, 1] -> (N,) distances of the pairs (a[i], b[i])
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lpips_distance_fn(model: torch.nn.Module | None = None, device: str | torch.device = "cpu") -> Distance:
    """The package's LPIPS (AlexNet) as a `Distance`; loads it when no model is given."""
    from defectfill.model.lpips import load_lpips, lpips_distance

    model = model if model is not None else load_lpips(device=device)

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return lpips_distance(model, a.to(device), b.to(device)).cpu()

    return distance


@torch.no_grad()
def _pair_distances(distance: Distance, a: torch.Tensor, b: torch.Tensor, pairs: list[tuple[int, int]],
                    batch_size: int) -> torch.Tensor:
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        ia = torch.tensor([i for i, _ in chunk])
        ib = torch.tensor([j for _, j in chunk])
        out.append(distance(a[ia], b[ib]).reshape(-1).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def ic_lpips_details(
    generated: torch.Tensor,
    references: torch.Tensor,
    distance: Distance | None = None,
    batch_size: int = 64,
    max_per_cluster: int = DFMGAN_CLUSTER_CAP,
) -> dict[str, Any]:
    """IC-LPIPS with its clusters, as a JSON-ready record (both of DFMGAN's values, see the module docstring).

    generated (N, 3, H, W) and references (K, 3, H, W), in [-1, 1] for LPIPS.
    Returns {"available": False, "reason": ...} when no cluster holds two images.
    """
    n, k = generated.shape[0], references.shape[0]
    record: dict[str, Any] = {"n_generated": n, "n_references": k, "cluster_cap": max_per_cluster}
    if k < 1:
        record.update(available=False, reason="IC-LPIPS needs at least one reference image; got none.")
        return record
    if n < 2:
        record.update(available=False, reason=f"IC-LPIPS needs at least 2 generated images; got {n}.")
        return record
    if max_per_cluster < 2:
        raise DefectFillError(f"IC-LPIPS: the cluster cap must be at least 2 (got {max_per_cluster}).")
    if generated.shape[1:] != references.shape[1:]:
        raise DefectFillError(
            f"IC-LPIPS: generated images {tuple(generated.shape[1:])} and reference images "
            f"{tuple(references.shape[1:])} differ in shape; resize them to one size first."
        )
    distance = distance if distance is not None else lpips_distance_fn()
    to_ref = _pair_distances(distance, generated, references, [(i, j) for i in range(n) for j in range(k)],
                             batch_size).view(n, k)
    nearest = to_ref.argmin(dim=1)  # ties go to the first reference, deterministically
    cluster_means: list[float | None] = []
    sizes: list[int] = []
    dropped = 0
    for c in range(k):
        members = torch.nonzero(nearest == c).flatten().tolist()
        dropped += max(0, len(members) - max_per_cluster)
        members = members[:max_per_cluster]  # DFMGAN's cap: the first ones in generation order
        sizes.append(len(members))
        pairs = [(members[a], members[b]) for a in range(len(members)) for b in range(a + 1, len(members))]
        if not pairs:
            cluster_means.append(None)
            continue
        cluster_means.append(float(_pair_distances(distance, generated, generated, pairs, batch_size).mean()))
    used = [v for v in cluster_means if v is not None]
    record.update(cluster_sizes=sizes, cluster_means=cluster_means, clusters_used=len(used),
                  dropped_by_cap=dropped)
    if not used:
        record.update(available=False, reason=(
            "IC-LPIPS needs a cluster with at least 2 generated images; every reference image drew at most one "
            f"(cluster sizes {sizes}). Generate more images."
        ))
        return record
    record.update(
        available=True,
        value=sum(used) / k,  # headline: a cluster without a pair counts as 0 (DFMGAN's clpips)
        value_excluding_singletons=sum(used) / len(used),  # DFMGAN's clpips_rz
        headline="value: clusters with fewer than two images count as 0 (DFMGAN's clpips); "
                 "value_excluding_singletons leaves them out (DFMGAN's clpips_rz)",
    )
    return record


def ic_lpips(
    generated: torch.Tensor,
    references: torch.Tensor,
    distance: Distance | None = None,
    batch_size: int = 64,
) -> float:
    """IC-LPIPS of generated images clustered around reference images: the headline value of `ic_lpips_details`.

    Raises DefectFillError when it is undefined (too few images), never returns a made-up number.
    """
    record = ic_lpips_details(generated, references, distance, batch_size)
    if not record["available"]:
        raise DefectFillError(record["reason"])
    return float(record["value"])
