"""MLflow: the runs and registry a search writes (`store`, `publish`), what users read back (`select`), and
what a person reads (`report`: the table and plots)."""
