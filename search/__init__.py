"""ragsweep's service: study specs, search plans, dispatch, the study database and the CLI."""
