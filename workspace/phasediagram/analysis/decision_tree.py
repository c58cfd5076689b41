"""A depth-limited binary decision tree grown by the Gini rule (CART), in numpy.

For samples x_i (rows of X) with classes y_i in {0, ..., k-1}, a node holding the set S has the
Gini impurity G(S) = 1 - sum_c p_c^2, p_c the share of class c in S. Growing a node tries every
feature j and every threshold t halfway between two consecutive distinct values of x_j in S,
splitting S into L = {x_j <= t} and R = {x_j > t}, and keeps the split of least weighted impurity
(|L| G(L) + |R| G(R)) / |S| (the first feature, then the lowest threshold, among equal ones). A node
becomes a leaf when it is pure, at the depth limit, or when no split lowers its impurity. A leaf
predicts its majority class (the lowest class index among equal counts). These are the choices of
scikit-learn's ``DecisionTreeClassifier(criterion="gini", max_depth=d)`` (which breaks ties between
features at random), which the tests compare against. One more step, which changes no prediction:
a split whose two children are leaves of the same class is replaced by a leaf, so that the printed
tree shows only the questions that decide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Node:
    """A leaf (``feature`` None) or a split ``x[feature] <= threshold`` -> ``left``, else ``right``;
    ``counts`` holds the training samples of each class that reached the node."""

    counts: tuple[int, ...]
    feature: int | None = None
    threshold: float = float("nan")
    left: Node | None = None
    right: Node | None = None

    @property
    def label(self) -> int:
        return int(np.argmax(self.counts))


def gini(counts: np.ndarray) -> np.ndarray:
    """Gini impurity of each row of class counts (rows summing to 0 give 0)."""
    counts = np.atleast_2d(counts).astype(float)
    n = counts.sum(axis=1, keepdims=True)
    return 1.0 - ((counts / np.maximum(n, 1.0)) ** 2).sum(axis=1)


def best_split(x: np.ndarray, onehot: np.ndarray) -> tuple[float, float] | None:
    """(weighted impurity, threshold) of the best split of one feature, or None if x is constant."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    left = np.cumsum(onehot[order], axis=0)[:-1]
    right = left[-1] + onehot[order[-1]] - left
    n_left = np.arange(1, len(x))
    impurity = (n_left * gini(left) + (len(x) - n_left) * gini(right)) / len(x)
    valid = xs[1:] > xs[:-1]
    if not valid.any():
        return None
    i = int(np.argmin(np.where(valid, impurity, np.inf)))
    return float(impurity[i]), float((xs[i] + xs[i + 1]) / 2)


def fit_tree(X: np.ndarray, y: np.ndarray, max_depth: int, n_classes: int | None = None) -> Node:
    """The tree of the module docstring for samples X (n x features) with integer classes y."""
    X = np.asarray(X, float)
    y = np.asarray(y, int)
    k = int(n_classes if n_classes is not None else y.max() + 1)
    onehot = np.eye(k, dtype=int)[y]
    counts = onehot.sum(axis=0)
    node = Node(counts=tuple(int(c) for c in counts))
    if max_depth <= 0 or np.count_nonzero(counts) < 2:
        return node
    best = None
    for j in range(X.shape[1]):
        split = best_split(X[:, j], onehot)
        if split is not None and (best is None or split[0] < best[0]):
            best = (split[0], j, split[1])
    if best is None or not best[0] < gini(counts)[0]:
        return node
    _, j, t = best
    go_left = X[:, j] <= t
    left = fit_tree(X[go_left], y[go_left], max_depth - 1, k)
    right = fit_tree(X[~go_left], y[~go_left], max_depth - 1, k)
    if left.feature is None and right.feature is None and left.label == right.label:
        return node
    return Node(counts=node.counts, feature=j, threshold=t, left=left, right=right)


def predict_tree(node: Node, X: np.ndarray) -> np.ndarray:
    """The class index the tree gives each row of X."""
    X = np.asarray(X, float)
    out = np.empty(len(X), dtype=int)
    for i, x in enumerate(X):
        n = node
        while n.feature is not None:
            n = n.left if x[n.feature] <= n.threshold else n.right
        out[i] = n.label
    return out


def render(node: Node, features: list[str], classes: list[str], condition=None, indent: str = "") -> list[str]:
    """The tree as indented text lines: ``if <feature> <= t:`` ... ``else:`` ... and leaves
    ``-> class  (count of each class)``; ``condition(feature name, t)``, if given, words the test."""
    counts = ", ".join(f"{n} {c}" for c, n in zip(classes, node.counts))
    if node.feature is None:
        return [f"{indent}-> {classes[node.label]}  ({counts})"]
    name = features[node.feature]
    test = condition(name, node.threshold) if condition else f"{name} <= {node.threshold:.4g}"
    return ([f"{indent}if {test}:  ({counts})"]
            + render(node.left, features, classes, condition, indent + "    ")
            + [f"{indent}else:"]
            + render(node.right, features, classes, condition, indent + "    "))
