"""editflow: MLflow-tracked mass knowledge editing for causal LMs."""
