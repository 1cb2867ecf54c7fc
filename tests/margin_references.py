"""Independent restatements of every margin, for the tests: plain dense single-process torch
in float64, written from the papers' formulas and the reference repositories' documented
behaviour (see docs/losses.md), not from losses/.

Each reference takes the *whole* batch: cosines [N, C] (already the max over sub-centres),
labels [N], and where needed the un-normalised embedding norms [N]; it returns the logits
and, for the stateful ones, the new state. `reference_loss` adds the cross-entropy and any
regulariser.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _onehot(cos, labels):
    return F.one_hot(labels, cos.shape[1]).bool()


def _target(cos, labels):
    return cos.gather(1, labels.unsqueeze(1)).squeeze(1)


def combined(cos, labels, s, m1, m2, m3):
    theta = torch.acos(_target(cos, labels))
    theta_max = min(math.pi, (math.pi - m2) / m1)
    inside = torch.cos(m1 * theta + m2) - m3
    # beyond theta_max: linear in cos from the value at theta_max (this project's documented rule)
    beyond = math.cos(m1 * theta_max + m2) - m3 + (torch.cos(theta) - math.cos(theta_max))
    target = torch.where(theta <= theta_max, inside, beyond)
    return torch.where(_onehot(cos, labels), target.unsqueeze(1), cos) * s


def adaface(cos, labels, norms, s, m, h, t_alpha, mean, std):
    eps = 1e-3
    cos = cos.clamp(-1 + eps, 1 - eps)
    n = norms.detach().clamp(0.001, 100)
    mean = t_alpha * n.mean() + (1 - t_alpha) * mean
    centred = n - n.mean()
    std_now = torch.sqrt((centred * centred).sum() / (n.numel() - 1))  # unbiased
    std = t_alpha * std_now + (1 - t_alpha) * std
    scaler = torch.clamp(h * (n - mean) / (std + eps), -1, 1)
    angle = torch.clamp(torch.acos(_target(cos, labels)) - m * scaler, eps, math.pi - eps)
    target = torch.cos(angle) - m - m * scaler
    return torch.where(_onehot(cos, labels), target.unsqueeze(1), cos) * s, (mean, std)


def magface(cos, labels, norms, s, l_a, u_a, l_m, u_m, lambda_g):
    a = norms.clamp(l_a, u_a)
    margin = l_m + (a - l_a) * (u_m - l_m) / (u_a - l_a)
    c = _target(cos, labels)
    target = torch.where(c > 0, torch.cos(torch.acos(c) + margin), c)
    logits = torch.where(_onehot(cos, labels), target.unsqueeze(1), cos) * s
    regulariser = lambda_g * (a / u_a**2 + 1 / a).mean()
    return logits, regulariser


def curricularface(cos, labels, s, m, t):
    c = _target(cos, labels)
    with_margin = torch.cos(torch.acos(c) + m)
    target = torch.where(c > math.cos(math.pi - m), with_margin, c - m * math.sin(m))
    t = 0.01 * c.detach().mean() + 0.99 * t
    hard = cos > with_margin.detach().unsqueeze(1)
    negatives = torch.where(hard, cos * (t + cos), cos)
    return torch.where(_onehot(cos, labels), target.unsqueeze(1), negatives) * s, t


def elastic_draws(seed_generator: torch.Generator, n, m, std):
    """The contract of the draws: n values of torch.normal(m, std) in float64 from a CPU generator."""
    return torch.normal(m, std, (n,), generator=seed_generator, dtype=torch.float64)


def elasticface(cos, labels, s, margins, angular, plus):
    c = _target(cos, labels)
    if plus:
        # the reference's indexing: row i gets sorted_margins[order[i]], order = rows by cosine, descending
        order = torch.argsort(c.detach(), descending=True, stable=True)
        margins = torch.sort(margins).values[order]
    target = torch.cos(torch.acos(c) + margins) if angular else c - margins
    return torch.where(_onehot(cos, labels), target.unsqueeze(1), cos) * s


def dense_cosines(embeddings, centres, num_subcenters=1):
    """[N, C] cosines; with K sub-centres (rows c*K + k) the max over each class's K."""
    cos = F.normalize(embeddings) @ F.normalize(centres).t()
    if num_subcenters > 1:
        cos = cos.view(cos.shape[0], -1, num_subcenters).max(dim=2).values
    return cos


def reference_loss(name, params, embeddings, centres, labels, num_subcenters, state):
    """(loss, new state) of loss `name` on the whole batch; `state` is the margin state before."""
    cos = dense_cosines(embeddings, centres, num_subcenters)
    norms = torch.linalg.vector_norm(embeddings, dim=1)
    extra = 0.0
    if name in ("combined", "arcface", "cosface"):
        m1, m2, m3 = {"combined": lambda p: (p["m1"], p["m2"], p["m3"]),
                      "arcface": lambda p: (1.0, p["m"], 0.0),
                      "cosface": lambda p: (1.0, 0.0, p["m"])}[name](params)
        logits = combined(cos, labels, params["s"], m1, m2, m3)
    elif name == "adaface":
        logits, state = adaface(cos, labels, norms, **params, mean=state[0], std=state[1])
    elif name == "magface":
        logits, extra = magface(cos, labels, norms, **params)
    elif name == "curricularface":
        logits, state = curricularface(cos, labels, **params, t=state)
    elif name.startswith("elasticface"):
        generator = state
        margins = elastic_draws(generator, labels.shape[0], params["m"], params["std"])
        logits = elasticface(cos, labels, params["s"], margins, name == "elasticface_arc", params["plus"])
    else:
        raise KeyError(name)
    return F.cross_entropy(logits, labels) + extra, state


def initial_state(name, seed=0):
    if name == "adaface":
        return (torch.tensor(20.0, dtype=torch.float64), torch.tensor(100.0, dtype=torch.float64))
    if name == "curricularface":
        return torch.tensor(0.0, dtype=torch.float64)
    if name.startswith("elasticface"):
        return torch.Generator().manual_seed(seed)
    return None
