"""Population activity manifolds: PCA (NumPy SVD) always, UMAP when ``umap-learn`` is installed.

Activity is binned spike counts (``bin_steps`` steps per bin) of one
population. Two views:

* per odor: the open-loop odor panel (:mod:`dmn_neuro.analysis.kc_coding`),
  one point per odor and time bin; how much of the variance lies between odors;
* along trajectories: closed-loop episodes of the intact circuit (left
  hemisphere), one point per episode and time bin; how well the top principal
  components predict the distance to the source (linear fit on half the
  episodes, R^2 on the other half).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

#: Principal components reported.
N_COMPONENTS = 10
#: Components used to predict the distance to the source along trajectories.
N_PREDICT = 5


def umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def pca(x: np.ndarray, k: int = N_COMPONENTS) -> Dict[str, np.ndarray]:
    """PCA of rows ``x`` [samples, features] by SVD: ``components`` [k, features],
    ``scores`` [samples, k], ``explained_variance_ratio`` [k], ``mean``."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    xc = x - mean
    # constant features (e.g. KCs silent throughout) carry no variance: leave them out of the SVD
    live = np.flatnonzero(np.ptp(x, axis=0) > 0) if x.shape[0] else np.arange(0)
    if live.size == 0:
        k = int(max(0, min(k, x.shape[1])))
        return {"components": np.zeros((k, x.shape[1])), "scores": np.zeros((x.shape[0], k)),
                "explained_variance_ratio": np.zeros(k), "mean": mean, "participation_ratio": 0.0}
    _, s, vt_live = np.linalg.svd(xc[:, live], full_matrices=False)
    var = s ** 2
    total = var.sum()
    k = int(min(k, vt_live.shape[0]))
    vt = np.zeros((k, x.shape[1]))
    vt[:, live] = vt_live[:k]
    ratio = var[:k] / total
    return {"components": vt, "scores": xc[:, live] @ vt_live[:k].T, "explained_variance_ratio": ratio,
            "mean": mean, "participation_ratio": float(total ** 2 / (var ** 2).sum())}


def _bin(spikes: np.ndarray, bin_steps: int) -> np.ndarray:
    """[T, B, n] -> [T // bin_steps, B, n] spike counts per bin."""
    t = (spikes.shape[0] // bin_steps) * bin_steps
    s = np.asarray(spikes[:t], dtype=np.float64)
    return s.reshape(t // bin_steps, bin_steps, *s.shape[1:]).sum(1)


def _umap_2d(x: np.ndarray, seed: int = 0) -> Optional[np.ndarray]:
    if not umap_available() or x.shape[0] < 5:
        return None
    import umap

    return umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, x.shape[0] - 1)).fit_transform(x)


def odor_manifold(spikes: Dict[str, np.ndarray], odors: Sequence[str], populations: Sequence[str] = ("PN", "KC", "MBON"),
                  bin_steps: int = 10, use_umap: bool = True) -> Dict[str, Any]:
    """PCA (and UMAP) of each population's binned activity over the odor panel (blank excluded)."""
    n = len(odors)
    out: Dict[str, Any] = {"method": "pca" + ("+umap" if use_umap and umap_available() else ""),
                           "bin_steps": int(bin_steps), "populations": {}}
    for pop in populations:
        if pop not in spikes:
            continue
        b = _bin(spikes[pop][:, :n], bin_steps)  # [bins, odor, n]
        if b.shape[0] == 0:
            continue
        x = b.transpose(1, 0, 2).reshape(n * b.shape[0], -1)  # rows: odor-major
        p = pca(x)
        scores = p["scores"].reshape(n, b.shape[0], -1)
        centroids = scores.mean(1)
        total = float(((x - x.mean(0)) ** 2).sum())
        cm = b.mean(0)  # [odor, n]
        between = float(((cm - cm.mean(0)) ** 2).sum() * b.shape[0])
        entry = {
            "explained_variance_ratio": [float(v) for v in p["explained_variance_ratio"]],
            "participation_ratio": p["participation_ratio"],
            "between_odor_variance_fraction": between / total if total > 0 else None,
            "odor_centroids_pc123": {o: [float(v) for v in c[:3]] for o, c in zip(odors, centroids)},
            "_scores": scores,
        }
        if use_umap:
            emb = _umap_2d(x)
            if emb is not None:
                e = emb.reshape(n, b.shape[0], 2).mean(1)
                entry["umap_odor_centroids"] = {o: [float(v) for v in c] for o, c in zip(odors, e)}
        out["populations"][pop] = entry
    if use_umap and not umap_available():
        out["umap"] = "not computed: umap-learn is not installed (pip install umap-learn)"
    return out


def _r2(y: np.ndarray, yhat: np.ndarray) -> Optional[float]:
    ss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - yhat) ** 2).sum()) / ss if ss > 0 else None


def trajectory_manifold(rollouts: List, populations: Sequence[str] = ("KC", "MBON"), bin_steps: int = 10,
                        use_umap: bool = True) -> Dict[str, Any]:
    """PCA of each population's binned activity along closed-loop episodes (left
    hemisphere), and how well its top :data:`N_PREDICT` components predict the
    distance to the source (fit on even episodes, R^2 on odd ones)."""
    dist_l, acts = [], {p: [] for p in populations}
    for ro in rollouts:
        pos = ro.positions.detach().cpu().numpy()[1:]  # [T, B, 3], position after each step
        src = ro.source.detach().cpu().numpy()
        b = pos.shape[1]
        d = np.linalg.norm(pos[..., :2] - src[None, :, :2], axis=-1)  # [T, B]
        dist_l.append(_bin(d[..., None], bin_steps)[..., 0] / bin_steps)
        for p in populations:
            if p in ro.activations:
                acts[p].append(_bin(ro.activations[p].detach().cpu().numpy()[:, :b], bin_steps))
    if not dist_l:
        return {"available": False}
    dist = np.concatenate(dist_l, axis=1)  # [bins, episodes]
    n_bins, n_ep = dist.shape
    out: Dict[str, Any] = {"method": "pca" + ("+umap" if use_umap and umap_available() else ""),
                           "bin_steps": int(bin_steps), "episodes": int(n_ep), "bins_per_episode": int(n_bins),
                           "distance_fit": f"linear regression of distance to source on the top {N_PREDICT} PCs; "
                                           "fit on even episodes, R^2 on odd ones", "populations": {}}
    y = dist.T.reshape(-1)  # episode-major
    ep = np.repeat(np.arange(n_ep), n_bins)
    for p, chunks in acts.items():
        if not chunks:
            continue
        a = np.concatenate(chunks, axis=1)  # [bins, episodes, n]
        x = a.transpose(1, 0, 2).reshape(n_ep * n_bins, -1)
        pc = pca(x)
        k = min(N_PREDICT, pc["scores"].shape[1])
        design = np.concatenate([pc["scores"][:, :k], np.ones((x.shape[0], 1))], axis=1)
        train, test = ep % 2 == 0, ep % 2 == 1
        r2 = None
        if train.sum() > k + 1 and test.any():
            coef, *_ = np.linalg.lstsq(design[train], y[train], rcond=None)
            r2 = _r2(y[test], design[test] @ coef)
        corr = [float(np.corrcoef(pc["scores"][:, i], y)[0, 1]) if np.ptp(pc["scores"][:, i]) > 0 and np.ptp(y) > 0
                else None for i in range(min(3, pc["scores"].shape[1]))]
        entry = {"explained_variance_ratio": [float(v) for v in pc["explained_variance_ratio"]],
                 "participation_ratio": pc["participation_ratio"], "distance_r2_heldout": r2,
                 "pc_corr_with_distance": corr, "_scores": pc["scores"].reshape(n_ep, n_bins, -1), "_distance": dist.T}
        if use_umap:
            emb = _umap_2d(x)
            if emb is not None:
                entry["_umap"] = emb.reshape(n_ep, n_bins, 2)
        out["populations"][p] = entry
    return out


def strip_private(obj):
    """``obj`` without keys starting with ``_`` (arrays kept for figures), recursively."""
    if isinstance(obj, dict):
        return {k: strip_private(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [strip_private(v) for v in obj]
    return obj
