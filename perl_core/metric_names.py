"""Names in the metric contract that readers of tracked runs need without torch (the aggregate
runs on a laptop with the tracking dependencies only); `perl_core.metrics` computes them."""

# Fig. 5's groups of test samples, by the top-1 hit at step 0 -> step k
DRIFT_GROUPS = ("stay_correct", "wrong_to_correct", "correct_to_wrong", "stay_wrong")
# the quartiles of the per-sample KL(p_k || p_0) logged per group and step, in percent
DRIFT_QUANTILES = (25, 50, 75)

__all__ = ["DRIFT_GROUPS", "DRIFT_QUANTILES"]
