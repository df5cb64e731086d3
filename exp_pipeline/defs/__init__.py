"""Dagster at the edge: the definitions, by kind. `exp_pipeline.definitions` loads this folder
(`load_from_defs_folder`); everything these modules call is library code that does not know Dagster.
"""
