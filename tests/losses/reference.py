"""Independent numpy float64 formulas written from the papers (not from jkd's code).

Each function takes one example (1-D logits) or loops over examples itself, so that no
broadcasting trick of the code under test is shared with the reference.
"""

import numpy as np


def softmax(z, T=1.0):
    z = np.asarray(z, np.float64) / T
    e = np.exp(z - z.max())
    return e / e.sum()


def kl(p, q):
    """KL(p || q) = sum p log(p/q), with 0 log 0 = 0."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    m = p > 0
    return float(np.sum(p[m] * (np.log(p[m]) - np.log(q[m]))))


def per_example(fn, *arrays):
    """Apply a 1-D reference over the leading axes of same-leading-shape arrays."""
    lead = np.shape(arrays[0])[:-1]
    out = np.zeros(lead, np.float64)
    for ix in np.ndindex(*lead):
        out[ix] = fn(*(np.asarray(a)[ix] for a in arrays))
    return out


# Hinton et al. 2015: T^2 KL(softmax(t/T) || softmax(s/T)).
def soft_kd(s, t, T):
    return T * T * kl(softmax(t, T), softmax(s, T))


# The classic blend: w * sum (p - q)^2 + (1 - w) * (-sum p log q).
def blended(s, t, T, w):
    p, q = softmax(t, T), softmax(s, T)
    return w * np.sum((p - q) ** 2) + (1 - w) * (-np.sum(p * np.log(q)))


# Cross-entropy with label smoothing (Szegedy et al. 2016): y = (1-e) onehot + e/K.
def cross_entropy(z, label, eps=0.0):
    K = len(z)
    y = np.full(K, eps / K)
    y[int(label)] += 1 - eps
    return -np.sum(y * np.log(softmax(z)))


# DeiT hard distillation: CE against argmax of the teacher.
def hard_kd(s, t, eps=0.0):
    return cross_entropy(s, int(np.argmax(t)), eps)


# DKD (Zhao et al. 2022), eqs. 1-7: b = [p_t, p_\t], p_hat over non-target classes.
def dkd(s, t, label, alpha, beta, T):
    label = int(label)
    ps, pt = softmax(s, T), softmax(t, T)
    bs = np.array([ps[label], 1 - ps[label]])
    bt = np.array([pt[label], 1 - pt[label]])
    rest = [k for k in range(len(s)) if k != label]
    ps_hat = ps[rest] / ps[rest].sum()
    pt_hat = pt[rest] / pt[rest].sum()
    return T * T * (alpha * kl(bt, bs) + beta * kl(pt_hat, ps_hat))


# FitNets hint (mean form): mean over the feature of (u - v)^2.
def hint(u, v):
    return float(np.mean((np.asarray(u, np.float64) - np.asarray(v, np.float64)) ** 2))


# Attention transfer (Zagoruyko & Komodakis 2017), one example A of shape [H, W, C]:
# Q = sum_c |A_c|^p (mean over c after normalising is the same), vectorised, L2-normalised.
def attention_transfer(a_s, a_t, p=2.0):
    def q(a):
        a = np.asarray(a, np.float64)
        m = np.zeros(a.shape[:2])
        for ch in range(a.shape[2]):
            m += np.abs(a[:, :, ch]) ** p
        v = m.reshape(-1)
        return v / np.linalg.norm(v)

    return float(np.mean((q(a_s) - q(a_t)) ** 2))


# Top-k sparse targets: teacher renormalised over its k classes, student over all classes.
def topk_soft_kd(s, t_vals, t_idx, T):
    p = softmax(t_vals, T)
    q = softmax(s, T)[np.asarray(t_idx)]
    return T * T * float(np.sum(p * (np.log(p) - np.log(q))))
