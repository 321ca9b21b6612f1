"""Benchmark runs and reports, above the API: `runs` (independent, batch and sequential loops,
resume, merge of shards), `plan` (models x methods x datasets x modes x seeds in one folder)
and `report` (tables and plots). Scoring itself lives in `kedit.eval`."""
