"""The edge agent process: ingest, training job, model install, inference API, telemetry, resource gates."""
