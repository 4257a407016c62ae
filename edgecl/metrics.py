"""Class-incremental metrics (docs/DESIGN.md, "Benchmark protocol") and the accuracy plot.

After session t, on all classes seen so far: A_t (sample-weighted top-1), the accuracy matrix
a[t][j] (accuracy on session j's classes after session t), A_last = A_T, A_avg = mean_t A_t,
and forgetting = mean over j < T of (max_{j <= t < T} a[t][j] - a[T][j]).
All accuracies are in percent.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


class SessionMetrics:
    """Accumulates per-session results for one predictor (aggregate, slow or fast)."""

    def __init__(self) -> None:
        self.accuracy: list[float] = []
        self.matrix: list[list[float]] = []

    def record(self, pred: np.ndarray, labels: np.ndarray, session_of_label: np.ndarray) -> float:
        """Record session t from predictions over the seen classes' test samples.

        ``session_of_label[y]`` is the session that introduced incremental label y.
        """
        pred, labels = np.asarray(pred), np.asarray(labels)
        correct = pred == labels
        sessions = session_of_label[labels]
        t = len(self.accuracy)
        row = []
        for j in range(t + 1):
            mask = sessions == j
            row.append(100.0 * float(correct[mask].mean()) if mask.any() else float("nan"))
        acc = 100.0 * float(correct.mean()) if len(correct) else float("nan")
        self.accuracy.append(acc)
        self.matrix.append(row)
        return acc

    def summary(self) -> dict:
        return summarize(self.accuracy, self.matrix)


def forgetting(matrix: Sequence[Sequence[float]]) -> float:
    """Mean drop from each earlier session's best accuracy to its final accuracy."""
    T = len(matrix) - 1
    if T < 1:
        return 0.0
    drops = [max(matrix[t][j] for t in range(j, T)) - matrix[T][j] for j in range(T)]
    return float(np.mean(drops))


def summarize(accuracy: Sequence[float], matrix: Sequence[Sequence[float]]) -> dict:
    return {
        "accuracy": [round(a, 4) for a in accuracy],
        "accuracy_matrix": [[round(a, 4) for a in row] for row in matrix],
        "A_last": round(accuracy[-1], 4) if accuracy else None,
        "A_avg": round(float(np.mean(accuracy)), 4) if accuracy else None,
        "forgetting": round(forgetting(matrix), 4),
    }


def plot_accuracy(curves: dict, title: Optional[str] = None,
                  classes_per_session: Optional[Sequence[int]] = None) -> bytes:
    """PNG (bytes) of accuracy per session, one line per predictor (``{"SAFE": [...], "slow": [...]}``)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, acc in curves.items():
        x = np.arange(1, len(acc) + 1)
        if classes_per_session is not None:
            x = np.cumsum(classes_per_session)[: len(acc)]
        ax.plot(x, acc, marker="o", label=f"{name} (last {acc[-1]:.1f})")
    ax.set_xlabel("classes seen" if classes_per_session is not None else "session")
    ax.set_ylabel("top-1 accuracy on seen classes (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
