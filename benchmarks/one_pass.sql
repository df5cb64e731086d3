-- The one-pass script: what a data team would write by hand instead of adopting the pipeline, and
-- the benchmark's headline reference. Every experiment at once, straight from the Parquet logs to
-- per-subject values and per-variant sufficient statistics; nothing event-level is ever written.
--
--   1. one GROUP BY dedupes the exposures of every experiment: first exposure inside the window
--      wins, subjects who saw several variants are flagged and left out;
--   2. one join of the event log against the assignments of every experiment, aggregated straight
--      into per-subject values: each metric's own window after assignment and the CUPED pre-period
--      (events of the metric's name in the pre_window before assignment), exact DECIMAL sums;
--   3. caps (the cap_percentile of the metric's non-zero values) and per-variant sums.
--
-- The rules are the pipeline's (README "Assignment rules", docs/data-model.md), including one the
-- sample data never exercises: an event logged twice (same subject, name, time and value) counts
-- once. That rule is a DISTINCT over the whole event log (in the events CTE): bench_reference.py
-- runs the script with it (one_pass) and without it (one_pass_keep_duplicates), so the report shows
-- what the rule costs a hand-written script.
-- bench_reference.py sets the same configuration as for reference.sql (its header lists it):
-- bench_experiments, bench_variants, bench_metrics and the variables assignments_path,
-- events_path, cap_percentiles. Times are integer microseconds since the epoch (UTC).

WITH exposures AS (
    SELECT trim(a.experiment_key, ' ' || chr(9) || chr(10) || chr(11) || chr(12) || chr(13)) AS experiment_id,
           a.user_id AS subject_id,
           a.variation AS variant_id,
           epoch_us(a.exposed_at::TIMESTAMPTZ) AS at_us
    FROM read_parquet(getvariable('assignments_path')) AS a
    WHERE a.user_id IS NOT NULL AND trim(a.user_id) <> '' AND a.exposed_at IS NOT NULL
),
subjects AS (
    -- Exposures of a known variant inside [start, end): the first one is the assignment.
    SELECT e.experiment_id, e.subject_id, any_value(e.variant_id) AS variant_id, min(e.at_us) AS assigned_us,
           any_value(x.pre_window_us) AS pre_window_us
    FROM exposures AS e
    JOIN bench_variants AS v USING (experiment_id, variant_id)
    JOIN bench_experiments AS x USING (experiment_id)
    WHERE e.at_us >= x.start_us AND (x.end_us IS NULL OR e.at_us < x.end_us)
    GROUP BY e.experiment_id, e.subject_id
    HAVING count(DISTINCT e.variant_id) = 1
),
events AS (
    SELECT {{distinct}} e.user_id AS subject_id, epoch_us(e.event_ts::TIMESTAMPTZ) AS at_us,
           e.event_type AS event_name, e.amount::DOUBLE AS value
    FROM read_parquet(getvariable('events_path')) AS e
    WHERE e.event_ts IS NOT NULL
),
per_subject AS (
    -- The one join: every event with every metric on its name of every experiment its subject is in.
    SELECT s.experiment_id, s.subject_id, m.metric,
           count(*) FILTER (ev.at_us >= s.assigned_us + m.start_us) AS post_events,
           sum(coalesce(ev.value, 0)::DECIMAL(38, 9)) FILTER (ev.at_us >= s.assigned_us + m.start_us) AS post_sum,
           count(*) FILTER (ev.at_us < s.assigned_us) AS pre_events,
           sum(coalesce(ev.value, 0)::DECIMAL(38, 9)) FILTER (ev.at_us < s.assigned_us) AS pre_sum
    FROM subjects AS s
    JOIN events AS ev ON ev.subject_id = s.subject_id
    JOIN bench_metrics AS m ON m.experiment_id = s.experiment_id AND m.event_name = ev.event_name
    WHERE ev.at_us >= s.assigned_us - s.pre_window_us AND ev.at_us < s.assigned_us + m.end_us
      AND (ev.at_us < s.assigned_us OR ev.at_us >= s.assigned_us + m.start_us)
    GROUP BY ALL
),
subject_values AS MATERIALIZED (
    -- Every analysable subject gets every metric of its experiment; no events count as zero.
    SELECT s.experiment_id, s.variant_id, m.metric, m.cap_percentile,
           CASE m.aggregation
               WHEN 'sum' THEN coalesce(p.post_sum, 0)::DOUBLE
               WHEN 'count' THEN coalesce(p.post_events, 0)
               ELSE (coalesce(p.post_events, 0) > 0)::INT
           END::DOUBLE AS y,
           CASE m.aggregation
               WHEN 'sum' THEN coalesce(p.pre_sum, 0)::DOUBLE
               WHEN 'count' THEN coalesce(p.pre_events, 0)
               ELSE (coalesce(p.pre_events, 0) > 0)::INT
           END::DOUBLE AS x
    FROM subjects AS s
    JOIN bench_metrics AS m USING (experiment_id)
    LEFT JOIN per_subject AS p USING (experiment_id, subject_id, metric)
),
caps AS (
    SELECT experiment_id, metric,
           list_extract(quantile_cont(y, getvariable('cap_percentiles')) FILTER (y <> 0),
                        list_position(getvariable('cap_percentiles'), cap_percentile)) AS y_cap,
           list_extract(quantile_cont(x, getvariable('cap_percentiles')) FILTER (x <> 0),
                        list_position(getvariable('cap_percentiles'), cap_percentile)) AS x_cap
    FROM subject_values
    WHERE cap_percentile IS NOT NULL
    GROUP BY experiment_id, metric, cap_percentile
),
capped AS (
    SELECT v.experiment_id, v.variant_id, v.metric,
           least(v.y, coalesce(c.y_cap, v.y)) AS y,
           least(v.x, coalesce(c.x_cap, v.x)) AS x
    FROM subject_values AS v
    LEFT JOIN caps AS c USING (experiment_id, metric)
)
SELECT experiment_id, variant_id, metric, count(*) AS n,
       sum(y) AS sum_y, sum(y * y) AS sum_y2, sum(x) AS sum_x, sum(x * x) AS sum_x2, sum(x * y) AS sum_xy
FROM capped
GROUP BY ALL
ORDER BY ALL;
