"""Plain-NumPy reference for CoBa task weights (Gong et al., "CoBa: Convergence Balancer for Multitask
Finetuning of Large Language Models", EMNLP 2024, arXiv:2410.06741, Section 3).

Written from the paper's formulas; it does not import mftcoder. Tests use it as the oracle for the
balancer. Sources and the choices made where the paper leaves room are listed at the end of this
docstring.

Notation: K tasks; t the index of a validation point (one point per weight update; with an update
interval of 1 this is the optimizer step); l_i(t) the validation loss of task i at point t; row 0 of
the history is the measurement before training; W warm-up points; N the history length; tau the
temperature of the divergence factor.

[E1] normalized loss     y_i(t) = l_i(t) / l_i(0)
[E2] convergence slope   alpha_i(t): least-squares slope of the line fitted to the points
                         (s, y_i(s)), s = max(0, t-N+1) .. t
                         alpha_i(t) = sum_s (s - s_bar)(y_i(s) - y_bar) / sum_s (s - s_bar)^2
                         (the first entry of (X^T X)^-1 X^T y with rows X_s = [s, 1])
[E3] RCS_i(t) = softmax_i( K * alpha_i(t) / sum_j |alpha_j(t)| )
[E4] ACS_i(t) = softmax_i( -n * alpha_i(t) / sum_{j=t-n+1..t} |alpha_i(j)| ),  n = min(N, slopes so far)
[E5] alpha_max(j) = max_i alpha_i(j)
     DF(t) = min( T * softmax_j( -tau * T * alpha_max(j) / sum_{m} |alpha_max(m)| )[j = t], 1 )
     where j and m run over all T slopes computed since the end of warm-up (T = t - W + 1)
[E6] omega_i(t) = DF(t) * RCS_i(t) + (1 - DF(t)) * ACS_i(t)
Warm-up: omega_i(t) = 1/K for t < W; no slopes are recorded before t = W.

Reading the signs: RCS gives a task that converges faster (more negative slope) less weight; ACS gives a
task whose slope turns upwards against its own recent history (divergence) less weight; DF is 1 while
the worst task's slope is no worse than its history (RCS decides) and falls towards 0 when it gets worse
(ACS decides). The sum of each of RCS, ACS and omega is 1; slopes enter every score only as ratios, so
their unit (per step or per validation point) cancels as long as it is the same throughout.

Sources. The stored arXiv page gives only the abstract and introduction, so the equations were taken from
two independent transcriptions of the paper's Section 3 (a study note and the UniRain adaptation, which
renames RCS/ACS/DF to TBS/TSS/AF and cites the same forms) and checked against the authors' own code
(codefuse-ai/MFTCoder, mftcoder_accelerate/src/utils/loss_utils.py, CoBaStatus). The tags [E1]-[E6] are
ours: the paper's own equation numbers could not be confirmed from the stored material.

Choices where the paper leaves room:
- [E1] the reference point is the loss before training (row 0), as in the authors' code.
- [E2] the window holds the last N validation points including t (fewer at the start, never fewer
  than 2 because W >= 1); x is the point index.
- [E4] the multiplier is the number of slopes actually summed (N once N slopes exist).
- [E5] the transcriptions write the DF denominator without |.|; we use |.| like RCS, ACS and the
  authors' code (without it the sum can pass through zero). alpha_max is the largest per-task slope;
  the authors' code instead fits one slope to the per-point maximum normalized loss.
- If a denominator is 0 (all slopes exactly 0) the softmax argument is taken as 0 (uniform).
- No floor on the weights and no second softmax: those are in the authors' code, not in the paper.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class CobaTrace(NamedTuple):
    """Per validation point t (rows); quantities not defined at a point are NaN."""

    normalized: np.ndarray  # [S, K]  y_i(t)                    [E1]
    slope: np.ndarray       # [S, K]  alpha_i(t), t >= W        [E2]
    rcs: np.ndarray         # [S, K]                            [E3]
    acs: np.ndarray         # [S, K]                            [E4]
    alpha_max: np.ndarray   # [S]                               [E5]
    df_raw: np.ndarray      # [S]     T * softmax(...)[t], before the min with 1
    df: np.ndarray          # [S]                               [E5]
    weights: np.ndarray     # [S, K]  omega_i(t); 1/K during warm-up  [E6]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _ratio(num: np.ndarray, den: float) -> np.ndarray:
    return np.zeros_like(num) if den == 0 else num / den


def window_slope(y: np.ndarray) -> float:
    """[E2] Least-squares slope of y against x = 0, 1, ..., len(y) - 1 (any offset gives the same)."""
    x = np.arange(len(y), dtype=np.float64)
    dx = x - x.mean()
    return float((dx * (y - y.mean())).sum() / (dx * dx).sum())


def coba_reference(val_loss, warmup_steps: int, history_length: int, tau: float, initial=None) -> CobaTrace:
    """Weights and intermediates at every validation point of a history `val_loss` [S, K].

    Row s holds the per-task validation losses at point s; row 0 is the measurement before training and
    is the default normalizer (`initial` overrides it). Row t's weights are the ones to train with after
    the validation at point t.
    """
    loss = np.asarray(val_loss, dtype=np.float64)
    if loss.ndim != 2 or loss.shape[0] < 1 or loss.shape[1] < 1:
        raise ValueError("val_loss must have shape [steps, K]")
    if warmup_steps < 1 or history_length < 2:
        raise ValueError("need warmup_steps >= 1 and history_length >= 2")
    steps, k = loss.shape
    base = loss[0] if initial is None else np.asarray(initial, dtype=np.float64)

    nan_tk = np.full((steps, k), np.nan)
    normalized = loss / base                                              # [E1]
    slope, rcs, acs = nan_tk.copy(), nan_tk.copy(), nan_tk.copy()
    alpha_max, df_raw, df = (np.full(steps, np.nan) for _ in range(3))
    weights = np.full((steps, k), 1.0 / k)                                # warm-up: uniform

    for t in range(warmup_steps, steps):
        lo = max(0, t - history_length + 1)
        a = np.array([window_slope(normalized[lo:t + 1, i]) for i in range(k)])   # [E2]
        slope[t] = a

        rcs[t] = _softmax(_ratio(k * a, np.abs(a).sum()))                 # [E3]

        past = slope[max(warmup_steps, t - history_length + 1):t + 1]     # the last n slopes
        n = past.shape[0]
        den = np.abs(past).sum(axis=0)
        acs[t] = _softmax(np.array([0.0 if den[i] == 0 else -n * a[i] / den[i] for i in range(k)]))  # [E4]

        alpha_max[t] = a.max()                                            # [E5]
        hist = alpha_max[warmup_steps:t + 1]
        big_t = hist.shape[0]
        df_raw[t] = big_t * _softmax(_ratio(-tau * big_t * hist, np.abs(hist).sum()))[-1]
        df[t] = min(df_raw[t], 1.0)

        weights[t] = df[t] * rcs[t] + (1.0 - df[t]) * acs[t]              # [E6]

    return CobaTrace(normalized, slope, rcs, acs, alpha_max, df_raw, df, weights)


# ---------------------------------------------------------------------------------------------------
# Worked example: K = 3, 8 validation points (t = 0..7), W = 3, N = 4, tau = 5.
#
# Normalized losses y(t) (raw = y * initial, initial = [2.0, 4.0, 2.5]):
#   A: 1.00 0.90 0.80 0.70 0.60 0.50 0.40 0.30   (raw 2.0 1.8 ... 0.6: fast, steady)
#   B: 1.00 0.95 0.90 0.85 0.80 0.75 0.70 0.65   (raw 4.0 3.8 ... 2.6: half as fast)
#   C: 1.00 0.98 0.96 0.94 0.92 0.88 0.88 0.89   (slow, then stalls and ticks up)
# Raw A and B both fall by 0.2 per point, so only [E1] tells them apart.
#
# [E2] with 4 points, x - x_bar = (-1.5, -0.5, 0.5, 1.5), sum of squares 5:
#   alpha = (-1.5 y0 - 0.5 y1 + 0.5 y2 + 1.5 y3) / 5.  A: -0.1, B: -0.05 at every t. C:
#   t=3 (rows 0..3) (-1.5 - 0.49 + 0.48 + 1.41)/5   = -0.02
#   t=4 (rows 1..4) (-1.47 - 0.48 + 0.47 + 1.38)/5  = -0.02
#   t=5 (rows 2..5) (-1.44 - 0.47 + 0.46 + 1.32)/5  = -0.026
#   t=6 (rows 3..6) (-1.41 - 0.46 + 0.44 + 1.32)/5  = -0.022
#   t=7 (rows 4..7) (-1.38 - 0.44 + 0.44 + 1.335)/5 = -0.009
# alpha_max = C's slope at every t (it is above -0.05).
#
# [E3] t=3: 3*(-0.1, -0.05, -0.02)/0.17 = (-1.764706, -0.882353, -0.352941);
#   exp = (0.171237, 0.413808, 0.702619), sum 1.287664 -> RCS = (0.132983, 0.321363, 0.545654).
# [E4] t=7 uses the slopes of t=4..7 (n = 4; t=3 has left the window): A, B: -4*(-0.1)/0.4 = 1;
#   C: -4*(-0.009)/(0.02+0.026+0.022+0.009) = 0.467532 -> ACS = softmax(1, 1, 0.467532).
#   t=5 (n = 3): C: -3*(-0.026)/0.066 = 1.181818 -> ACS = softmax(1, 1, 1.181818).
# [E5] t=4: alpha_max history (-0.02, -0.02) -> softmax uniform -> DF = 2 * 1/2 = 1.
#   t=5: history (-0.02, -0.02, -0.026), T = 3, scale 5*3/0.066 = 227.27; arguments
#        (4.545, 4.545, 5.909); last = 1/(1 + 2 e^-1.3636) = 0.661612; 3 * 0.661612 = 1.984838 -> DF = 1.
#   t=6: T = 4, sum 0.088, arguments (4.545, 4.545, 5.909, 5.0); relative to the last
#        (0.634784, 0.634784, 2.481981, 1), sum 4.751549 -> 0.210458; DF = 4 * 0.210458 = 0.841833.
#   t=7: T = 5 (all slopes since warm-up, unlike ACS), sum 0.097, scale 25/0.097 = 257.73; arguments
#        (5.155, 5.155, 6.701, 5.670, 2.320); last = 1/143.52 = 0.006967; DF = 0.034835.
# [E6] t=6: 0.841833 * RCS + 0.158167 * (1/3, 1/3, 1/3) -> A: 0.841833*0.137176 + 0.052722 = 0.168201.
# ---------------------------------------------------------------------------------------------------

EXAMPLE_INITIAL = np.array([2.0, 4.0, 2.5])
EXAMPLE_NORMALIZED = np.array([
    [1.00, 1.00, 1.00],
    [0.90, 0.95, 0.98],
    [0.80, 0.90, 0.96],
    [0.70, 0.85, 0.94],
    [0.60, 0.80, 0.92],
    [0.50, 0.75, 0.88],
    [0.40, 0.70, 0.88],
    [0.30, 0.65, 0.89],
])
EXAMPLE_VAL_LOSS = EXAMPLE_NORMALIZED * EXAMPLE_INITIAL
EXAMPLE_PARAMS = {"warmup_steps": 3, "history_length": 4, "tau": 5.0}

# Expected values at t = 3..7 (rows t < 3 are warm-up: weights 1/3, everything else NaN); 6 decimals.
EXAMPLE_EXPECTED = {
    "slope": {3: (-0.1, -0.05, -0.02), 4: (-0.1, -0.05, -0.02), 5: (-0.1, -0.05, -0.026),
              6: (-0.1, -0.05, -0.022), 7: (-0.1, -0.05, -0.009)},
    "rcs": {3: (0.132983, 0.321363, 0.545654), 4: (0.132983, 0.321363, 0.545654),
            5: (0.145450, 0.341077, 0.513473), 6: (0.137176, 0.328112, 0.534712),
            7: (0.109452, 0.281150, 0.609398)},
    "acs": {3: (1 / 3, 1 / 3, 1 / 3), 4: (1 / 3, 1 / 3, 1 / 3), 5: (0.312559, 0.312559, 0.374882),
            6: (1 / 3, 1 / 3, 1 / 3), 7: (0.386525, 0.386525, 0.226950)},
    "df_raw": {3: 1.0, 4: 1.0, 5: 1.984838, 6: 0.841833, 7: 0.034835},
    "df": {3: 1.0, 4: 1.0, 5: 1.0, 6: 0.841833, 7: 0.034835},
    "weights": {3: (0.132983, 0.321363, 0.545654), 4: (0.132983, 0.321363, 0.545654),
                5: (0.145450, 0.341077, 0.513473), 6: (0.168201, 0.328938, 0.502860),
                7: (0.376873, 0.382854, 0.240272)},
}


def check_example(atol: float = 1e-6) -> CobaTrace:
    """Run the worked example and assert every pinned value; returns the trace."""
    trace = coba_reference(EXAMPLE_VAL_LOSS, **EXAMPLE_PARAMS)
    np.testing.assert_allclose(trace.normalized, EXAMPLE_NORMALIZED, atol=1e-12)
    np.testing.assert_allclose(trace.weights[:3], 1 / 3, atol=0)
    assert np.isnan(trace.slope[:3]).all() and np.isnan(trace.df[:3]).all()
    for name, rows in EXAMPLE_EXPECTED.items():
        values = getattr(trace, name)
        for t, want in rows.items():
            np.testing.assert_allclose(values[t], want, atol=atol, err_msg=f"{name}[{t}]")
    np.testing.assert_allclose(trace.weights.sum(axis=1), 1.0, atol=1e-12)
    return trace


if __name__ == "__main__":
    check_example()
    print("worked example: ok")
