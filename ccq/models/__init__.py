"""Model adapters and builders (tiny random models for tests live in `ccq.models.tiny`)."""
