"""Realistic video-like sets for issue 100's expected share: moving objects over a scene.

Each set is ``frames x rows x cols`` tokens of dimension ``D`` (N = 768-2048, D = 1024-3584,
8-16 frames), built as a video's projector output is structured, and none of them from
:mod:`benchmarks.share_family`'s generator:

- a static background: every grid position has its own appearance, a smooth (neighbour-
  averaged) combination of a shared low-rank texture basis, so neighbouring positions are
  alike; a slow camera pan shifts it by a fraction of a patch a frame (interpolated; the field is
  periodic);
- ``objects`` (6-16) moving objects: each an ellipse of 2-5 patches across, its own
  appearance subspace (dim 4) with a spatial variation over its extent, moving with its
  own velocity (bouncing off the frame's edges) and changing pose slowly; later objects
  occlude earlier ones;
- a global brightness per frame (1 + 0.03 g), Gaussian noise (``noise``) and a few
  corrupted tokens (a share of their entries moved by a large Gaussian).

:func:`scenes` yields ``(name, kind, make)`` as :func:`benchmarks.share_family.plain_sets`
does; the solves go through :func:`benchmarks.share_family.solve` (cached by the features'
hash).
"""

from __future__ import annotations

import math

import torch

#: (frames, rows, cols, D, objects, seed, noise): 44 sets, N = 768-2048
SCENES = [
    (8, 8, 12, 1024, 6, 0, 0.05), (8, 8, 12, 1024, 8, 1, 0.05), (8, 8, 12, 1024, 10, 2, 0.05),
    (8, 8, 12, 1024, 12, 3, 0.05), (8, 8, 12, 1024, 16, 4, 0.05), (8, 8, 12, 1024, 9, 5, 0.1),
    (8, 8, 12, 1024, 11, 6, 0.1), (8, 8, 12, 1024, 14, 7, 0.1), (8, 8, 12, 1024, 7, 8, 0.2),
    (8, 8, 12, 1024, 13, 9, 0.2), (8, 12, 12, 1024, 8, 10, 0.05), (8, 12, 12, 1024, 12, 11, 0.05),
    (8, 12, 12, 1024, 16, 12, 0.1), (8, 12, 12, 1024, 10, 13, 0.2), (12, 8, 12, 1024, 6, 14, 0.05),
    (12, 8, 12, 1024, 9, 15, 0.05), (12, 8, 12, 1024, 12, 16, 0.1), (12, 8, 12, 1024, 15, 17, 0.1),
    (12, 8, 12, 1024, 8, 18, 0.2), (12, 10, 12, 1024, 11, 19, 0.05),
    (12, 10, 12, 1024, 14, 20, 0.1), (16, 8, 8, 1024, 6, 21, 0.05), (16, 8, 8, 1024, 10, 22, 0.05),
    (16, 8, 8, 1024, 13, 23, 0.1), (16, 8, 8, 1024, 16, 24, 0.2), (16, 8, 12, 1024, 7, 25, 0.05),
    (16, 8, 12, 1024, 12, 26, 0.1), (16, 8, 16, 1024, 9, 27, 0.05), (16, 8, 16, 1024, 15, 28, 0.1),
    (8, 8, 12, 2048, 8, 29, 0.05), (8, 8, 12, 2048, 12, 30, 0.1), (8, 12, 12, 2048, 10, 31, 0.05),
    (12, 8, 12, 2048, 14, 32, 0.1), (16, 8, 8, 2048, 11, 33, 0.05),
    (8, 8, 12, 3584, 6, 34, 0.05), (8, 8, 12, 3584, 10, 35, 0.1), (8, 8, 12, 3584, 16, 36, 0.05),
    (12, 8, 12, 3584, 12, 37, 0.05), (16, 8, 8, 3584, 8, 38, 0.1),
    (8, 8, 12, 1024, 16, 39, 0.02), (8, 12, 12, 1024, 6, 40, 0.02), (12, 8, 12, 1024, 10, 41, 0.02),
    (16, 8, 8, 1024, 12, 42, 0.02), (8, 8, 12, 1024, 8, 43, 0.3),
]  # fmt: skip


def scene(frames: int, rows: int, cols: int, d: int, objects: int, seed: int,
          noise: float = 0.05, corrupt: int = 4) -> torch.Tensor:  # fmt: skip
    """``frames * rows * cols`` x ``d`` float32 tokens of one seeded scene (module docstring),
    frame-major, each frame row-major."""
    g = torch.Generator().manual_seed(10_000 + seed)
    rank = 12
    texture = torch.randn(d, rank, generator=g, dtype=torch.float64) / math.sqrt(rank)
    pad = 4  # the background is wider than the frame, for the pan
    field = torch.randn(rows + 2 * pad, cols + 2 * pad, rank, generator=g, dtype=torch.float64)
    for _ in range(2):  # neighbours alike
        field = (field + field.roll(1, 0) + field.roll(-1, 0) + field.roll(1, 1)
                 + field.roll(-1, 1)) / 5  # fmt: skip
    field = field / field.std()
    pan = (torch.rand(2, generator=g, dtype=torch.float64) - 0.5) * 0.6  # patches per frame
    mean = 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    obj = []
    for _ in range(objects):
        basis = torch.randn(d, 4, generator=g, dtype=torch.float64) / 2.0
        a = torch.randn(4, generator=g, dtype=torch.float64)
        spatial = 0.3 * torch.randn(4, 2, generator=g, dtype=torch.float64)
        centre = torch.rand(2, generator=g, dtype=torch.float64) * torch.tensor([rows, cols])
        vel = (torch.rand(2, generator=g, dtype=torch.float64) - 0.5) * 1.6
        radius = 1.0 + 1.5 * torch.rand(2, generator=g, dtype=torch.float64)
        obj.append([basis, a, spatial, centre, vel, radius])
    rr, cc = torch.meshgrid(torch.arange(rows, dtype=torch.float64),
                            torch.arange(cols, dtype=torch.float64), indexing="ij")  # fmt: skip
    out = []
    for t in range(frames):
        # background at a sub-patch shift: bilinear interpolation of the field
        sr, sc = pad + rr + pan[0] * t, pad + cc + pan[1] * t
        r0, c0 = sr.floor().long(), sc.floor().long()
        fr, fc = (sr - r0)[..., None], (sc - c0)[..., None]
        h, w = field.shape[:2]  # (the field wraps around: a long pan comes round again)
        r1, c1, r0, c0 = (r0 + 1) % h, (c0 + 1) % w, r0 % h, c0 % w
        f = ((1 - fr) * (1 - fc) * field[r0, c0] + (1 - fr) * fc * field[r0, c1]
             + fr * (1 - fc) * field[r1, c0] + fr * fc * field[r1, c1])  # fmt: skip
        tok = f @ texture.T + mean
        for o in obj:
            basis, a, spatial, centre, vel, radius = o
            dr, dc = (rr - centre[0]) / radius[0], (cc - centre[1]) / radius[1]
            inside = dr**2 + dc**2 <= 1.0
            if inside.any():
                coef = a[:, None] + spatial @ torch.stack([dr[inside], dc[inside]])
                tok[inside] = (basis @ coef).T + mean
            o[1] = a + 0.1 * torch.randn(4, generator=g, dtype=torch.float64)  # pose
            nxt = centre + vel
            for i, lim in enumerate((rows, cols)):
                if not 0 <= float(nxt[i]) <= lim - 1:
                    vel[i] = -vel[i]
            o[3] = centre + vel
        tok = tok.reshape(rows * cols, d) * (1 + 0.03 * float(torch.randn(1, generator=g)))
        out.append(tok + noise * torch.randn(rows * cols, d, generator=g, dtype=torch.float64))
    x = torch.cat(out)
    bad = torch.randperm(x.shape[0], generator=g)[:corrupt]
    mask = torch.rand(corrupt, d, generator=g) < 0.05
    x[bad] += mask * 3.0 * torch.randn(corrupt, d, generator=g, dtype=torch.float64)
    return x.to(torch.float32).contiguous()


def scenes():
    """``(name, kind, make)`` of :data:`SCENES`."""
    for f, r, c, d, o, s, noise in SCENES:
        name = f"scene {f}x{r}x{c} D{d} {o} objects seed {s} noise {noise}"
        yield name, "scene", lambda a=(f, r, c, d, o, s, noise): scene(*a)


#: the relative size of the changes of the features each set is re-solved at, and how many
CHANGE, CHANGES = 1e-6, 2


def changed(x: torch.Tensor, seed: int, count: int = CHANGES) -> list[torch.Tensor]:
    """``count`` seeded changes ``x * (1 + CHANGE g)`` of the features, ``g`` standard
    Gaussian."""
    gen = torch.Generator().manual_seed(20_000 + seed)
    return [x * (1 + CHANGE * torch.randn(x.shape, generator=gen, dtype=x.dtype))
            for _ in range(count)]  # fmt: skip
