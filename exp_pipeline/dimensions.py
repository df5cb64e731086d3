"""The dimension tables, built from the registry alone: dim_experiments and dim_variants."""

from __future__ import annotations

import datetime as dt

import pandas as pd

from exp_pipeline.registry import Registry


def dim_experiments_frame(registry: Registry, now: dt.datetime) -> pd.DataFrame:
    """One row per experiment: dates, status at `now`, analysis settings."""
    frame = pd.DataFrame(
        [
            {
                "experiment_id": e.id,
                "name": e.name,
                "description": e.description,
                "start_at": e.start_at,
                "end_at": e.end_at,
                "status": e.status(now),
                "metrics": ",".join(e.metrics),
                "alpha": e.alpha,
                "srm_p_threshold": e.srm.p_threshold,
                "srm_min_subjects": e.srm.min_subjects,
                "srm_blocks_metrics": e.srm.blocks_metrics,
                # A number of days, fractional or not (the registry keeps a whole default as an int).
                "cuped_pre_window_days": float(e.cuped_pre_window_days),
                "multi_variant_warn_share": e.multi_variant.warn_share,
                "multi_variant_error_share": e.multi_variant.error_share,
                "pre_period_bias_p_threshold": e.pre_period_bias.p_threshold,
            }
            for e in registry.experiments
        ]
    )
    frame["end_at"] = pd.to_datetime(frame["end_at"], utc=True)
    return frame


def dim_variants_frame(registry: Registry) -> pd.DataFrame:
    """One row per experiment and variant: weight, and which one is the control."""
    return pd.DataFrame(
        [
            {"experiment_id": e.id, "variant_id": v.id, "is_control": v.control, "weight": v.weight}
            for e in registry.experiments
            for v in e.variants
        ]
    )
