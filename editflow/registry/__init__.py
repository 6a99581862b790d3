"""Everything MLflow: the tracking store, the editflow model flavor, versions, the audit ledger,
promotion and rollback."""
