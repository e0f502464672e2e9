"""Intra-cluster LPIPS (Ojha et al. 2021, used by DFMGAN and DefectFill).

Plain pairwise LPIPS over all generated images rewards a generator that copies
each reference image once. IC-LPIPS instead groups every generated image with
its nearest reference image (by LPIPS), takes the mean pairwise LPIPS among the
generated images of each group, and averages these over the groups: a generator
that only reproduces its references scores near 0.

A group with fewer than two generated images has no pair, so no value; it is
left out of the average and reported (as in the reference implementations,
whose per-cluster mean is undefined there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from defectfill.errors import DefectFillError

# distance(a, b) with a, b of shape (N, 3, H, W) in [-1, 1] -> (N,) distances of the pairs (a[i], b[i])
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lpips_distance_fn(model: torch.nn.Module | None = None, device: str | torch.device = "cpu") -> Distance:
    """The package's LPIPS (AlexNet) as a `Distance`; loads it when no model is given."""
    from defectfill.metrics.lpips import load_lpips, lpips_distance

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
) -> dict[str, Any]:
    """IC-LPIPS with its clusters, as a JSON-ready record.

    generated (N, 3, H, W) and references (K, 3, H, W), in [-1, 1] for LPIPS.
    Returns {"available": False, "reason": ...} when no cluster holds two images.
    """
    n, k = generated.shape[0], references.shape[0]
    record: dict[str, Any] = {"n_generated": n, "n_references": k}
    if k < 1:
        record.update(available=False, reason="IC-LPIPS needs at least one reference image; got none.")
        return record
    if n < 2:
        record.update(available=False, reason=f"IC-LPIPS needs at least 2 generated images; got {n}.")
        return record
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
    for c in range(k):
        members = torch.nonzero(nearest == c).flatten().tolist()
        sizes.append(len(members))
        pairs = [(members[a], members[b]) for a in range(len(members)) for b in range(a + 1, len(members))]
        if not pairs:
            cluster_means.append(None)
            continue
        cluster_means.append(float(_pair_distances(distance, generated, generated, pairs, batch_size).mean()))
    used = [v for v in cluster_means if v is not None]
    record.update(cluster_sizes=sizes, cluster_means=cluster_means, clusters_used=len(used))
    if not used:
        record.update(available=False, reason=(
            "IC-LPIPS needs a cluster with at least 2 generated images; every reference image drew at most one "
            f"(cluster sizes {sizes}). Generate more images."
        ))
        return record
    record.update(available=True, value=sum(used) / len(used))
    return record


def ic_lpips(
    generated: torch.Tensor,
    references: torch.Tensor,
    distance: Distance | None = None,
    batch_size: int = 64,
) -> float:
    """IC-LPIPS of generated images clustered around reference images (see `ic_lpips_details`).

    Raises DefectFillError when it is undefined (too few images), never returns a made-up number.
    """
    record = ic_lpips_details(generated, references, distance, batch_size)
    if not record["available"]:
        raise DefectFillError(record["reason"])
    return float(record["value"])
