"""Orchestration: Prefect flows over dataprep and microdit, the DuckDB cost ledger, the main job (flows.demo).

Library packages never import this one; Prefect is imported by flows.prefect_flows and flows.demo only.
"""
