"""Interpretable students: a decision tree, a rule list and a sparse linear model, each fitted
two ways on flat (N, F) inputs in the user's own units:

    labels     the model fitted to the training labels alone (the baseline)
    distilled  the same model fitted to the teacher: its probabilities (a multi-output regression
               tree; a Lasso on its centred logits) or its top-1 labels (the rule list), over the
               training inputs plus `generated` samples drawn near them and labelled by the teacher
               (born-again trees / model compression: Bucilua et al. 2006, Breiman & Shang 1996)

STUDENTS is the table of kinds. Every fitted student is a plain scikit-learn estimator (a
DecisionTreeClassifier / DecisionTreeRegressor, or a Pipeline of StandardScaler and a linear
model): skops saves it with nothing but scikit-learn types, and skl2onnx converts it. The rule
list (imodels' GreedyRuleListClassifier, two classes) is rebuilt as the chain-shaped tree it is,
checked to predict the same on the training inputs.

`scores(estimator, x)` -> (N, C): class scores whose argmax is the prediction, for every kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from stillroom.errors import StillroomError


@dataclass(frozen=True)
class Fitting:
    """What a student is fitted on: inputs (N, F) in the user's units, and either class ids (N,)
    or the teacher's targets for those inputs."""

    inputs: np.ndarray
    labels: np.ndarray | None = None
    """(N,) class ids (the labels alone, or the teacher's top-1 classes)."""
    probabilities: np.ndarray | None = None
    """(N, C) teacher probabilities, softmax(logits / T)."""
    logits: np.ndarray | None = None
    """(N, C) teacher logits."""


@dataclass(frozen=True)
class StudentKind:
    """One row of STUDENTS: how to fit it on labels and on the teacher, how to say its size and
    its rules. `size(est)` -> {"depth", "leaves", "rules", "nonzeros"} (None where not defined)."""

    fit_labels: Callable[[Fitting, int, dict[str, Any]], Any]
    fit_teacher: Callable[[Fitting, int, dict[str, Any]], Any]
    size: Callable[[Any], dict[str, int | None]]
    rules: Callable[[Any, list[str], list[str]], str]
    summary: str


# --- the decision tree ---------------------------------------------------------------------------


def _tree_labels(fit: Fitting, classes: int, opts: dict[str, Any]) -> Any:
    from sklearn.tree import DecisionTreeClassifier

    assert fit.labels is not None
    tree = DecisionTreeClassifier(
        max_depth=opts["max_depth"], min_samples_leaf=opts["min_samples_leaf"], random_state=0
    )
    return tree.fit(fit.inputs, fit.labels)


def _tree_teacher(fit: Fitting, classes: int, opts: dict[str, Any]) -> Any:
    from sklearn.tree import DecisionTreeRegressor

    # a regression tree on the probabilities: each split is chosen to tell apart what the teacher
    # believes, dark knowledge included, not only its top-1 class
    assert fit.probabilities is not None
    tree = DecisionTreeRegressor(
        max_depth=opts["max_depth"], min_samples_leaf=opts["min_samples_leaf"], random_state=0
    )
    return tree.fit(fit.inputs, fit.probabilities)


def _tree_size(est: Any) -> dict[str, int | None]:
    tree = est.tree_
    return {
        "depth": int(tree.max_depth),
        "leaves": int(tree.n_leaves),
        "rules": int(tree.n_leaves),  # one root-to-leaf path per leaf
        "nonzeros": None,
    }


def _tree_rules(est: Any, features: list[str], classes: list[str]) -> str:
    """Every node as an indented if/else, each leaf naming its class and share."""
    tree = est.tree_
    lines: list[str] = []

    def leaf(node: int) -> str:
        value = tree.value[node].reshape(-1)
        share = value / value.sum() if value.sum() > 0 else value
        k = int(np.argmax(share))
        return f"class {classes[k]} ({share[k]:.2f}, {int(tree.n_node_samples[node])} samples)"

    def walk(node: int, indent: str) -> None:
        if tree.children_left[node] < 0:
            lines.append(f"{indent}-> {leaf(node)}")
            return
        name, threshold = features[tree.feature[node]], tree.threshold[node]
        lines.append(f"{indent}if {name} <= {threshold:.4g}:")
        walk(int(tree.children_left[node]), indent + "    ")
        lines.append(f"{indent}else:  # {name} > {threshold:.4g}")
        walk(int(tree.children_right[node]), indent + "    ")

    walk(0, "")
    return "\n".join(lines)


# --- the rule list -------------------------------------------------------------------------------


def _rule_list(labels: np.ndarray, inputs: np.ndarray, classes: int, opts: dict[str, Any]) -> Any:
    from imodels import GreedyRuleListClassifier

    if classes != 2:
        raise StillroomError(
            f"student rule_list (imodels' GreedyRuleListClassifier) separates two classes and the "
            f"data has {classes}; drop rule_list from students.kinds for this data"
        )
    present = np.unique(labels)
    if len(present) != 2:
        raise StillroomError(
            f"student rule_list: the targets it is fitted on hold only class {present.tolist()}; "
            "it needs samples of both classes"
        )
    rules = GreedyRuleListClassifier(max_depth=opts["max_depth"])
    rules.fit(inputs, labels.astype(np.int64))
    chain = rules_as_tree(rules.rules_, inputs.shape[1])
    # the chain deploys in place of the rule list: it must route every training input the same
    same = np.argmax(chain.predict_proba(inputs.astype(np.float32)), 1) == rules.predict(inputs)
    assert same.mean() > 0.99, f"rule list rebuilt as a tree disagrees on {1 - same.mean():.3f}"
    return chain


def _rules_labels(fit: Fitting, classes: int, opts: dict[str, Any]) -> Any:
    assert fit.labels is not None
    return _rule_list(fit.labels, fit.inputs, classes, opts)


def _rules_teacher(fit: Fitting, classes: int, opts: dict[str, Any]) -> Any:
    assert fit.labels is not None  # the teacher's top-1 classes on real and generated inputs
    return _rule_list(fit.labels, fit.inputs, classes, opts)


def rules_as_tree(rules: list[dict[str, Any]], features: int) -> Any:
    """imodels' greedy rule list (rules_: "if x[col] >= cutoff (or < with flip) then P(class 1)
    = val_right, else the next rule; the last one's val") as the scikit-learn classifier tree of
    the same shape: each rule a node with one leaf child and the rest of the list as the other."""
    from imodels.util.sklearn_export import build_sklearn_tree

    left, right, feature, threshold, value = [], [], [], [], []

    def node(f: int, t: float, p: float | None) -> int:
        left.append(-1), right.append(-1), feature.append(f), threshold.append(t)
        value.append([1 - p, p] if p is not None else [0.5, 0.5])
        return len(left) - 1

    previous: tuple[int, str] | None = None  # (node, which child the rest of the list goes to)
    for j, rule in enumerate(rules):
        last = j == len(rules) - 1
        if last:
            me = node(-2, -2.0, float(rule["val"]))
        else:
            # scikit-learn sends x left when x <= t (in float32): "x < cutoff" is x <= the float32
            # just below cutoff
            cutoff = float(np.nextafter(np.float32(rule["cutoff"]), np.float32(-np.inf)))
            me = node(int(rule["index_col"]), cutoff, None)
        if previous is not None:
            parent, side = previous
            (left if side == "left" else right)[parent] = me
        if last:
            break
        hit = node(-2, -2.0, float(rule["val_right"]))
        if rule["flip"]:  # x < cutoff fires the rule: its leaf on the left, the rest right
            left[me], previous = hit, (me, "right")
        else:  # x >= cutoff fires it: the leaf on the right
            right[me], previous = hit, (me, "left")
    order = _preorder(left, right)  # scikit-learn's trees list each child after its parent
    remap = {old: new for new, old in enumerate(order)}
    return build_sklearn_tree(
        [remap[left[i]] if left[i] >= 0 else -1 for i in order],
        [remap[right[i]] if right[i] >= 0 else -1 for i in order],
        [feature[i] for i in order],
        [threshold[i] for i in order],
        [value[i] for i in order],
        classes=np.array([0, 1]),
        n_features_in=features,
    )


def _preorder(left: list[int], right: list[int]) -> list[int]:
    order, stack = [], [0]
    while stack:
        i = stack.pop()
        order.append(i)
        if left[i] >= 0:
            stack += [right[i], left[i]]
    return order


def _rules_size(est: Any) -> dict[str, int | None]:
    size = _tree_size(est)
    return {**size, "rules": size["leaves"] - 1}  # the default (else) is no rule


def _rules_text(est: Any, features: list[str], classes: list[str]) -> str:
    """The chain read as a list: IF condition THEN class (P) ELSE IF ... ELSE class."""
    tree, lines, node = est.tree_, [], 0
    while tree.children_left[node] >= 0:
        left, right = int(tree.children_left[node]), int(tree.children_right[node])
        name, threshold = features[tree.feature[node]], float(tree.threshold[node])
        fires_left = tree.children_left[left] < 0
        hit, rest = (left, right) if fires_left else (right, left)
        op = "<=" if fires_left else ">"
        p = tree.value[hit].reshape(-1)
        k = int(np.argmax(p))
        word = "IF" if node == 0 else "ELSE IF"
        # the rebuilt chain keeps no sample counts: each rule says its class and probability
        lines.append(f"{word} {name} {op} {threshold:.4g} THEN class {classes[k]} ({p[k]:.2f})")
        node = rest
    p = tree.value[node].reshape(-1)
    k = int(np.argmax(p))
    lines.append(f"ELSE class {classes[k]} ({p[k]:.2f})")
    return "\n".join(lines)


# --- the sparse linear model ---------------------------------------------------------------------


def _linear_labels(fit: Fitting, classes: int, opts: dict[str, Any]) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    assert fit.labels is not None
    model = LogisticRegression(
        l1_ratio=1.0, C=opts["C"], solver="saga", max_iter=opts["max_iter"], tol=1e-3
    )
    pipe = Pipeline([("scale", StandardScaler()), ("model", model)])
    return _quiet_fit(pipe, fit.inputs, fit.labels)


def _linear_teacher(fit: Fitting, classes: int, opts: dict[str, Any]) -> Any:
    from sklearn.linear_model import Lasso
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    # logits are defined up to a constant per sample: centred, the Lasso fits what ranks classes
    assert fit.logits is not None
    target = fit.logits - fit.logits.mean(1, keepdims=True)
    model = Lasso(alpha=opts["lasso_alpha"], max_iter=opts["max_iter"], tol=1e-3)
    pipe = Pipeline([("scale", StandardScaler()), ("model", model)])
    return _quiet_fit(pipe, fit.inputs, target)


def _quiet_fit(estimator: Any, x: np.ndarray, y: np.ndarray) -> Any:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():  # max_iter is the recipe's budget; the fit is what it is
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        return estimator.fit(x, y)


def _coefficients(est: Any) -> tuple[np.ndarray, np.ndarray]:
    """(coef (C, F), intercept (C,)) of a linear pipeline; one row for two-class logistic."""
    model = est.named_steps["model"]
    coef = np.atleast_2d(model.coef_)
    return coef, np.atleast_1d(model.intercept_).reshape(len(coef))


def _linear_size(est: Any) -> dict[str, int | None]:
    coef, _ = _coefficients(est)
    return {
        "depth": None,
        "leaves": None,
        "rules": None,
        "nonzeros": int(np.count_nonzero(coef)),
    }


def _linear_text(est: Any, features: list[str], classes: list[str]) -> str:
    """Each class's score as its non-zero terms, largest first, over z-scored features."""
    coef, intercept = _coefficients(est)
    scaler = est.named_steps["scale"]
    lines = ["score of each class (z = (feature - mean) / std, the training split's):"]
    names = classes[1:] if len(coef) == 1 else classes
    for row, bias, name in zip(coef, intercept, names, strict=True):
        order = np.argsort(-np.abs(row))
        terms = [f"{row[i]:+.3f}*z({features[i]})" for i in order if row[i] != 0]
        lines.append(f"class {name}: {bias:+.3f} " + " ".join(terms or ["(no feature)"]))
    lines.append("standardisation: " + ", ".join(
        f"{features[i]} ({scaler.mean_[i]:.4g}, {scaler.scale_[i]:.4g})"
        for i in np.flatnonzero(np.abs(coef).sum(0))
    ))  # fmt: skip
    return "\n".join(lines)


STUDENTS: dict[str, StudentKind] = {
    "tree": StudentKind(
        _tree_labels,
        _tree_teacher,
        _tree_size,
        _tree_rules,
        "CART tree of max_depth: labels -> a classifier; teacher -> a regression tree on its "
        "probabilities",
    ),
    "rule_list": StudentKind(
        _rules_labels,
        _rules_teacher,
        _rules_size,
        _rules_text,
        "imodels' greedy rule list (two classes): labels, or the teacher's top-1 classes",
    ),
    "sparse_linear": StudentKind(
        _linear_labels,
        _linear_teacher,
        _linear_size,
        _linear_text,
        "L1 logistic regression on labels; a Lasso on the teacher's centred logits",
    ),
}
"""Every interpretable student a recipe's `students.kinds` may name."""


def scores(estimator: Any, x: np.ndarray) -> np.ndarray:
    """(N, C) class scores whose argmax is the student's class: probabilities of a classifier,
    the regression outputs (probabilities or logits) of a student fitted to the teacher."""
    from sklearn.base import is_classifier

    x = np.asarray(x, dtype=np.float32)
    if is_classifier(estimator):
        out = estimator.predict_proba(x)
        if out.ndim == 2 and out.shape[1] == 1:  # a two-class classifier fitted on one class
            raise StillroomError("a student saw one class only; give data with several classes")
        return out
    out = np.asarray(estimator.predict(x))
    return out.reshape(len(x), -1)


def generate_near(inputs: np.ndarray, count: int, scale: float, seed: int) -> np.ndarray:
    """`count` samples near `inputs` (N, F): a training input picked at random with Gaussian
    noise of `scale` times each feature's std, clipped to the feature's training range (pixels
    stay pixels), the transfer set the teacher then labels."""
    if count == 0:
        return inputs[:0]
    rng = np.random.default_rng(seed)
    base = inputs[rng.integers(0, len(inputs), count)]
    std = inputs.std(0)
    out = base + rng.normal(size=base.shape) * std * scale
    return np.clip(out, inputs.min(0), inputs.max(0)).astype(inputs.dtype)
