"""The job spec: pydantic sections, rules between fields, memory fit, DeepSpeed rendering, loading, schema."""
