-- The reference implementation: what the pipeline computes, hand-written for DuckDB straight from
-- the Parquet logs: no Dagster, no Ibis, no Python per row. It applies the pipeline's rules (README
-- "Assignment rules" and "Statistics"; exp_pipeline/transforms.py) and is what the engine can do
-- with them: the pipeline is measured against it. The last statement returns the sufficient
-- statistics of exp.variant_metrics (n, sum_y, sum_y2, sum_x, sum_x2, sum_xy per experiment,
-- variant and metric).
--
-- bench_reference.py runs it in one of two modes, by what it puts for {{table}} and {{temp}}:
--   tables      the analysable subjects and the post- and pre-assignment events are written as
--               tables to a DuckDB file, as the pipeline writes them ("TABLE" / "TEMP TABLE")
--   statistics  everything is a view, so the last statement is one query and nothing is written
--               (post_ and pre_assignment_events are then never computed) ("TEMP VIEW")
--
-- Set by bench_reference.py before this script runs (configuration from the registry, not data):
--   getvariable('assignments_path'), getvariable('events_path')  the registry's source globs
--   getvariable('cap_percentiles')  DOUBLE[]: the distinct cap_percentile values of the metrics
--                                   (quantile_cont takes constant percentiles only: one list
--                                   computes them all, each metric picks its own)
--   bench_experiments(experiment_id, start_us, end_us, pre_window_us)   end_us NULL: still running
--   bench_variants(experiment_id, variant_id)                            the known variants
--   bench_metrics(experiment_id, metric, event_name, aggregation, start_us, end_us, cap_percentile)
--
-- Times are integer microseconds since the epoch (UTC) throughout, so window arithmetic is exact
-- and does not depend on the session time zone. Source columns are the sample generator's (the
-- benchmark uses the repository's registry, whose column mapping names exactly these).

-- Blank like transforms._blank: null, or nothing but the whitespace Ibis' strip() removes.
CREATE OR REPLACE TEMP MACRO is_blank(s) AS
    s IS NULL OR trim(s, ' ' || chr(9) || chr(10) || chr(11) || chr(12) || chr(13)) = '';

CREATE {{table}} subjects AS
WITH exposures AS (
    -- Exposure rows the pipeline ingests (transforms.classify_assignments): a subject id and a
    -- timestamp. Unknown variants and experiments go with the join below. Exact duplicates need no
    -- removal: they change neither a subject's first exposure nor the set of variants it saw.
    SELECT trim(a.experiment_key, ' ' || chr(9) || chr(10) || chr(11) || chr(12) || chr(13)) AS experiment_id,
           a.user_id AS subject_id,
           a.variation AS variant_id,
           epoch_us(a.exposed_at::TIMESTAMPTZ) AS at_us
    FROM read_parquet(getvariable('assignments_path')) AS a
    WHERE NOT is_blank(a.user_id) AND a.exposed_at IS NOT NULL
),
analysable AS (
    -- Analysable subjects: exposures inside [start_at, end_at) naming exactly one variant. The first
    -- exposure is the assignment; with one variant seen, that variant is the subject's.
    SELECT e.experiment_id, e.subject_id, any_value(e.variant_id) AS variant_id, min(e.at_us) AS assigned_us
    FROM exposures AS e
    JOIN bench_variants AS v ON v.experiment_id = e.experiment_id AND v.variant_id = e.variant_id
    JOIN bench_experiments AS x ON x.experiment_id = e.experiment_id
    WHERE e.at_us >= x.start_us AND (x.end_us IS NULL OR e.at_us < x.end_us)
    GROUP BY e.experiment_id, e.subject_id
    HAVING count(DISTINCT e.variant_id) = 1
)
SELECT * FROM analysable;

CREATE {{temp}} matched AS
WITH events AS (
    -- Usable events (transforms.usable_events): a timestamp present. Blank subject ids and event
    -- names need no test: the joins on them below match no blank value.
    SELECT e.user_id AS subject_id,
           epoch_us(e.event_ts::TIMESTAMPTZ) AS at_us,
           e.event_type AS event_name,
           e.amount::DOUBLE AS value
    FROM read_parquet(getvariable('events_path')) AS e
    WHERE e.event_ts IS NOT NULL
),
event_spans AS (
    -- Per experiment and event name: the widest window of a metric on that event.
    SELECT experiment_id, event_name, max(end_us) AS end_us
    FROM bench_metrics
    GROUP BY ALL
),
joined AS (
    -- The temporal join, one pass over the events for every experiment: a subject's events from the
    -- start of its CUPED pre-period to the end of the widest metric window. DISTINCT: an event
    -- logged twice counts once.
    SELECT DISTINCT s.experiment_id, s.subject_id, s.variant_id, s.assigned_us, ev.at_us, ev.event_name, ev.value
    FROM subjects AS s
    JOIN bench_experiments AS x ON x.experiment_id = s.experiment_id
    JOIN events AS ev ON ev.subject_id = s.subject_id
    JOIN event_spans AS w ON w.experiment_id = s.experiment_id AND w.event_name = ev.event_name
    WHERE ev.at_us >= s.assigned_us - x.pre_window_us
      AND ev.at_us < s.assigned_us + w.end_us
)
SELECT * FROM joined;

CREATE {{table}} post_assignment_events AS SELECT * FROM matched WHERE at_us >= assigned_us;
CREATE {{table}} pre_assignment_events AS SELECT * FROM matched WHERE at_us < assigned_us;

WITH per_subject AS (
    -- Per subject and metric: events inside the metric's own window after assignment (end
    -- exclusive; an event at the assignment instant counts) and events of the pre-period (every
    -- event of the metric's name before assignment: the CUPED covariate has no metric window).
    SELECT experiment_id, subject_id, metric,
           count(*) FILTER (post) AS post_events,
           sum(coalesce(value, 0)) FILTER (post) AS post_sum,
           count(*) FILTER (pre) AS pre_events,
           sum(coalesce(value, 0)) FILTER (pre) AS pre_sum
    FROM (
        SELECT m.experiment_id, m.subject_id, b.metric, m.value,
               m.at_us >= m.assigned_us + b.start_us AND m.at_us < m.assigned_us + b.end_us AS post,
               m.at_us < m.assigned_us AS pre
        FROM matched AS m
        JOIN bench_metrics AS b ON b.experiment_id = m.experiment_id AND b.event_name = m.event_name
    )
    GROUP BY ALL
),
subject_values AS MATERIALIZED (
    -- Every analysable subject gets every metric of its experiment; no events count as zero.
    SELECT s.experiment_id, s.subject_id, s.variant_id, b.metric, b.cap_percentile,
           CASE b.aggregation
               WHEN 'sum' THEN coalesce(p.post_sum, 0)
               WHEN 'count' THEN coalesce(p.post_events, 0)
               ELSE CASE WHEN coalesce(p.post_events, 0) > 0 THEN 1 ELSE 0 END
           END::DOUBLE AS y,
           CASE b.aggregation
               WHEN 'sum' THEN coalesce(p.pre_sum, 0)
               WHEN 'count' THEN coalesce(p.pre_events, 0)
               ELSE CASE WHEN coalesce(p.pre_events, 0) > 0 THEN 1 ELSE 0 END
           END::DOUBLE AS x
    FROM subjects AS s
    JOIN bench_metrics AS b ON b.experiment_id = s.experiment_id
    LEFT JOIN per_subject AS p
        ON p.experiment_id = s.experiment_id AND p.subject_id = s.subject_id AND p.metric = b.metric
),
caps AS (
    -- Winsorizing caps (transforms.cap_subject_values): the metric's cap_percentile of its NON-ZERO
    -- values over all the experiment's subjects, for y and for x separately.
    SELECT experiment_id, metric,
           list_extract(
               quantile_cont(y, getvariable('cap_percentiles')) FILTER (y <> 0),
               list_position(getvariable('cap_percentiles'), cap_percentile)
           ) AS y_cap,
           list_extract(
               quantile_cont(x, getvariable('cap_percentiles')) FILTER (x <> 0),
               list_position(getvariable('cap_percentiles'), cap_percentile)
           ) AS x_cap
    FROM subject_values
    WHERE cap_percentile IS NOT NULL
    GROUP BY experiment_id, metric, cap_percentile
),
capped AS (
    SELECT v.experiment_id, v.variant_id, v.metric,
           CASE WHEN v.y > c.y_cap THEN c.y_cap ELSE v.y END AS y,
           CASE WHEN v.x > c.x_cap THEN c.x_cap ELSE v.x END AS x
    FROM subject_values AS v
    LEFT JOIN caps AS c ON c.experiment_id = v.experiment_id AND c.metric = v.metric
)
SELECT experiment_id, variant_id, metric,
       count(*) AS n,
       sum(y) AS sum_y, sum(y * y) AS sum_y2,
       sum(x) AS sum_x, sum(x * x) AS sum_x2,
       sum(x * y) AS sum_xy
FROM capped
GROUP BY ALL
ORDER BY ALL;
